"""Checkpoints of host (NumPy) pytrees: a thin wrapper over orbax.

The training loop saves what `Trainer.to_host(state)` returns (NumPy arrays
with a leading device axis, PRNG keys as raw uint32 data) and, on resume,
restores into the structure of a freshly initialised state's host copy:

    with Checkpointer(os.path.join(logdir, "ckpt"), max_to_keep=3) as ckpt:
      ckpt.save(iteration, trainer.to_host(state))
      step = ckpt.latest_step()
      host = ckpt.restore(step, like=trainer.to_host(trainer.init()))

Saves are asynchronous (orbax writes in the background); `close` waits.

Every checkpoint is verified: once orbax has committed a step, a SHA-256 of
the saved arrays (names, dtypes, shapes, bytes) is written beside it
(`<step>/ald_checksum.json`), and `restore` recomputes it from what it read.
A step without a checksum (the process died between the commit and the
checksum), with flipped bytes, or that orbax cannot read is a
`CorruptCheckpointError`; `restore_latest` then falls back to the newest step
that verifies, reporting each one it skipped.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any
CHECKSUM_FILE = "ald_checksum.json"


class CorruptCheckpointError(ValueError):
  """A checkpoint step that cannot be trusted (partial, corrupt, unverified)."""


class CheckpointMismatchError(ValueError):
  """A readable checkpoint of another structure (config, device count)."""


def _leaf_name(path: Sequence[Any]) -> str:
  """Dotted name of a leaf path, the way orbax names saved arrays ('a.0.b')."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return ".".join(parts)


def tree_digest(tree: PyTree) -> str:
  """SHA-256 (hex) of a pytree of arrays: leaf names, dtypes, shapes, bytes.

  Leaves are taken in name order, so a tree restored without a template
  (nested dicts and lists) has the same digest as the NamedTuples saved.
  """
  digest = hashlib.sha256()
  named = sorted((_leaf_name(path), leaf) for path, leaf in
                 jax.tree_util.tree_flatten_with_path(tree)[0])
  for name, leaf in named:
    leaf = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{name}|{leaf.dtype.str}|{leaf.shape}|".encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()


def _all_finite(tree: PyTree) -> bool:
  return all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
             if np.issubdtype(np.asarray(leaf).dtype, np.inexact))


class Checkpointer:
  """Numbered checkpoints of NumPy pytrees in one directory.

  Attributes:
    directory: absolute path of the checkpoint directory.
  """

  def __init__(self, directory: str, *, max_to_keep: Optional[int] = None):
    """Opens (creating if needed) `directory`.

    Args:
      directory: where step subdirectories are written.
      max_to_keep: keep only this many most recent checkpoints (None: all).
    """
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep: must be >= 1 or None (got {max_to_keep})")
    self.directory = os.path.abspath(directory)
    self._pending_digests: Dict[int, str] = {}
    self._manager = ocp.CheckpointManager(
        self.directory,
        # Named so that item metadata is readable in a reopened directory.
        item_handlers=ocp.StandardCheckpointHandler(),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             create=True))

  def save(self, step: int, tree: PyTree) -> None:
    """Starts writing `tree` (NumPy arrays) as checkpoint `step` (>= 0)."""
    if step < 0:
      raise ValueError(f"step: must be >= 0 (got {step})")
    if step in self.all_steps():
      raise ValueError(f"step: checkpoint {step} already exists in "
                       f"{self.directory}")
    self.wait_until_finished()
    self._pending_digests[int(step)] = tree_digest(tree)
    self._manager.save(int(step), args=ocp.args.StandardSave(tree))

  def all_steps(self) -> List[int]:
    """Steps of the checkpoints present, ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    """The newest checkpoint's step, or None when there is none."""
    return self._manager.latest_step()

  def restore(self, step: int, like: Optional[PyTree] = None, *,
              require_finite: bool = False) -> PyTree:
    """Reads checkpoint `step` into the structure of `like` and verifies it.

    Args:
      step: an existing checkpoint step.
      like: a pytree of NumPy arrays with the expected structure, shapes and
        dtypes (e.g. the host copy of a freshly initialised state); None
        reads the saved arrays as nested dicts and lists (still verified).
      require_finite: also reject a checkpoint holding NaN or inf.
    Returns:
      A pytree like `like` holding the saved NumPy arrays.
    Raises:
      ValueError: no such step.
      CheckpointMismatchError: the saved arrays' names, shapes or dtypes
        differ from `like` (e.g. another config or device count).
      CorruptCheckpointError: the step cannot be read, has no checksum, its
        checksum does not match, or (require_finite) it is not finite.
    """
    self.wait_until_finished()
    if step not in self.all_steps():
      raise ValueError(f"step: no checkpoint {step} in {self.directory} "
                       f"(have {self.all_steps()})")
    try:
      if like is not None:
        self._check_matches(step, like)
    except CheckpointMismatchError:
      raise
    except Exception as err:  # pylint: disable=broad-except
      raise CorruptCheckpointError(
          f"checkpoint {step}: unreadable metadata ({_short(err)})") from err
    checksum_path = os.path.join(self.directory, str(step), CHECKSUM_FILE)
    try:
      with open(checksum_path) as f:
        want = json.load(f)["sha256"]
    except (OSError, ValueError, KeyError) as err:
      raise CorruptCheckpointError(
          f"checkpoint {step}: no valid {CHECKSUM_FILE} (the write did not "
          f"finish)") from err
    try:
      restored = self._manager.restore(int(step),
                                       args=ocp.args.StandardRestore(like))
      if restored is None:
        raise ValueError("nothing restored")
      restored = jax.tree.map(np.asarray, restored)
    except Exception as err:  # pylint: disable=broad-except
      raise CorruptCheckpointError(
          f"checkpoint {step}: unreadable data ({_short(err)})") from err
    if tree_digest(restored) != want:
      raise CorruptCheckpointError(
          f"checkpoint {step}: checksum mismatch (the data changed on disk)")
    if require_finite and not _all_finite(restored):
      raise CorruptCheckpointError(f"checkpoint {step}: holds NaN or inf")
    return restored

  def restore_latest(self, like: Optional[PyTree] = None, *,
                     warn: Callable[[str], None] = lambda line: None,
                     require_finite: bool = True) -> Tuple[int, PyTree]:
    """The newest checkpoint that verifies, falling back past corrupt ones.

    Args:
      like: as for `restore`.
      warn: called with one line for every newer step that was skipped.
      require_finite: as for `restore`.
    Returns:
      (step, restored tree).
    Raises:
      CorruptCheckpointError: no checkpoint verifies (or there is none).
      CheckpointMismatchError: the newest readable checkpoint has another
        structure than `like` (another config or device count): no fallback
        for that.
    """
    skipped = []
    for step in reversed(self.all_steps()):
      try:
        tree = self.restore(step, like, require_finite=require_finite)
      except CorruptCheckpointError as err:
        skipped.append(str(err))
        warn(f"skipping {err}")
        continue
      return step, tree
    raise CorruptCheckpointError(
        f"no usable checkpoint in {self.directory}"
        + (f" ({'; '.join(skipped)})" if skipped else ""))

  def delete(self, step: int) -> None:
    """Removes checkpoint `step` (e.g. a corrupt one that a resume skipped)."""
    self.wait_until_finished()
    self._manager.delete(int(step))

  def saved_shapes(self, step: int) -> Dict[str, Tuple[Tuple[int, ...],
                                                       np.dtype]]:
    """Leaf name -> (shape, dtype) as recorded in checkpoint `step`."""
    return {
        leaf.name: (tuple(leaf.shape), np.dtype(leaf.dtype))
        for leaf in jax.tree.leaves(self._manager.item_metadata(step).tree)
    }

  def _check_matches(self, step: int, like: PyTree) -> None:
    """Compares the saved arrays' metadata with `like`, leaf by leaf."""
    saved = self.saved_shapes(step)
    expected = {
        _leaf_name(path): (np.shape(leaf), np.asarray(leaf).dtype)
        for path, leaf in jax.tree_util.tree_flatten_with_path(like)[0]
    }
    if saved.keys() != expected.keys():
      missing = sorted(expected.keys() - saved.keys())
      unexpected = sorted(saved.keys() - expected.keys())
      raise CheckpointMismatchError(
          f"checkpoint {step} in {self.directory} has another structure: "
          f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, (shape, dtype) in expected.items():
      if saved[name] != (shape, dtype):
        raise CheckpointMismatchError(
            f"checkpoint {step} in {self.directory}: array {name!r} is "
            f"{saved[name][1]}{list(saved[name][0])}, expected "
            f"{dtype}{list(shape)}")

  def wait_until_finished(self) -> None:
    """Blocks until every started save is on disk, with its checksum."""
    self._manager.wait_until_finished()
    for step, digest in sorted(self._pending_digests.items()):
      step_dir = os.path.join(self.directory, str(step))
      if os.path.isdir(step_dir):  # else already rotated out
        tmp = os.path.join(step_dir, CHECKSUM_FILE + ".tmp")
        with open(tmp, "w") as f:
          json.dump({"sha256": digest}, f)
          f.flush()
          os.fsync(f.fileno())
        os.replace(tmp, os.path.join(step_dir, CHECKSUM_FILE))
    self._pending_digests.clear()

  def close(self) -> None:
    self.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _short(err: Exception) -> str:
  """The first line of an exception's message, at most 160 characters."""
  lines = str(err).strip().splitlines()
  text = f"{type(err).__name__}: {lines[0] if lines else ''}"
  return text[:160]

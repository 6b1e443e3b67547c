"""Checkpoints of host (NumPy) pytrees: a thin wrapper over orbax.

The training loop saves what `Trainer.to_host(state)` returns (NumPy arrays
with a leading device axis, PRNG keys as raw uint32 data) and, on resume,
restores into the structure of a freshly initialised state's host copy:

    with Checkpointer(os.path.join(logdir, "ckpt"), max_to_keep=3) as ckpt:
      ckpt.save(iteration, trainer.to_host(state))
      step = ckpt.latest_step()
      host = ckpt.restore(step, like=trainer.to_host(trainer.init()))

Saves are asynchronous (orbax writes in the background); `close` waits.
"""
from __future__ import annotations

import os
from typing import Any, List, Optional, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any


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
    self._manager.save(int(step), args=ocp.args.StandardSave(tree))

  def all_steps(self) -> List[int]:
    """Steps of the checkpoints present, ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    """The newest checkpoint's step, or None when there is none."""
    return self._manager.latest_step()

  def restore(self, step: int, like: PyTree) -> PyTree:
    """Reads checkpoint `step` into the structure of `like`.

    Args:
      step: an existing checkpoint step.
      like: a pytree of NumPy arrays with the expected structure, shapes and
        dtypes (e.g. the host copy of a freshly initialised state).
    Returns:
      A pytree like `like` holding the saved NumPy arrays.
    Raises:
      ValueError: no such step, or the saved arrays' names, shapes or dtypes
        differ from `like` (e.g. another config or device count).
    """
    self.wait_until_finished()
    if step not in self.all_steps():
      raise ValueError(f"step: no checkpoint {step} in {self.directory} "
                       f"(have {self.all_steps()})")
    self._check_matches(step, like)
    restored = self._manager.restore(int(step),
                                     args=ocp.args.StandardRestore(like))
    return jax.tree.map(np.asarray, restored)

  def _check_matches(self, step: int, like: PyTree) -> None:
    """Compares the saved arrays' metadata with `like`, leaf by leaf."""
    saved = {
        leaf.name: (tuple(leaf.shape), np.dtype(leaf.dtype))
        for leaf in jax.tree.leaves(self._manager.item_metadata(step).tree)
    }
    expected = {
        _leaf_name(path): (np.shape(leaf), np.asarray(leaf).dtype)
        for path, leaf in jax.tree_util.tree_flatten_with_path(like)[0]
    }
    if saved.keys() != expected.keys():
      missing = sorted(expected.keys() - saved.keys())
      unexpected = sorted(saved.keys() - expected.keys())
      raise ValueError(f"checkpoint {step} in {self.directory} has another "
                       f"structure: missing {missing[:5]}, unexpected "
                       f"{unexpected[:5]}")
    for name, (shape, dtype) in expected.items():
      if saved[name] != (shape, dtype):
        raise ValueError(
            f"checkpoint {step} in {self.directory}: array {name!r} is "
            f"{saved[name][1]}{list(saved[name][0])}, expected "
            f"{dtype}{list(shape)}")

  def wait_until_finished(self) -> None:
    """Blocks until every started save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

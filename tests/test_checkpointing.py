"""Tests of ald_jax.checkpointing (orbax round trips of host pytrees)."""
from typing import NamedTuple

import jax
import numpy as np
import pytest

from ald_jax import checkpointing

NUM_DEVICES = 2


class Optimiser(NamedTuple):
  count: np.ndarray
  mu: dict


def _host_state(seed: int):
  """A nested host pytree like Trainer.to_host gives: leading device axis."""
  rng = np.random.default_rng(seed)
  keys = jax.random.key_data(
      jax.random.split(jax.random.key(seed), NUM_DEVICES))
  return {
      "params": {"dense": {"kernel": rng.normal(size=(NUM_DEVICES, 3, 4))
                                           .astype(np.float32),
                           "bias": rng.normal(size=(NUM_DEVICES, 4))
                                         .astype(np.float32)}},
      "opt": Optimiser(count=np.full((NUM_DEVICES,), seed, np.int32),
                       mu={"w": rng.normal(size=(NUM_DEVICES, 5))
                                   .astype(np.float32)}),
      "rng": np.asarray(keys),
      "history": (np.arange(NUM_DEVICES * 3, dtype=np.int32)
                  .reshape(NUM_DEVICES, 3) + seed,),
  }


def _zeros_like(tree):
  return jax.tree.map(np.zeros_like, tree)


def test_round_trip_keeps_structure_values_and_dtypes(tmp_path):
  state = _host_state(3)
  assert state["rng"].dtype == np.uint32
  with checkpointing.Checkpointer(str(tmp_path / "ck")) as ckpt:
    ckpt.save(7, state)
    restored = ckpt.restore(7, like=_zeros_like(state))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert isinstance(got, np.ndarray)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_latest_step_and_reopening(tmp_path):
  directory = str(tmp_path / "ck")
  with checkpointing.Checkpointer(directory) as ckpt:
    assert ckpt.latest_step() is None
    for step in (0, 10, 20):
      ckpt.save(step, _host_state(step))
    assert ckpt.latest_step() == 20
  with checkpointing.Checkpointer(directory) as reopened:
    assert reopened.all_steps() == [0, 10, 20]
    restored = reopened.restore(10, like=_zeros_like(_host_state(0)))
  np.testing.assert_array_equal(restored["history"][0],
                                _host_state(10)["history"][0])


def test_max_to_keep_deletes_oldest(tmp_path):
  with checkpointing.Checkpointer(str(tmp_path / "ck"), max_to_keep=2) as ckpt:
    for step in range(1, 5):
      ckpt.save(step, _host_state(step))
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [3, 4]
    with pytest.raises(ValueError, match="no checkpoint 1"):
      ckpt.restore(1, like=_zeros_like(_host_state(0)))
    np.testing.assert_array_equal(
        ckpt.restore(3, like=_zeros_like(_host_state(0)))["opt"].count,
        np.full((NUM_DEVICES,), 3, np.int32))


def test_mismatched_like_is_a_clear_error(tmp_path):
  state = _host_state(1)
  with checkpointing.Checkpointer(str(tmp_path / "ck")) as ckpt:
    ckpt.save(1, state)
    # Another device count: same names, another leading axis.
    wrong_shape = jax.tree.map(lambda x: np.zeros((1,) + x.shape[1:], x.dtype),
                               state)
    with pytest.raises(ValueError, match="expected"):
      ckpt.restore(1, like=wrong_shape)
    wrong_dtype = dict(state, rng=state["rng"].astype(np.int32))
    with pytest.raises(ValueError, match="'rng'"):
      ckpt.restore(1, like=wrong_dtype)
    extra_leaf = dict(state, extra=np.zeros((NUM_DEVICES,), np.float32))
    with pytest.raises(ValueError, match="missing"):
      ckpt.restore(1, like=extra_leaf)


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="max_to_keep"):
    checkpointing.Checkpointer(str(tmp_path / "a"), max_to_keep=0)
  with checkpointing.Checkpointer(str(tmp_path / "b")) as ckpt:
    ckpt.save(2, _host_state(0))
    with pytest.raises(ValueError, match="already exists"):
      ckpt.save(2, _host_state(0))
    with pytest.raises(ValueError, match="step"):
      ckpt.save(-1, _host_state(0))


# ----------------------------------------------------------- verification ---


def _data_files(directory, step):
  """The array data files orbax wrote for `step` (largest first)."""
  import os
  files = []
  for root, _, names in os.walk(os.path.join(directory, str(step))):
    files += [os.path.join(root, n) for n in names
              if os.sep + "d" + os.sep in os.path.join(root, n) + os.sep
              or os.path.basename(root) == "d"]
  return sorted(files, key=os.path.getsize, reverse=True)


def _three_checkpoints(tmp_path):
  directory = str(tmp_path / "ckpt")
  with checkpointing.Checkpointer(directory) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, _host_state(step))
  return directory


def test_every_checkpoint_gets_a_checksum_that_restore_verifies(tmp_path):
  directory = _three_checkpoints(tmp_path)
  with checkpointing.Checkpointer(directory) as ckpt:
    step, tree = ckpt.restore_latest(_zeros_like(_host_state(0)))
  assert step == 3
  want = _host_state(3)
  for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
  assert checkpointing.tree_digest(tree) == checkpointing.tree_digest(want)
  assert checkpointing.tree_digest(tree) != checkpointing.tree_digest(
      _host_state(2))


def test_flipped_bytes_fall_back_to_the_previous_checkpoint(tmp_path):
  directory = _three_checkpoints(tmp_path)
  # Flip bytes in every data file of the newest step.
  files = _data_files(directory, 3)
  assert files
  for path in files:
    with open(path, "r+b") as f:
      data = bytearray(f.read())
      for i in range(0, len(data), 7):
        data[i] ^= 0x5A
      f.seek(0)
      f.write(data)
  warnings = []
  with checkpointing.Checkpointer(directory) as ckpt:
    with pytest.raises(checkpointing.CorruptCheckpointError):
      ckpt.restore(3, _zeros_like(_host_state(0)))
    step, tree = ckpt.restore_latest(_zeros_like(_host_state(0)),
                                     warn=warnings.append)
  assert step == 2
  assert len(warnings) == 1 and "checkpoint 3" in warnings[0]
  for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(_host_state(2))):
    np.testing.assert_array_equal(a, b)


def test_missing_checksum_or_deleted_data_is_skipped(tmp_path):
  import os
  import shutil
  directory = _three_checkpoints(tmp_path)
  os.remove(os.path.join(directory, "3", checkpointing.CHECKSUM_FILE))
  shutil.rmtree(os.path.join(directory, "2", "default"))
  warnings = []
  with checkpointing.Checkpointer(directory) as ckpt:
    step, _ = ckpt.restore_latest(_zeros_like(_host_state(0)),
                                  warn=warnings.append)
  assert step == 1
  assert [w.split(":")[0] for w in warnings] == ["skipping checkpoint 3",
                                                 "skipping checkpoint 2"]
  assert all("\n" not in w for w in warnings)


def test_no_usable_checkpoint_is_one_error(tmp_path):
  import os
  directory = _three_checkpoints(tmp_path)
  for step in (1, 2, 3):
    os.remove(os.path.join(directory, str(step), checkpointing.CHECKSUM_FILE))
  with checkpointing.Checkpointer(directory) as ckpt:
    with pytest.raises(checkpointing.CorruptCheckpointError,
                       match="no usable checkpoint"):
      ckpt.restore_latest(_zeros_like(_host_state(0)))
  empty = str(tmp_path / "empty")
  with checkpointing.Checkpointer(empty) as ckpt:
    with pytest.raises(checkpointing.CorruptCheckpointError):
      ckpt.restore_latest({"x": np.zeros(1)})


def test_non_finite_checkpoint_is_skipped_by_restore_latest(tmp_path):
  directory = str(tmp_path / "ckpt")
  good, bad = _host_state(1), _host_state(2)
  bad["params"]["dense"]["bias"][0, 1] = np.nan
  with checkpointing.Checkpointer(directory) as ckpt:
    ckpt.save(1, good)
    ckpt.save(2, bad)
  with checkpointing.Checkpointer(directory) as ckpt:
    assert ckpt.restore_latest(_zeros_like(good))[0] == 1
    # The data itself is intact: restore without the finite check reads it.
    tree = ckpt.restore(2, _zeros_like(good))
    assert np.isnan(tree["params"]["dense"]["bias"][0, 1])

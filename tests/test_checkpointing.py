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

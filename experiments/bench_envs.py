"""Environment throughput: steps per second of vmapped envs in a jitted scan.

For each env and batch size, one jitted function runs `--num_steps` steps of
`num_envs` vmapped envs with uniformly random actions inside a `lax.scan`.
Each step's rewards and observations are summed into the scan's output, so
that the observation is computed as a trainer would need it (were it unused,
XLA would drop its computation; `--nouse_observations` measures that).
Compile time is measured apart (first call); the reported rate is the median
over `--repeats` timed calls (after one warm-up), each ended by
`block_until_ready`. Prints a Markdown table and the machine.

    python experiments/bench_envs.py            # full run
    python experiments/bench_envs.py --quick    # smoke run (a few seconds)
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Callable, Tuple

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from envs import api  # pylint: disable=g-import-not-at-top
from envs import registry  # pylint: disable=g-import-not-at-top
from experiments import bench_utils  # pylint: disable=g-import-not-at-top

_ENVS = flags.DEFINE_list("envs", ["recall", "imaze", "metafetch"],
                          "Environments to benchmark (registry names).")
_NUM_ENVS = flags.DEFINE_list("num_envs", ["1", "40", "1024"],
                              "Numbers of parallel (vmapped) envs.")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 1000,
                                  "Scan length (steps per env per call).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls (median reported).")
_USE_OBSERVATIONS = flags.DEFINE_bool(
    "use_observations", True,
    "Sum the observations into the scan's output (else only the rewards, and "
    "XLA skips computing the observations).")
_QUICK = flags.DEFINE_bool("quick", False,
                           "Smoke run: 100 steps, 2 repeats, 1 and 40 envs.")


def make_runner(env: api.Environment, num_envs: int, num_steps: int,
                use_observations: bool = True
               ) -> Callable[[jax.Array], Tuple]:
  """A jitted key -> final states: num_steps random steps of num_envs envs."""

  def run(key):
    reset_key, action_key = jax.random.split(key)
    states, _ = jax.vmap(env.reset)(jax.random.split(reset_key, num_envs))

    def body(states, key):
      actions = jax.random.randint(key, (num_envs,), 0, env.num_actions)
      states, time_steps = jax.vmap(env.step)(states, actions)
      total = jnp.sum(time_steps.reward)
      if use_observations:
        total += jnp.sum(time_steps.observation)
      return states, total

    states, sums = jax.lax.scan(body, states,
                                jax.random.split(action_key, num_steps))
    return states, sums

  return jax.jit(run)


def benchmark(env: api.Environment, num_envs: int, num_steps: int,
              repeats: int, use_observations: bool = True
             ) -> Tuple[float, float]:
  """Returns (compile seconds, median env steps per second)."""
  runner = make_runner(env, num_envs, num_steps, use_observations)
  key = jax.random.PRNGKey(0)
  start = time.perf_counter()
  compiled = runner.lower(key).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(key))  # Warm-up.
  durations = []
  for i in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(jax.random.PRNGKey(i + 1)))
    durations.append(time.perf_counter() - start)
  return compile_s, num_envs * num_steps / statistics.median(durations)


def main(argv):
  del argv
  num_steps, repeats = _NUM_STEPS.value, _REPEATS.value
  batch_sizes = [int(n) for n in _NUM_ENVS.value]
  if _QUICK.value:
    num_steps, repeats = 100, 2
    batch_sizes = [n for n in batch_sizes if n <= 40] or [1]
  if num_steps < 1 or repeats < 1 or min(batch_sizes) < 1:
    raise app.UsageError("num_steps, repeats and num_envs must be >= 1")
  envs = {name: registry.make(name) for name in _ENVS.value}
  print(bench_utils.machine_description())
  print(f"{num_steps} steps per call, median of {repeats} calls, "
        f"observations {'used' if _USE_OBSERVATIONS.value else 'unused'}\n")
  print("| env | num_envs | compile s | steps/s |")
  print("|---|---:|---:|---:|")
  for name, env in envs.items():
    for num_envs in batch_sizes:
      compile_s, rate = benchmark(env, num_envs, num_steps, repeats,
                                  _USE_OBSERVATIONS.value)
      print(f"| {name} | {num_envs} | {compile_s:.2f} | {rate:,.0f} |",
            flush=True)


if __name__ == "__main__":
  app.run(main)

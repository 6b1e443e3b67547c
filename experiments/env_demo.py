"""Plays an episode of an environment and prints its text renders.

    python experiments/env_demo.py --env=imaze --steps=20
    python experiments/env_demo.py --env=imaze --policy=scripted
    python experiments/env_demo.py --env=metafetch --env_args=size=5,num_objects=2
    python experiments/env_demo.py --env=my_package.my_env:make

The random policy draws uniform actions; the scripted one (I-Maze only) walks
the shortest path to the cued goal.
"""
from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ald_jax import config as config_lib  # pylint: disable=g-import-not-at-top
from envs import api  # pylint: disable=g-import-not-at-top
from envs import registry  # pylint: disable=g-import-not-at-top
from envs.imaze import IMaze  # pylint: disable=g-import-not-at-top

_ENV = flags.DEFINE_string("env", "imaze", "Built-in env name (recall|imaze|"
                           "metafetch) or 'package.module:factory'.")
_ENV_ARGS = flags.DEFINE_string(
    "env_args", "", "Comma-separated key=value constructor arguments, as for "
    "run.py, e.g. 'corridor_length=8'.")
_STEPS = flags.DEFINE_integer("steps", 20, "Number of steps to play.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_POLICY = flags.DEFINE_enum("policy", "random", ["random", "scripted"],
                            "Action choice (scripted: I-Maze only).")


def scripted_imaze_actions(env: IMaze, cue: int) -> list[int]:
  """Shortest path to the cued goal: south, then W (goal A) or E (goal B)."""
  return [2] * (env.corridor_length + 1) + [3 if cue == 0 else 1]


def main(argv):
  del argv
  if _STEPS.value < 1:
    raise app.UsageError(f"--steps must be >= 1, got {_STEPS.value}")
  try:
    env = registry.make(_ENV.value,
                        **config_lib.parse_env_args(_ENV_ARGS.value))
    api.check_environment(env)
  except (ValueError, TypeError) as err:
    raise app.UsageError(f"--env={_ENV.value} --env_args={_ENV_ARGS.value!r}: "
                         f"{err}") from err
  if _POLICY.value == "scripted" and not isinstance(env, IMaze):
    raise app.UsageError("--policy=scripted is only defined for --env=imaze")
  reset, step = jax.jit(env.reset), jax.jit(env.step)
  rng = np.random.default_rng(_SEED.value)
  state, time_step = reset(jax.random.PRNGKey(_SEED.value))
  plan = []
  for t in range(_STEPS.value + 1):
    print(env.render(state))
    if bool(time_step.last()):
      print(f"episode over: discount {float(time_step.discount):.0f}, "
            f"success {bool(env.success(state))}")
    print()
    if t == _STEPS.value:
      break
    starting = int(time_step.step_type) == api.StepType.FIRST
    if starting and _POLICY.value == "scripted":
      plan = scripted_imaze_actions(env, int(state.cue))
    action = plan.pop(0) if plan else int(rng.integers(env.num_actions))
    print(f"action {action}")
    state, time_step = step(state, np.int32(action))


if __name__ == "__main__":
  app.run(main)

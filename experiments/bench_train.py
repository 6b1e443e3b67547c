"""Training throughput of the four agents at equal batch and model sizes.

For each agent (lstm, gtrxl, asym, ald) on I-Maze, with the same env batch,
segment length and model sizes, measures:

* compile time (the first `train_iteration`, reported apart);
* env steps per second of the full jitted iteration (median over timed
  iterations after warm-up, each blocked on);
* the time of each part of the iteration, run as separate jitted functions:
  rollout (acting), learner update (RL loss + regulariser, fwd + bwd) and
  distillation (ald's K actor minibatch steps), and their shares of the sum.

The default GTrXL (4 layers, width 256, memory 64) is one where acting with it
dominates the `gtrxl` agent's iteration. Prints Markdown tables and the ratios
asked of ALD: ald / lstm and ald / gtrxl env steps per second, measured in
this one run.

    python experiments/bench_train.py            # default sizes (minutes)
    python experiments/bench_train.py --quick    # smoke run (tiny models)
"""
import os
import statistics
import sys
import time
from typing import Callable, Dict, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("NPROC", "4")  # XLA CPU collective deadlock workaround

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

from ald_jax import agents  # pylint: disable=wrong-import-position
from ald_jax import training  # pylint: disable=wrong-import-position
from ald_jax.config import Config  # pylint: disable=wrong-import-position
from envs import registry  # pylint: disable=wrong-import-position
from experiments import bench_utils  # pylint: disable=wrong-import-position

# 'ald_stored' is ald with --distill_targets=stored.
_VARIANTS = {**{agent: {} for agent in agents.AGENTS},
             "ald_stored": {"agent": "ald", "distill_targets": "stored"}}
_AGENTS = flags.DEFINE_list("agents", list(_VARIANTS), "Agents to measure "
                            f"(of {', '.join(_VARIANTS)}).")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed iterations per agent.")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny models, 3 repeats.")
_NUM_ENVS = flags.DEFINE_integer("num_envs", 32, "Parallel envs.")
_UNROLL = flags.DEFINE_integer("unroll_length", 20, "Segment length T.")
_CORRIDOR = flags.DEFINE_integer("corridor_length", 8, "I-Maze corridor.")
_LAYERS = flags.DEFINE_integer("gtrxl_layers", 4, "GTrXL layers.")
_WIDTH = flags.DEFINE_integer("gtrxl_d_model", 256, "GTrXL width.")
_MEMORY = flags.DEFINE_integer("gtrxl_memory_len", 64, "GTrXL memory.")
_LSTM = flags.DEFINE_integer("lstm_hidden", 128, "LSTM units.")
_K = flags.DEFINE_integer("distill_steps_per_rl_step", 2, "ald's K.")


def _median_seconds(function: Callable[[], object], repeats: int) -> float:
  durations = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(function())
    durations.append(time.perf_counter() - start)
  return statistics.median(durations)


def measure(config: Config, repeats: int) -> Dict[str, float]:
  """Compile time, iteration time and per-phase times of one agent."""
  env = registry.make("imaze", corridor_length=_CORRIDOR.value)
  trainer = training.make_trainer(config, env)
  state = trainer.init()
  start = time.perf_counter()
  state, metrics = trainer.train_iteration(state)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  for _ in range(2):  # Warm-up; fills ald's replay.
    state, metrics = trainer.train_iteration(state)
  jax.block_until_ready(metrics)

  holder = {"state": state}

  def one_iteration():
    holder["state"], out = trainer.train_iteration(holder["state"])
    return out

  result = {"compile_s": compile_s,
            "iteration_s": _median_seconds(one_iteration, repeats)}
  state = holder["state"]
  # The parts, each jitted on its own (compiled once before timing).
  phases = trainer.phases
  _, segment = jax.block_until_ready(phases["rollout"](state))
  timed = {
      "rollout": lambda: phases["rollout"](state),
      "learner_update": lambda: phases["learner_update"](state, segment),
  }
  if "distillation" in phases:
    timed["distillation"] = lambda: phases["distillation"](state)
  for name, function in timed.items():
    jax.block_until_ready(function())  # Compile.
    result[f"{name}_s"] = _median_seconds(function, repeats)
  result["env_steps_per_s"] = trainer.env_steps_per_iteration / result[
      "iteration_s"]
  return result


def tables(results: Dict[str, Dict[str, float]]) -> Sequence[str]:
  lines = ["| agent | compile s | iteration ms | env steps/s | rollout | "
           "learner update | distillation |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for agent, r in results.items():
    parts = {k: r.get(f"{k}_s", 0.0)
             for k in ("rollout", "learner_update", "distillation")}
    total = sum(parts.values())
    share = lambda k: (f"{1e3 * parts[k]:.1f} ms ({100 * parts[k] / total:.0f}%)"  # noqa: E731
                       if parts[k] else "-")
    lines.append(f"| {agent} | {r['compile_s']:.1f} | "
                 f"{1e3 * r['iteration_s']:.1f} | {r['env_steps_per_s']:,.0f} | "
                 f"{share('rollout')} | {share('learner_update')} | "
                 f"{share('distillation')} |")
  rate = {a: r["env_steps_per_s"] for a, r in results.items()}
  lines.append("")
  for ald in ("ald", "ald_stored"):
    for other in ("lstm", "gtrxl", "asym"):
      if ald in rate and other in rate:
        lines.append(f"{ald} / {other} env steps/s: "
                     f"{rate[ald] / rate[other]:.2f}x")
  return lines


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # rlax logs at INFO while tracing
  repeats = 3 if _QUICK.value else _REPEATS.value
  sizes = dict(num_envs=_NUM_ENVS.value, unroll_length=_UNROLL.value,
               lstm_hidden=_LSTM.value, gtrxl_layers=_LAYERS.value,
               gtrxl_heads=4, gtrxl_d_model=_WIDTH.value,
               gtrxl_mlp_width=2 * _WIDTH.value,
               gtrxl_memory_len=_MEMORY.value, encoder_hidden=128,
               distill_steps_per_rl_step=_K.value, replay_segments=4)
  if _QUICK.value:
    sizes.update(num_envs=8, unroll_length=8, lstm_hidden=16, gtrxl_layers=1,
                 gtrxl_heads=2, gtrxl_d_model=16, gtrxl_mlp_width=16,
                 gtrxl_memory_len=4, encoder_hidden=16)
  print(bench_utils.machine_description())
  print(f"I-Maze corridor {_CORRIDOR.value}; sizes {sizes}; median of "
        f"{repeats} iterations\n", flush=True)
  results = {}
  unknown = set(_AGENTS.value) - set(_VARIANTS)
  if unknown:
    raise app.UsageError(f"--agents: unknown {sorted(unknown)}")
  for agent in _AGENTS.value:
    config = Config(**{"agent": agent, "env": "imaze",
                       "total_env_steps": 10**9, "num_devices": 1, **sizes,
                       **_VARIANTS[agent]})
    results[agent] = measure(config, repeats)
    print(f"{agent}: {results[agent]['env_steps_per_s']:,.0f} env steps/s",
          file=sys.stderr, flush=True)
  print("\n".join(tables(results)))


if __name__ == "__main__":
  app.run(main)

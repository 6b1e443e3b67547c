r"""Throughput of the distributed runtime: lstm, gtrxl and ald vs num_actors.

Two regimes, both on I-Maze with a 4-layer 256-wide GTrXL (memory 64) and a
256-unit LSTM:

* A, actor-latency constrained (the paper's): `--actor_inference=per_env`,
  each actor steps its env streams one at a time at batch 1 (the cost of that
  many one-env actor processes).
* B, vectorised: `--actor_inference=batched`, 32 envs per actor in one call.

Each (regime, agent, num_actors) is one `train_distributed` run on a fresh
local Ray instance: after the learner's second update (everything compiled)
the driver's counters are sampled for `--measure_seconds`; the rate is the
env steps the learner received (consumed + dropped) per second over that
window ("received": consumed + dropped for lag; "trained on": learner
updates x batch). The learner batch is one actor segment (`num_envs = envs_per_actor`)
whatever num_actors, so more actors can only add acting capacity. Prints
Markdown tables and the ratios ald/gtrxl and ald/lstm, all from this one run.

    python experiments/bench_distributed.py                 # ~20-30 min on 2 cores
    python experiments/bench_distributed.py --quick         # smoke run (tiny models)
    python experiments/bench_distributed.py --regimes=A --num_actors=1,2,4
"""
import io
import os
import sys
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("NPROC", "4")  # XLA CPU collective deadlock workaround

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging

from ald_jax import distributed
from ald_jax.config import Config
from envs import registry
from experiments import bench_utils
# pylint: enable=g-import-not-at-top,wrong-import-position

_REGIMES = flags.DEFINE_list("regimes", ["A", "B"], "A: per_env actors "
                             "(16 streams each); B: batched (32 each).")
_AGENTS = flags.DEFINE_list("agents", ["lstm", "gtrxl", "ald"], "Agents.")
_ACTORS = flags.DEFINE_list("num_actors", ["1", "2"], "Actor counts.")
_SECONDS = flags.DEFINE_float("measure_seconds", 30.0, "Measured window "
                              "after the learner's second update.")
_TIMEOUT = flags.DEFINE_float("timeout_seconds", 600.0, "Give up on a run "
                              "(compilation included) after this long.")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny models, short windows.")
_K = flags.DEFINE_integer("distill_steps_per_rl_step", 2, "ald's K.")
_DISTILLERS = flags.DEFINE_integer("num_distillers", 1, "ald's distillers.")

REGIMES = {"A": dict(actor_inference="per_env", envs_per_actor=16),
           "B": dict(actor_inference="batched", envs_per_actor=32)}


class _Enough(Exception):
  """Raised from the poll hook to end a run once it has been measured."""


def measure(config: Config, seconds: float, timeout: float) -> Dict[str, float]:
  """Steady-state env steps/s (and per-role rates) of one distributed run."""
  env = registry.make("imaze", corridor_length=4)
  samples: List[tuple] = []
  start = time.monotonic()

  def on_poll(info):
    now = time.monotonic()
    if info["iteration"] >= 2:
      samples.append((now, info["env_steps"], info["iteration"],
                      info["distill_steps"], info["dropped_segments"]))
      if now - samples[0][0] >= seconds:
        raise _Enough()
    if now - start > timeout:
      raise _Enough()

  try:
    distributed.train_distributed(config, env, stream=io.StringIO(),
                                  on_poll=on_poll)
  except _Enough:
    pass
  if len(samples) < 2:
    return {"env_steps_per_s": float("nan"), "updates_per_s": float("nan"),
            "consumed_per_s": float("nan"),
            "distill_per_s": float("nan"), "dropped": float("nan"),
            "startup_s": time.monotonic() - start}
  (t0, s0, u0, d0, _), (t1, s1, u1, d1, dropped) = samples[0], samples[-1]
  dt = t1 - t0
  batch_steps = config.num_envs * config.unroll_length
  return {"env_steps_per_s": (s1 - s0) / dt, "updates_per_s": (u1 - u0) / dt,
          "consumed_per_s": (u1 - u0) * batch_steps / dt,
          "distill_per_s": (d1 - d0) / dt, "dropped": float(dropped),
          "startup_s": t0 - start}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  sizes = dict(env="imaze", env_args="corridor_length=4", unroll_length=20,
               encoder_hidden=128, lstm_hidden=256, gtrxl_layers=4,
               gtrxl_heads=4, gtrxl_d_model=256, gtrxl_mlp_width=512,
               gtrxl_memory_len=64, replay_segments=4,
               distill_steps_per_rl_step=_K.value,
               num_distillers=_DISTILLERS.value)
  seconds = _SECONDS.value
  if _QUICK.value:
    sizes.update(unroll_length=8, encoder_hidden=16, lstm_hidden=16,
                 gtrxl_layers=1, gtrxl_heads=2, gtrxl_d_model=16,
                 gtrxl_mlp_width=16, gtrxl_memory_len=4)
    seconds = min(seconds, 5.0)
  print(bench_utils.machine_description())
  print(f"sizes {sizes}; window {seconds:.0f} s after the 2nd learner update\n",
        flush=True)
  results: Dict[tuple, Dict[str, float]] = {}
  for regime in _REGIMES.value:
    for agent in _AGENTS.value:
      for actors in (int(n) for n in _ACTORS.value):
        spec = REGIMES[regime]
        config = Config(**{**sizes, **spec, "agent": agent,
                           "runtime": "distributed", "num_actors": actors,
                           "num_envs": spec["envs_per_actor"],
                           "total_env_steps": 10**9,
                           "log_every_seconds": 1e9,
                           "checkpoint_every_iterations": 0,
                           "logdir": f"/tmp/bench_distributed/{regime}-"
                                     f"{agent}-{actors}"}).validate()
        result = measure(config, seconds, _TIMEOUT.value)
        results[(regime, agent, actors)] = result
        print(f"{regime} {agent} actors={actors}: "
              f"{result['env_steps_per_s']:,.0f} env steps/s "
              f"(startup {result['startup_s']:.0f} s)", file=sys.stderr,
              flush=True)
  for regime in _REGIMES.value:
    spec = REGIMES[regime]
    print(f"\nRegime {regime}: {spec['actor_inference']} acting, "
          f"{spec['envs_per_actor']} env streams per actor, learner batch "
          f"{spec['envs_per_actor']} x {sizes['unroll_length']}\n")
    print("| agent | actors | env steps/s received | env steps/s trained "
          "on | learner updates/s | distill steps/s | dropped segments | "
          "start-up s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for (reg, agent, actors), r in results.items():
      if reg == regime:
        print(f"| {agent} | {actors} | {r['env_steps_per_s']:,.0f} | "
              f"{r['consumed_per_s']:,.0f} | "
              f"{r['updates_per_s']:.2f} | {r['distill_per_s']:.2f} | "
              f"{r['dropped']:.0f} | {r['startup_s']:.0f} |")
    print()
    for actors in (int(n) for n in _ACTORS.value):
      for key, what in (("env_steps_per_s", "received"),
                        ("consumed_per_s", "trained on")):
        rate = {a: results.get((regime, a, actors), {}).get(key)
                for a in ("lstm", "gtrxl", "ald")}
        for other in ("gtrxl", "lstm"):
          if rate["ald"] and rate[other]:
            print(f"- actors={actors}: ald / {other} env steps/s {what} = "
                  f"{rate['ald'] / rate[other]:.2f}x")


if __name__ == "__main__":
  app.run(main)

"""Acting latency and training throughput of the LSTM actor and GTrXL learner.

Measures, on the default JAX backend:

* the jitted `step` latency (median over many calls after warm-up, each call
  blocked on with `block_until_ready`) at batch 1, 16 and 256, for LSTMs of
  64/128/256 units and GTrXLs of 2/4 layers, width 64/256, memory 32/64/128,
  next to the *floor*: a jitted function taking the same (params, state, obs,
  start) arrays and returning state and obs untouched (pure dispatch cost);
* `unroll` forward and forward+backward (gradient of a scalar loss) time for a
  [T=64, B=16] training segment, for the main configurations.

Prints Markdown tables. Usage:

    python experiments/bench_networks.py            # full sweep (minutes)
    python experiments/bench_networks.py --quick    # smoke run (< 1 minute)
"""
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, NamedTuple, Sequence, Tuple

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ald_jax import networks  # pylint: disable=g-import-not-at-top,wrong-import-position

_QUICK = flags.DEFINE_bool("quick", False, "A few configs and repeats only.")
_REPEATS = flags.DEFINE_integer("repeats", 300, "Timed step calls per config "
                                "(after warm-up); --quick uses 20.")

OBSERVATION_SIZE = 32
NUM_ACTIONS = 8
ENCODER_HIDDEN = 128
SEGMENT = (64, 16)  # [T, B] of the training-time unroll


class ModelSpec(NamedTuple):
  """A named model configuration."""
  name: str
  build: Callable[[], networks.RecurrentModel]


def lstm_spec(units: int) -> ModelSpec:
  return ModelSpec(f"LSTM-{units}", lambda: networks.make_lstm_model(
      OBSERVATION_SIZE, NUM_ACTIONS, ENCODER_HIDDEN, units))


def gtrxl_spec(layers: int, width: int, memory: int) -> ModelSpec:
  """GTrXL with 4 heads and an MLP of 4 * width."""
  return ModelSpec(
      f"GTrXL-L{layers}-D{width}-M{memory}",
      lambda: networks.make_gtrxl_model(
          OBSERVATION_SIZE, NUM_ACTIONS, ENCODER_HIDDEN, num_layers=layers,
          num_heads=4, d_model=width, mlp_width=4 * width, memory_len=memory))


def _inputs(model: networks.RecurrentModel, batch_shape: Tuple[int, ...]):
  """(params, state, obs f32 [*batch_shape, O], start bool [*batch_shape])."""
  params = model.init(jax.random.key(0))
  state = model.initial_state(batch_shape[-1])
  obs = jax.random.normal(jax.random.key(1), batch_shape + (OBSERVATION_SIZE,))
  start = jnp.zeros(batch_shape, bool)
  return params, state, obs, start


def _floor(params, state, obs, start):
  del params, start
  return state, obs


def median_call_seconds(function: Callable, params, state, obs, start,
                        repeats: int, carries_state: bool = True) -> float:
  """Median wall time of function(params, state, obs, start) calls, seconds.

  The state argument is donated to `function`, so the returned state (the last
  output) is fed to the next call, as an acting loop would.
  """
  def call(state):
    result = function(params, state, obs, start)
    jax.block_until_ready(result)
    return result[-1] if carries_state else state

  for _ in range(5):  # warm-up, compilation included
    state = call(state)
  durations = []
  for _ in range(repeats):
    begin = time.perf_counter()
    state = call(state)
    durations.append(time.perf_counter() - begin)
  return statistics.median(durations)


def step_latency_table(specs: Sequence[ModelSpec], batches: Sequence[int],
                       repeats: int) -> List[str]:
  """Markdown rows of step latency vs the dispatch floor."""
  floor = jax.jit(_floor, donate_argnums=1)
  rows = ["| model | batch | params | step (us) | floor (us) | step/floor | "
          "step / LSTM-256 step |", "|---|---:|---:|---:|---:|---:|---:|"]
  reference: Dict[int, float] = {}
  results = []
  for spec in specs:
    model = spec.build()
    step = jax.jit(model.step, donate_argnums=1)
    for batch in batches:
      params, _, obs, start = _inputs(model, (batch,))
      step_s = median_call_seconds(step, params, model.initial_state(batch),
                                   obs, start, repeats)
      floor_s = median_call_seconds(floor, params, model.initial_state(batch),
                                    obs, start, repeats)
      if spec.name == "LSTM-256":
        reference[batch] = step_s
      results.append((spec.name, batch, networks.param_count(params), step_s,
                      floor_s))
  for name, batch, count, step_s, floor_s in results:
    versus = (f"{step_s / reference[batch]:.2f}" if batch in reference
              else "n/a")
    rows.append(f"| {name} | {batch} | {count:,} | {step_s * 1e6:.1f} | "
                f"{floor_s * 1e6:.1f} | {step_s / floor_s:.2f} | {versus} |")
  return rows


def unroll_table(specs: Sequence[ModelSpec], repeats: int) -> List[str]:
  """Markdown rows of unroll forward and forward+backward time."""
  rows = [f"| model | unroll fwd [{SEGMENT[0]}, {SEGMENT[1]}] (ms) | "
          "fwd+bwd (ms) |", "|---|---:|---:|"]
  for spec in specs:
    model = spec.build()
    params, state, obs, start = _inputs(model, SEGMENT)

    def loss(params, state, obs, start, model=model):
      outputs, _ = model.unroll(params, state, obs, start)
      logits_term = (0.0 if outputs.logits is None
                     else jnp.mean(jax.nn.log_softmax(outputs.logits)))
      return jnp.mean(outputs.value ** 2) + logits_term

    forward = jax.jit(model.unroll)
    backward = jax.jit(jax.grad(loss))
    forward_s = median_call_seconds(forward, params, state, obs, start, repeats,
                                    carries_state=False)
    backward_s = median_call_seconds(backward, params, state, obs, start,
                                     repeats, carries_state=False)
    rows.append(f"| {spec.name} | {forward_s * 1e3:.2f} | "
                f"{backward_s * 1e3:.2f} |")
  return rows


def main(argv: Sequence[str]) -> None:
  del argv
  quick = _QUICK.value
  repeats = 20 if quick else _REPEATS.value
  if quick:
    step_specs = [lstm_spec(256), gtrxl_spec(2, 64, 32)]
    batches = (1, 16)
    unroll_specs = [lstm_spec(64), gtrxl_spec(2, 64, 32)]
    unroll_repeats = 3
  else:
    step_specs = [lstm_spec(units) for units in (64, 128, 256)] + [
        gtrxl_spec(layers, width, memory) for layers in (2, 4)
        for width in (64, 256) for memory in (32, 64, 128)]
    batches = (1, 16, 256)
    unroll_specs = [lstm_spec(64), lstm_spec(256), gtrxl_spec(2, 64, 32),
                    gtrxl_spec(4, 256, 64)]
    unroll_repeats = 20

  device = jax.devices()[0]
  print(f"# Network benchmark ({device.platform}: {device.device_kind}; "
        f"jax {jax.__version__}; {repeats} timed calls per step cell)\n")
  print("## Jitted `step` latency (median)\n")
  print("\n".join(step_latency_table(step_specs, batches, repeats)))
  print(f"\n## `unroll` on a [{SEGMENT[0]}, {SEGMENT[1]}] segment (median of "
        f"{unroll_repeats})\n")
  print("\n".join(unroll_table(unroll_specs, unroll_repeats)))


if __name__ == "__main__":
  app.run(main)

"""Acting latency and training throughput of the LSTM actor and GTrXL learner.

Measures, on the default JAX backend:

* the jitted `step` latency (median over many calls after warm-up, each call
  blocked on with `block_until_ready`) at batch 1, 16 and 256, for LSTMs of
  64/128/256 units and GTrXLs of 2/4 layers, width 64/256, memory 32/64/128,
  next to the *floor*: a jitted function taking the same (params, state, obs,
  start) arrays and returning state and obs untouched (pure dispatch cost);
* `unroll` forward and forward+backward (gradient of a scalar loss) time for a
  [T=64, B=16] training segment, for the main configurations;
* the GTrXL acting step in three memory forms, timed in the same run with
  their calls interleaved (the machine may be shared: compare the ratios):
  `ring` (the library's `step`: K/V ring buffers written in place), `shift`
  (the K/V cache shifted by concatenate + slice each step, the form before
  the ring) and `recompute` (cached layer inputs, memory K/V re-projected each
  step), for 4 layers x 256 wide, 8 heads, memory 64, at batch 1, 16 and 256.

Prints Markdown tables. Usage:

    python experiments/bench_networks.py            # full sweep (minutes)
    python experiments/bench_networks.py --quick    # smoke run (about a minute)
    python experiments/bench_networks.py --acting_forms_only   # ~2 minutes
    python experiments/bench_networks.py --acting_forms_only \
        --acting_forms=ring,shift                   # ring vs shift alone
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
_ACTING_FORMS_ONLY = flags.DEFINE_bool(
    "acting_forms_only", False, "Only the GTrXL acting-form comparison.")
_ACTING_FORMS = flags.DEFINE_list(
    "acting_forms", ["ring", "shift", "recompute"],
    "GTrXL acting forms to compare (ring first: the ratios are to it).")
_ACTING_BATCHES = flags.DEFINE_list(
    "acting_batches", ["1", "16", "256"], "Batch sizes of the acting-form "
    "comparison; --quick uses 1 and 16.")
_ACTING_REPEATS = flags.DEFINE_integer(
    "acting_repeats", 100, "Interleaved timed rounds (one call of each form) "
    "per batch in the acting-form comparison; --quick uses 20.")

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


# The acting-form comparison: the GTrXL of issue 13's figures.
ACTING_GTRXL = dict(observation_size=OBSERVATION_SIZE, num_actions=NUM_ACTIONS,
                    encoder_hidden=ENCODER_HIDDEN, num_layers=4, num_heads=8,
                    d_model=256, mlp_width=1024, memory_len=64)
ACTING_FORMS = ("ring", "shift", "recompute")


def acting_forms(names: Sequence[str], gtrxl: Dict[str, int]
                 ) -> Dict[str, Tuple[Callable, Callable]]:
  """{name: (initial_state(batch), step)} of the GTrXL acting forms."""
  unknown = set(names) - set(ACTING_FORMS)
  if unknown:
    raise app.UsageError(f"--acting_forms: unknown {sorted(unknown)}; "
                         f"choose from {ACTING_FORMS}")
  model = networks.make_gtrxl_model(**gtrxl)
  references = networks._gtrxl_reference_steps(  # pylint: disable=protected-access
      **gtrxl)
  forms = {"ring": (model.initial_state, model.step), **references}
  return {name: forms[name] for name in names}


def interleaved_medians(calls: Dict[str, Callable[[], None]],
                        rounds: int) -> Dict[str, float]:
  """Median seconds per call of each blocking call, timed round-robin.

  Interleaving spreads the load of other processes on a shared machine
  evenly over the forms, so their ratios hold even when the absolute figures
  drift.
  """
  durations: Dict[str, List[float]] = {name: [] for name in calls}
  for _ in range(rounds):
    for name, call in calls.items():
      begin = time.perf_counter()
      call()
      durations[name].append(time.perf_counter() - begin)
  return {name: statistics.median(d) for name, d in durations.items()}


def acting_forms_table(names: Sequence[str], batches: Sequence[int],
                       rounds: int, gtrxl: Dict[str, int] = ACTING_GTRXL
                       ) -> List[str]:
  """Markdown rows: step latency of each form (ms) and its ratio to the first.

  `gtrxl`: keyword arguments of `networks.make_gtrxl_model`.
  """
  forms = acting_forms(names, gtrxl)
  params = networks.make_gtrxl_model(**gtrxl).init(jax.random.key(0))
  rows = ["| batch | " + " | ".join(f"{n} (ms)" for n in names)
          + "".join(f" | {n} / {names[0]}" for n in names[1:]) + " |",
          "|---:" * (2 * len(names)) + "|"]
  for batch in batches:
    obs = jax.random.normal(jax.random.key(1),
                            (batch, gtrxl["observation_size"]))
    start = jnp.zeros((batch,), bool)
    # Each form carries its own donated state, as an acting loop would.
    carried, calls, values = {}, {}, {}
    for name, (initial_state, step) in forms.items():
      jitted = jax.jit(step, donate_argnums=1)
      carried[name] = initial_state(batch)

      def call(name=name, jitted=jitted):
        out, carried[name] = jitted(params, carried[name], obs, start)
        values[name] = jax.block_until_ready(out.value)
      calls[name] = call
    for _ in range(5):  # warm-up, compilation included; same steps per form
      for call in calls.values():
        call()
    for name in names[1:]:  # the forms compute the same function
      max_diff = float(jnp.max(jnp.abs(values[name] - values[names[0]])))
      if max_diff > 1e-3:
        raise RuntimeError(f"{name} and {names[0]} disagree by {max_diff}")
    medians = interleaved_medians(calls, rounds)
    ring = medians[names[0]]
    rows.append(f"| {batch} | "
                + " | ".join(f"{medians[n] * 1e3:.2f}" for n in names)
                + "".join(f" | {medians[n] / ring:.2f}" for n in names[1:])
                + " |")
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
  forms = _ACTING_FORMS.value
  acting_batches = (1, 16) if quick else tuple(
      int(b) for b in _ACTING_BATCHES.value)
  acting_rounds = 20 if quick else _ACTING_REPEATS.value
  device = jax.devices()[0]
  acting_title = (
      f"## GTrXL acting `step`: memory forms (4 layers x 256, 8 heads, MLP "
      f"1024, memory 64; median of {acting_rounds} interleaved rounds)\n")
  if _ACTING_FORMS_ONLY.value:
    print(f"# Network benchmark ({device.platform}: {device.device_kind}; "
          f"jax {jax.__version__})\n")
    print(acting_title)
    print("\n".join(acting_forms_table(forms, acting_batches, acting_rounds)))
    return
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

  print(f"# Network benchmark ({device.platform}: {device.device_kind}; "
        f"jax {jax.__version__}; {repeats} timed calls per step cell)\n")
  print("## Jitted `step` latency (median)\n")
  print("\n".join(step_latency_table(step_specs, batches, repeats)))
  print(f"\n## `unroll` on a [{SEGMENT[0]}, {SEGMENT[1]}] segment (median of "
        f"{unroll_repeats})\n")
  print("\n".join(unroll_table(unroll_specs, unroll_repeats)))
  print("\n" + acting_title)
  print("\n".join(acting_forms_table(forms, acting_batches, acting_rounds)))


if __name__ == "__main__":
  app.run(main)

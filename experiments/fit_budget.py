r"""Which actor fits a latency budget on this machine?

    python experiments/fit_budget.py --budget_us=200 [--env=imaze \
        --env_args=corridor_length=8] [--batch_size=1]

Measures the acting-step latency of candidate actors for the env's
observation and action sizes (`ald_jax.latency`: median of many steps after
warm-up), as the jitted JAX step and as the exported onnxruntime step (1
thread, what `ald_jax.deploy.ActorPolicy` runs): LSTMs of `--lstm_widths`
units and, for comparison, GTrXLs of `--gtrxl_layers` x `--gtrxl_widths` x
`--gtrxl_memory` (4 heads, MLP 4 x width). Prints a Markdown table and, per
model family and runtime, the largest candidate within the budget (LSTM: by
width; GTrXL: by parameter count). A bad flag exits with status 2 and one
line `fit_budget.py: error: ...`.
"""
import os
import sys
from typing import (Callable, Dict, List, NamedTuple, NoReturn, Optional,
                    Sequence)

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging
# pylint: enable=g-import-not-at-top,wrong-import-position

_BUDGET = flags.DEFINE_float("budget_us", None, "Latency budget of one acting "
                             "step, microseconds (> 0).")
_ENV = flags.DEFINE_string("env", "recall", "Env whose observation and action "
                           "sizes the candidates get (as run.py's --env).")
_ENV_ARGS = flags.DEFINE_string("env_args", "", "Its constructor arguments "
                                "(as run.py's --env_args).")
_BATCH = flags.DEFINE_integer("batch_size", 1, "Rows per acting step.")
_ENCODER = flags.DEFINE_integer("encoder_hidden", 64, "Encoder width of every "
                                "candidate (as run.py's --encoder_hidden).")
_LSTM_WIDTHS = flags.DEFINE_list("lstm_widths", ["32", "64", "128", "256",
                                                 "512"], "LSTM units.")
_GTRXL_LAYERS = flags.DEFINE_list("gtrxl_layers", ["1", "2", "4"],
                                  "GTrXL layers (empty: no GTrXL).")
_GTRXL_WIDTHS = flags.DEFINE_list("gtrxl_widths", ["64", "256"],
                                  "GTrXL d_model values (multiples of 4).")
_GTRXL_MEMORY = flags.DEFINE_list("gtrxl_memory", ["32", "64"],
                                  "GTrXL memory lengths.")
_RUNTIMES = flags.DEFINE_list("runtimes", ["jax", "onnx"],
                              "Runtimes to measure: jax, onnx.")
_CALLS = flags.DEFINE_integer("calls", 300, "Timed steps per measurement.")
_WARMUP = flags.DEFINE_integer("warmup", 30, "Untimed steps first.")

PROGRAM = "fit_budget.py"
GTRXL_HEADS = 4


class Candidate(NamedTuple):
  """family: 'LSTM' or 'GTrXL'; build() -> RecurrentModel."""
  name: str
  family: str
  build: Callable[[], object]


class Row(NamedTuple):
  """One measured candidate; latencies in us (None: not measured)."""
  name: str
  family: str
  params: int
  latency_us: Dict[str, Optional[float]]
  notes: str


def candidates(observation_size: int, num_actions: int, encoder_hidden: int,
               lstm_widths: Sequence[int], gtrxl_layers: Sequence[int],
               gtrxl_widths: Sequence[int], gtrxl_memory: Sequence[int]
               ) -> List[Candidate]:
  """The candidate actors, LSTMs first, each family smallest first."""
  from ald_jax import networks  # pylint: disable=g-import-not-at-top
  out = [Candidate(f"LSTM-{width}", "LSTM",
                   lambda width=width: networks.make_lstm_model(
                       observation_size, num_actions, encoder_hidden, width))
         for width in sorted(lstm_widths)]
  for layers in sorted(gtrxl_layers):
    for width in sorted(gtrxl_widths):
      for memory in sorted(gtrxl_memory):
        out.append(Candidate(
            f"GTrXL-L{layers}-D{width}-M{memory}", "GTrXL",
            lambda layers=layers, width=width, memory=memory:
            networks.make_gtrxl_model(
                observation_size, num_actions, encoder_hidden,
                num_layers=layers, num_heads=GTRXL_HEADS, d_model=width,
                mlp_width=4 * width, memory_len=memory)))
  return out


def largest_fitting(rows: Sequence[Row], family: str, runtime: str,
                    budget_us: float) -> Optional[Row]:
  """The candidate of a family with the most params whose latency fits."""
  fitting = [row for row in rows if row.family == family
             and row.latency_us.get(runtime) is not None
             and row.latency_us[runtime] <= budget_us]
  return max(fitting, key=lambda row: row.params, default=None)


def format_table(rows: Sequence[Row], runtimes: Sequence[str],
                 budget_us: float) -> List[str]:
  names = {"jax": "jitted JAX", "onnx": "onnxruntime"}
  header = "| model | params | " + " | ".join(
      f"{names[r]} (us) | fits" for r in runtimes) + " | notes |"
  lines = [header, "|---|---:|" + "---:|:---:|" * len(runtimes) + "---|"]
  for row in rows:
    cells = []
    for runtime in runtimes:
      value = row.latency_us.get(runtime)
      if value is None:
        cells += ["-", "-"]
      else:
        cells += [f"{value:.1f}", "yes" if value <= budget_us else "no"]
    lines.append(f"| {row.name} | {row.params:,} | " + " | ".join(cells)
                 + f" | {row.notes} |")
  return lines


def verdict_lines(rows: Sequence[Row], runtimes: Sequence[str],
                  budget_us: float, batch_size: int) -> List[str]:
  names = {"jax": "jitted JAX", "onnx": "exported (onnxruntime)"}
  lines = []
  for family in ("LSTM", "GTrXL"):
    if not any(row.family == family for row in rows):
      continue
    for runtime in runtimes:
      best = largest_fitting(rows, family, runtime, budget_us)
      what = (f"{best.name} ({best.latency_us[runtime]:.1f} us)" if best
              else "none of the candidates")
      lines.append(f"largest {family} within {budget_us:g} us at batch "
                   f"{batch_size}, {names[runtime]}: {what}")
  return lines


def _exit_with_error(message: str) -> NoReturn:
  print(f"{PROGRAM}: error: {' '.join(str(message).split())}",
        file=sys.stderr, flush=True)
  sys.exit(2)


def _ints(flag, minimum: int = 1) -> List[int]:
  try:
    values = [int(v) for v in flag.value]
  except ValueError:
    _exit_with_error(f"--{flag.name}: must be integers (got "
                     f"{','.join(flag.value)})")
  if any(v < minimum for v in values):
    _exit_with_error(f"--{flag.name}: must be >= {minimum} (got {values})")
  return values


def _parse_flags_or_exit(argv: List[str]) -> List[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as err:
    _exit_with_error(err)


def main(argv: Sequence[str]) -> None:
  logging.set_verbosity(logging.WARNING)  # jax2onnx logs every conversion
  if len(argv) > 1:
    _exit_with_error(f"unexpected positional arguments {argv[1:]}")
  if _BUDGET.value is None or not _BUDGET.value > 0:
    _exit_with_error(f"--budget_us: must be > 0 (got {_BUDGET.value})")
  for flag in (_BATCH, _CALLS, _ENCODER):
    if flag.value < 1:
      _exit_with_error(f"--{flag.name}: must be >= 1 (got {flag.value})")
  runtimes = list(dict.fromkeys(_RUNTIMES.value))
  if not runtimes or any(r not in ("jax", "onnx") for r in runtimes):
    _exit_with_error(f"--runtimes: must be jax and/or onnx (got "
                     f"{','.join(_RUNTIMES.value)})")
  widths = _ints(_GTRXL_WIDTHS)
  if any(w % GTRXL_HEADS for w in widths):
    _exit_with_error(f"--gtrxl_widths: must be multiples of {GTRXL_HEADS} "
                     f"heads (got {widths})")
  lstm_widths, layers, memory = (_ints(_LSTM_WIDTHS), _ints(_GTRXL_LAYERS),
                                 _ints(_GTRXL_MEMORY))
  # pylint: disable=g-import-not-at-top
  from ald_jax import config as config_lib
  from envs import registry
  # pylint: enable=g-import-not-at-top
  try:
    env = registry.make(_ENV.value,
                        **config_lib.parse_env_args(_ENV_ARGS.value))
  except (ValueError, TypeError) as err:
    _exit_with_error(f"--env/--env_args: {err}")
  # pylint: disable=g-import-not-at-top
  import jax
  from ald_jax import export
  from ald_jax import latency
  from ald_jax import networks
  from experiments import bench_utils
  # pylint: enable=g-import-not-at-top
  if "onnx" in runtimes and not latency.onnx_available():
    _exit_with_error("--runtimes: onnx needs jax2onnx and onnxruntime "
                     "installed")
  print(f"# Actors within {_BUDGET.value:g} us per step at batch "
        f"{_BATCH.value} ({_ENV.value}: observation {env.observation_size}, "
        f"{env.num_actions} actions; {bench_utils.machine_description()}; "
        f"median of {_CALLS.value} steps)\n", flush=True)
  rows = []
  for candidate in candidates(env.observation_size, env.num_actions,
                              _ENCODER.value, lstm_widths,
                              layers, widths,
                              memory):
    model = candidate.build()
    params = model.init(jax.random.key(0))
    measured, notes = {}, []
    for runtime in runtimes:
      try:
        measured[runtime] = latency.measure_step_latency_us(
            model, params, _BATCH.value, runtime=runtime, calls=_CALLS.value,
            warmup=_WARMUP.value,
            observation_size=env.observation_size)["median_us"]
      except export.ConversionError as err:
        measured[runtime] = None
        notes.append(f"{runtime}: not exportable ({str(err)[:80]})")
    rows.append(Row(candidate.name, candidate.family,
                    networks.param_count(params), measured, "; ".join(notes)))
    print(f"  measured {candidate.name}", file=sys.stderr, flush=True)
  print("\n".join(format_table(rows, runtimes, _BUDGET.value)))
  print()
  print("\n".join(verdict_lines(rows, runtimes, _BUDGET.value, _BATCH.value)))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags_or_exit)

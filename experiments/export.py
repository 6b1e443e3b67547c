r"""Exports a trained run's acting model as ONNX, to run without JAX.

    python experiments/export.py --logdir=runs/recall_ald [--out=DIR]

Reads the run's config.json and latest checkpoint (the distilled LSTM for
ald; the acting model of any agent), writes to `--out` (default
`<logdir>/export`):

    policy.onnx   one acting step (observation, start flags, recurrent state
                  -> logits, value, new state), any batch size
    policy.json   observation size, actions, state shapes, env and config,
                  params version (training iteration), sha256 of policy.onnx

Before keeping anything it steps the exported model next to the JAX step over
`--parity_steps` steps of real episodes (logits and values within 1e-5,
identical greedy actions) and, when the run has an eval.json, replays that
greedy evaluation with the exported policy. Load the result with
`ald_jax.deploy.ActorPolicy.load(DIR)` (numpy + onnxruntime only; see
docs/deploy.md). A bad argument or run exits with status 2 and one line
`export.py: error: ...`.
"""
import os
import sys

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)
os.environ.setdefault("NPROC", "4")  # as run.py: XLA's CPU thread pool size

# pylint: disable=g-import-not-at-top,wrong-import-position
from typing import List, NoReturn, Sequence

from absl import app
from absl import flags
from absl import logging
# pylint: enable=g-import-not-at-top,wrong-import-position

_LOGDIR = flags.DEFINE_string("logdir", None, "Run directory written by "
                              "experiments/run.py (config.json, checkpoints/).")
_OUT = flags.DEFINE_string("out", None, "Output directory (default "
                           "<logdir>/export).")
_BATCH_SIZES = flags.DEFINE_list(
    "batch_sizes", [], "Fixed batch sizes to export (one policy_b<B>.onnx "
    "each); empty: one policy.onnx with a symbolic batch dimension.")
_PARITY_STEPS = flags.DEFINE_integer(
    "parity_steps", 500, "Steps of the exported-vs-JAX parity check on real "
    "episodes (0: skip).")
_PARITY_BATCH = flags.DEFINE_integer("parity_batch", 8, "Envs of the parity "
                                     "check.")
_VERIFY_EVAL = flags.DEFINE_bool(
    "verify_eval", True, "Replay the run's greedy evaluation (eval.json) with "
    "the exported policy and report both success rates.")
_LATENCY = flags.DEFINE_bool(
    "latency", True, "Measure the exported step's latency at batch 1 "
    "(onnxruntime, 1 thread) next to the jitted JAX step.")

PROGRAM = "export.py"


def _exit_with_error(message: str) -> NoReturn:
  print(f"{PROGRAM}: error: {' '.join(str(message).split())}",
        file=sys.stderr, flush=True)
  sys.exit(2)


def _parse_flags_or_exit(argv: List[str]) -> List[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as err:
    _exit_with_error(err)


def _flag_error(err: Exception) -> str:
  """'--logdir: ...' from a 'logdir: ...' error."""
  message = " ".join(str(err).split())
  name, sep, reason = message.partition(": ")
  if sep and name in ("logdir", "out", "batch_sizes", "parity_steps",
                      "parity_batch"):
    return f"--{name}: {reason}"
  return message


def _check_flags() -> List[int]:
  """The parsed --batch_sizes; exits on bad flags before importing JAX."""
  if not _LOGDIR.value:
    _exit_with_error("--logdir: required")
  if not os.path.isdir(_LOGDIR.value):
    _exit_with_error(f"--logdir: {_LOGDIR.value} does not exist")
  if _PARITY_STEPS.value < 0:
    _exit_with_error(f"--parity_steps: must be >= 0 (got "
                     f"{_PARITY_STEPS.value})")
  if _PARITY_BATCH.value < 1:
    _exit_with_error(f"--parity_batch: must be >= 1 (got "
                     f"{_PARITY_BATCH.value})")
  try:
    sizes = [int(size) for size in _BATCH_SIZES.value]
  except ValueError:
    _exit_with_error(f"--batch_sizes: must be integers (got "
                     f"{','.join(_BATCH_SIZES.value)})")
  if any(size < 1 for size in sizes):
    _exit_with_error(f"--batch_sizes: must be positive (got {sizes})")
  return sizes


def main(argv: Sequence[str]) -> None:
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs at INFO
  if len(argv) > 1:
    _exit_with_error(f"unexpected positional arguments {argv[1:]}")
  sizes = _check_flags()
  from ald_jax import export  # pylint: disable=g-import-not-at-top
  out_dir = _OUT.value or os.path.join(_LOGDIR.value,
                                       export.DEFAULT_EXPORT_SUBDIR)
  try:
    run = export.load_acting_params(
        _LOGDIR.value, warn=lambda line: print(f"warning: {line}",
                                               file=sys.stderr, flush=True))
    metadata = export.export_run(
        _LOGDIR.value, out_dir, run=run, batch_sizes=sizes or None,
        parity_steps=_PARITY_STEPS.value, parity_batch=_PARITY_BATCH.value,
        verify_eval=_VERIFY_EVAL.value)
  except (ValueError, export.ConversionError) as err:
    _exit_with_error(_flag_error(err))
  for line in export.summary_lines(metadata, out_dir):
    print(line, flush=True)
  if _LATENCY.value:
    from ald_jax import latency  # pylint: disable=g-import-not-at-top
    entries = {m["batch_size"]: m for m in metadata["models"]}
    batch = 1 if (None in entries or 1 in entries) else min(entries)
    entry = entries.get(None, entries.get(batch))
    with open(os.path.join(out_dir, entry["file"]), "rb") as f:
      model_bytes = f.read()
    figures = {
        runtime: latency.measure_step_latency_us(
            run.model, run.params, batch, runtime=runtime,
            observation_size=run.env.observation_size,
            model_bytes=model_bytes if runtime == "onnx" else None
        )["median_us"] for runtime in ("onnx", "jax")}
    print(f"step latency at batch {batch} (median): onnxruntime (1 thread) "
          f"{figures['onnx']:.1f} us, jitted JAX {figures['jax']:.1f} us",
          flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags_or_exit)

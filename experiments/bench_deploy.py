"""Deployed-actor step latency: jitted JAX vs exported onnxruntime, with floors.

For LSTM-64/128/256 (observation 32, 8 actions, encoder 128, as in
bench_networks.py) at batch 1 and 16, in one run:

  (a) the jitted JAX `step` (state donated, blocked on);
  (b) the same step exported with jax2onnx (`ald_jax.export`) run by
      onnxruntime with 1 intra-op thread, batch dimension fixed, as
      `ald_jax.deploy.ActorPolicy` runs it;
  (c) each runtime's floor: a no-op call with the same inputs and outputs (a
      jitted function returning its inputs; an ONNX model of Identity nodes);
  and, to show what the arithmetic costs, the LSTM's two gate matrix
  products alone as an ONNX model (same session options).

Every figure is the median over `--rounds` rounds (interleaved across the
variants, so that load changes on a shared machine hit all of them alike) of
the median of `--calls` calls after warm-up. Prints a Markdown table and the
target check (LSTM-256, batch 1: exported >= 2.5x faster than JAX and within
3x of the onnxruntime floor).

    python experiments/bench_deploy.py            # about 2 minutes
    python experiments/bench_deploy.py --quick    # smoke run
"""
import os
import statistics
import sys
from typing import Callable, Dict, List, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from ald_jax import deploy
from ald_jax import latency
from ald_jax import networks
from experiments import bench_utils
# pylint: enable=g-import-not-at-top,wrong-import-position

_QUICK = flags.DEFINE_bool("quick", False, "LSTM-256 only, few calls.")
_ROUNDS = flags.DEFINE_integer("rounds", 7, "Interleaved rounds per cell.")
_CALLS = flags.DEFINE_integer("calls", 300, "Timed calls per round.")
_THREADS = flags.DEFINE_integer("threads", 1, "onnxruntime intra-op threads.")

OBSERVATION_SIZE = 32
NUM_ACTIONS = 8
ENCODER_HIDDEN = 128
WIDTHS = (64, 128, 256)
BATCHES = (1, 16)
TARGET_SPEEDUP = 2.5
TARGET_FLOOR_RATIO = 3.0


def gate_matmuls_bytes(width: int, batch: int, seed: int = 0) -> bytes:
  """ONNX model: x [B, E] @ Wx [E, 4H] + h [B, H] @ Wh [H, 4H] (the LSTM's
  two gate matmuls, random float32 weights)."""
  # pylint: disable-next=g-import-not-at-top
  from onnx import helper, numpy_helper, TensorProto
  rng = np.random.default_rng(seed)
  kernels = [numpy_helper.from_array(
      rng.standard_normal((rows, 4 * width)).astype(np.float32) * 0.05, name)
             for rows, name in ((ENCODER_HIDDEN, "wx"), (width, "wh"))]
  nodes = [helper.make_node("MatMul", ["x", "wx"], ["gx"]),
           helper.make_node("MatMul", ["h", "wh"], ["gh"]),
           helper.make_node("Add", ["gx", "gh"], ["gates"])]
  graph = helper.make_graph(
      nodes, "gate_matmuls",
      [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                     [batch, ENCODER_HIDDEN]),
       helper.make_tensor_value_info("h", TensorProto.FLOAT, [batch, width])],
      [helper.make_tensor_value_info("gates", TensorProto.FLOAT,
                                     [batch, 4 * width])], kernels)
  return helper.make_model(
      graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def gate_matmuls_stepper(width: int, batch: int, threads: int
                         ) -> Callable[[], None]:
  session = deploy.make_session(gate_matmuls_bytes(width, batch),
                                threads=threads)
  feeds = {"x": np.ones((batch, ENCODER_HIDDEN), np.float32),
           "h": np.ones((batch, width), np.float32)}
  return lambda: session.run(None, feeds)


def interleaved_medians_us(steppers: Dict[str, Callable[[], None]],
                           rounds: int, calls: int) -> Dict[str, float]:
  """Median over rounds of each stepper's per-round median call time."""
  per_round: Dict[str, List[float]] = {name: [] for name in steppers}
  for name, call in steppers.items():  # warm-up (and compile) each once
    latency.time_calls_us(call, calls=1, warmup=20)
  for _ in range(rounds):
    for name, call in steppers.items():
      per_round[name].append(latency.time_calls_us(
          call, calls=calls, warmup=5)["median_us"])
  return {name: statistics.median(values) for name, values in
          per_round.items()}


def measure(width: int, batch: int, rounds: int, calls: int,
            threads: int) -> Dict[str, float]:
  model = networks.make_lstm_model(OBSERVATION_SIZE, NUM_ACTIONS,
                                   ENCODER_HIDDEN, width)
  params = model.init(jax.random.key(0))
  common = dict(batch_size=batch, observation_size=OBSERVATION_SIZE)
  steppers = {
      "jax": latency.jax_stepper(model, params, **common),
      "jax_floor": latency.jax_stepper(model, params, floor=True, **common),
      "onnx": latency.onnx_stepper(model, params, threads=threads, **common),
      "onnx_floor": latency.onnx_stepper(model, params, threads=threads,
                                         floor=True, **common),
      "matmuls": gate_matmuls_stepper(width, batch, threads),
  }
  return interleaved_medians_us(steppers, rounds, calls)


def table(results: Sequence[tuple]) -> List[str]:
  rows = ["| model | batch | JAX step (us) | JAX floor (us) | ONNX step (us) "
          "| ONNX floor (us) | JAX / ONNX | ONNX step / ONNX floor | ONNX gate "
          "matmuls only (us) |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for width, batch, r in results:
    rows.append(
        f"| LSTM-{width} | {batch} | {r['jax']:.1f} | {r['jax_floor']:.1f} | "
        f"{r['onnx']:.1f} | {r['onnx_floor']:.1f} | "
        f"{r['jax'] / r['onnx']:.2f}x | {r['onnx'] / r['onnx_floor']:.2f}x | "
        f"{r['matmuls']:.1f} |")
  return rows


def main(argv: Sequence[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # jax2onnx logs every conversion
  quick = _QUICK.value
  rounds = 2 if quick else _ROUNDS.value
  calls = 50 if quick else _CALLS.value
  widths = (256,) if quick else WIDTHS
  print(f"# Deployed actor step latency ({bench_utils.machine_description()};"
        f" onnxruntime {deploy.ort.__version__}, {_THREADS.value} intra-op "
        f"thread(s); median of {rounds} interleaved rounds x {calls} calls)\n")
  results = [(width, batch, measure(width, batch, rounds, calls,
                                    _THREADS.value))
             for width in widths for batch in BATCHES]
  print("\n".join(table(results)))
  reference = {(w, b): r for w, b, r in results}[(256, 1)]
  speedup = reference["jax"] / reference["onnx"]
  floor_ratio = reference["onnx"] / reference["onnx_floor"]
  print(f"\nLSTM-256, batch 1: exported step {speedup:.2f}x faster than the "
        f"jitted JAX step (target >= {TARGET_SPEEDUP}x: "
        f"{'met' if speedup >= TARGET_SPEEDUP else 'NOT met'}); "
        f"{floor_ratio:.2f}x its runtime's floor (target <= "
        f"{TARGET_FLOOR_RATIO}x: "
        f"{'met' if floor_ratio <= TARGET_FLOOR_RATIO else 'NOT met'}); the "
        f"two gate matmuls alone take {reference['matmuls']:.1f} us "
        f"({reference['matmuls'] / reference['onnx_floor']:.2f}x the floor).")


if __name__ == "__main__":
  app.run(main)

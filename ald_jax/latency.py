"""Acting-step latency: measured, and checked against a budget.

    stats = measure_step_latency_us(model, params, batch_size=1, runtime="onnx")
    check_latency_budget(stats["median_us"], budget_us=200, batch_size=1,
                         runtime="onnx")      # ValueError when over budget

A measurement is the median wall time of many consecutive acting steps after
a warm-up, each step fed the state the previous one returned (as an acting
loop does):

* runtime 'jax': `jax.jit(model.step)` on the default JAX device, the state
  donated, each call blocked on (`jax.block_until_ready`);
* runtime 'onnx': the step exported by `ald_jax.export` (jax2onnx) run by an
  onnxruntime CPU session (`deploy.make_session`: 1 intra-op thread by
  default, the batch dimension fixed to the measured batch), as
  `deploy.ActorPolicy` runs it.

`measure_floor_latency_us` times a no-op call of the same runtime with the
same inputs and outputs (a jitted function returning its inputs; an ONNX
model of Identity nodes): the per-call cost below which no step can go.
`measure_acting_latency(config, env)` measures the acting model a training
config would build (what `--actor_latency_budget_us` checks).
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ald_jax import networks

RUNTIMES = ("jax", "onnx")
DEFAULT_CALLS = 500
DEFAULT_WARMUP = 50

Params = Any
Stepper = Callable[[], None]  # one acting step (state carried inside)


def _check_args(batch_size: int, runtime: str, calls: int, warmup: int
                ) -> None:
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size: must be a positive integer "
                     f"(got {batch_size!r})")
  if runtime not in RUNTIMES:
    raise ValueError(f"runtime: must be one of {', '.join(RUNTIMES)} "
                     f"(got {runtime!r})")
  if calls < 1:
    raise ValueError(f"calls: must be >= 1 (got {calls})")
  if warmup < 0:
    raise ValueError(f"warmup: must be >= 0 (got {warmup})")


def _example_inputs(model: networks.RecurrentModel, observation_size: int,
                    batch_size: int, seed: int):
  """(observation f32 [B, O] ~ N(0, 1), start bool [B] all False, state)."""
  observation = np.random.default_rng(seed).standard_normal(
      (batch_size, observation_size)).astype(np.float32)
  return (observation, np.zeros((batch_size,), bool),
          model.initial_state(batch_size))


def observation_size_of(params: Params) -> int:
  """O: the input width of the observation encoder's kernel in `params`."""
  try:
    return int(params["params"]["encoder"]["dense"]["kernel"].shape[0])
  except (KeyError, TypeError, IndexError, AttributeError):
    raise ValueError("observation_size: cannot read it off the params; pass "
                     "observation_size=") from None


# ------------------------------------------------------------ steppers ---


def jax_stepper(model: networks.RecurrentModel, params: Params,
                batch_size: int, observation_size: int, *, seed: int = 0,
                floor: bool = False) -> Stepper:
  """One jitted acting step per call (compiled on the first call).

  With `floor=True`, a jitted function of the same (params, state, obs,
  start) arguments that returns state and obs untouched (dispatch only).
  """
  observation, start, state = _example_inputs(model, observation_size,
                                              batch_size, seed)
  params = jax.device_put(params)
  observation, start = jnp.asarray(observation), jnp.asarray(start)
  if floor:
    step = jax.jit(lambda p, s, o, f: (s, o), donate_argnums=1)
  else:
    step = jax.jit(lambda p, s, o, f: model.step(p, s, o, f)[::-1],
                   donate_argnums=1)
  carried = [state]

  def call() -> None:
    result = step(params, carried[0], observation, start)
    jax.block_until_ready(result)
    carried[0] = result[0]

  return call


def onnx_stepper(model: networks.RecurrentModel, params: Params,
                 batch_size: int, observation_size: int, *, seed: int = 0,
                 threads: int = 1, floor: bool = False,
                 model_bytes: Optional[bytes] = None) -> Stepper:
  """One onnxruntime acting step per call, state fed back.

  Args:
    model, params, batch_size, observation_size: the acting model.
    seed: of the example observation.
    threads: onnxruntime intra-op threads.
    floor: time an Identity model of the same inputs and outputs instead.
    model_bytes: an already exported step (`export.step_to_onnx`), to skip
      the conversion.
  """
  from ald_jax import deploy  # pylint: disable=g-import-not-at-top
  from ald_jax import export  # pylint: disable=g-import-not-at-top
  signature = export.step_signature(model)
  if floor:
    model_bytes = identity_model_bytes(signature, observation_size)
  elif model_bytes is None:
    model_bytes = export.step_model_bytes(model, params, observation_size,
                                          batch_size)
  session = deploy.make_session(model_bytes, batch_size=batch_size,
                                threads=threads)
  observation, start, state = _example_inputs(model, observation_size,
                                              batch_size, seed)
  state_inputs = [leaf["input"] for leaf in signature.state]
  output_names = [signature.logits, signature.value] + [
      leaf["output"] for leaf in signature.state]
  if floor:
    output_names = [f"{name}_identity" for name in
                    [signature.observation, signature.start] + state_inputs]
  feeds = {signature.observation: observation, signature.start: start}
  feeds.update(zip(state_inputs, (np.asarray(leaf)
                                  for leaf in jax.tree.leaves(state))))

  def call() -> None:
    outputs = session.run(output_names, feeds)
    # The new state is the next step's input (floor: its inputs again).
    feeds.update(zip(state_inputs, outputs[-len(state_inputs):]))

  return call


def identity_model_bytes(signature: Any, observation_size: int) -> bytes:
  """An ONNX model passing the step's inputs through Identity nodes."""
  import onnx  # pylint: disable=g-import-not-at-top
  from onnx import helper  # pylint: disable=g-import-not-at-top
  from ald_jax import deploy  # pylint: disable=g-import-not-at-top
  specs = [(signature.observation, [deploy.BATCH_DIM, observation_size],
            np.float32), (signature.start, [deploy.BATCH_DIM], np.bool_)] + [
                (leaf["input"], [deploy.BATCH_DIM] + list(leaf["shape"]),
                 np.dtype(leaf["dtype"])) for leaf in signature.state]
  inputs, outputs, nodes = [], [], []
  for name, shape, dtype in specs:
    element = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inputs.append(helper.make_tensor_value_info(name, element, shape))
    outputs.append(helper.make_tensor_value_info(f"{name}_identity", element,
                                                 shape))
    nodes.append(helper.make_node("Identity", [name], [f"{name}_identity"]))
  graph = helper.make_graph(nodes, "identity_floor", inputs, outputs)
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
  onnx.checker.check_model(model)
  return model.SerializeToString()


# ------------------------------------------------------------- timing ---


def time_calls_us(call: Stepper, *, calls: int = DEFAULT_CALLS,
                  warmup: int = DEFAULT_WARMUP) -> Dict[str, float]:
  """Wall time of `calls` calls after `warmup` untimed ones, microseconds.

  Returns:
    {'median_us', 'mean_us', 'p10_us', 'p90_us', 'min_us', 'calls',
    'warmup'}.
  """
  for _ in range(max(warmup, 1)):  # at least one: compiles the jitted step
    call()
  durations = np.empty(calls)
  clock = time.perf_counter
  for i in range(calls):
    begin = clock()
    call()
    durations[i] = clock() - begin
  durations *= 1e6
  return {"median_us": float(np.median(durations)),
          "mean_us": float(np.mean(durations)),
          "p10_us": float(np.percentile(durations, 10)),
          "p90_us": float(np.percentile(durations, 90)),
          "min_us": float(np.min(durations)),
          "calls": int(calls), "warmup": int(warmup)}


def _stepper(model, params, batch_size, runtime, observation_size, seed,
             threads, floor) -> Stepper:
  if runtime == "jax":
    return jax_stepper(model, params, batch_size, observation_size, seed=seed,
                       floor=floor)
  return onnx_stepper(model, params, batch_size, observation_size, seed=seed,
                      threads=threads, floor=floor)


def measure_step_latency_us(model: networks.RecurrentModel, params: Params,
                            batch_size: int, *, runtime: str = "jax",
                            calls: int = DEFAULT_CALLS,
                            warmup: int = DEFAULT_WARMUP,
                            observation_size: Optional[int] = None,
                            threads: int = 1, seed: int = 0,
                            model_bytes: Optional[bytes] = None
                            ) -> Dict[str, Any]:
  """Median latency of the acting step of `model` at `batch_size`.

  Args:
    model: a `networks.RecurrentModel` (LSTM or GTrXL).
    params: its params (values do not matter for the timing).
    batch_size: B, rows per step.
    runtime: 'jax' (jitted step) or 'onnx' (exported, onnxruntime).
    calls: timed steps.
    warmup: untimed steps first (compilation, caches).
    observation_size: O; inferred from the encoder's params if None.
    threads: onnxruntime intra-op threads ('onnx' only).
    seed: of the random example observation.
    model_bytes: 'onnx' only: an exported step to time (e.g. the contents
      of an export's policy.onnx) instead of converting `model` afresh.

  Returns:
    `time_calls_us`'s dict plus 'runtime' and 'batch_size'.

  Raises:
    ValueError: a bad argument (one line naming it).
    export.ConversionError: runtime 'onnx' and the model cannot be exported.
  """
  _check_args(batch_size, runtime, calls, warmup)
  if observation_size is None:
    observation_size = observation_size_of(params)
  if runtime == "onnx":
    call = onnx_stepper(model, params, int(batch_size), observation_size,
                        seed=seed, threads=threads, model_bytes=model_bytes)
  else:
    call = jax_stepper(model, params, int(batch_size), observation_size,
                       seed=seed)
  return {"runtime": runtime, "batch_size": int(batch_size),
          **time_calls_us(call, calls=calls, warmup=warmup)}


def measure_floor_latency_us(model: networks.RecurrentModel, params: Params,
                             batch_size: int, *, runtime: str = "jax",
                             calls: int = DEFAULT_CALLS,
                             warmup: int = DEFAULT_WARMUP,
                             observation_size: Optional[int] = None,
                             threads: int = 1, seed: int = 0
                             ) -> Dict[str, Any]:
  """Like `measure_step_latency_us`, for a no-op call of the same runtime."""
  _check_args(batch_size, runtime, calls, warmup)
  if observation_size is None:
    observation_size = observation_size_of(params)
  call = _stepper(model, params, int(batch_size), runtime, observation_size,
                  seed, threads, floor=True)
  return {"runtime": runtime, "batch_size": int(batch_size),
          **time_calls_us(call, calls=calls, warmup=warmup)}


def check_latency_budget(measured_us: float, budget_us: float, *,
                         batch_size: int, runtime: str = "jax") -> None:
  """Raises if a measured step latency is over a budget (0 or less: off).

  Raises:
    ValueError: 'actor_latency_budget_us: acting step takes X us at batch B
      (runtime), over the budget of Y us'.
  """
  if not math.isfinite(measured_us) or measured_us <= 0:
    raise ValueError(f"measured_us: must be a positive finite latency "
                     f"(got {measured_us!r})")
  if budget_us > 0 and measured_us > budget_us:
    raise ValueError(
        f"actor_latency_budget_us: acting step takes {measured_us:.1f} us at "
        f"batch {batch_size} ({runtime}), over the budget of {budget_us:g} us")


def onnx_available() -> bool:
  """Whether the 'onnx' runtime can be measured (jax2onnx + onnxruntime)."""
  try:
    import jax2onnx  # pylint: disable=g-import-not-at-top,unused-import
    import onnxruntime  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def measure_acting_latency(config: Any, env: Any, *,
                           model: Optional[networks.RecurrentModel] = None,
                           batch_size: Optional[int] = None,
                           runtimes: Sequence[str] = RUNTIMES,
                           calls: int = DEFAULT_CALLS,
                           warmup: int = DEFAULT_WARMUP) -> Dict[str, Any]:
  """Step latency of the acting model a training config builds.

  Args:
    config: an `ald_jax.config.Config`.
    env: its environment.
    model: the acting model if already built (`trainer.models[role]`);
      None: built with `training.make_trainer(config, env)` (which compiles
      nothing).
    batch_size: rows per acting step; default the envs one device steps
      (`num_envs / devices`), the batch of the training rollout.
    runtimes: which to measure; 'onnx' is skipped (with a reason) when
      jax2onnx or onnxruntime is not installed or cannot convert the model.
    calls, warmup: as for `measure_step_latency_us`.

  Returns:
    {'acting_model': 'actor'|'learner', 'batch_size': B,
     '<runtime>': measurement dict (or {'skipped': reason}) per runtime}.
  """
  from ald_jax import export  # pylint: disable=g-import-not-at-top
  from ald_jax import training  # pylint: disable=g-import-not-at-top
  role = export.acting_role(config.agent)
  if model is None:
    model = training.make_trainer(config, env).models[role]
  params = model.init(jax.random.key(config.seed))
  if batch_size is None:
    devices = config.num_devices or jax.local_device_count()
    batch_size = max(config.num_envs // devices, 1)
  report: Dict[str, Any] = {"acting_model": role,
                            "model": export.describe_acting_model(config, role),
                            "batch_size": int(batch_size)}
  for runtime in runtimes:
    if runtime == "onnx" and not onnx_available():
      report[runtime] = {"skipped": "jax2onnx/onnxruntime not installed"}
      continue
    try:
      report[runtime] = measure_step_latency_us(
          model, params, batch_size, runtime=runtime, calls=calls,
          warmup=warmup, observation_size=env.observation_size)
    except export.ConversionError as err:
      report[runtime] = {"skipped": " ".join(str(err).split())[:200]}
  return report

"""Deployment, JAX side: load a run's acting model, convert its step to ONNX.

    run = load_acting_params("runs/X")             # config, env, model, params
    proto, signature = step_to_onnx(run.model, run.params,
                                    run.env.observation_size)
    metadata = export_run("runs/X", "runs/X/export")  # the whole export

`deploy.ActorPolicy` runs what this writes with onnxruntime and no JAX.

The ONNX model is the acting model's own `RecurrentModel.step` (traced by
jax2onnx, not a re-implementation), so the exported step computes what
training's rollout computes; `parity_check` measures it on real episodes and
`export_run` refuses to write a model that disagrees with the JAX step.
The batch dimension is symbolic (`deploy.BATCH_DIM`): one file serves every
batch size; a model jax2onnx cannot convert so is exported for fixed batch
sizes instead (`convert_step`).

All reading of checkpoints is in `load_acting_params` (built on
`checkpointing.Checkpointer`'s public `latest_step` / `restore_latest` /
`restore`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import tempfile
from typing import (Any, Callable, Dict, Iterator, NamedTuple, Optional,
                    Sequence, Tuple)

import jax
import jax.numpy as jnp
import numpy as np

from ald_jax import checkpointing
from ald_jax import config as config_lib
from ald_jax import deploy
from ald_jax import networks
from envs import api as env_api
from envs import registry

# The layout experiments/run.py writes into a logdir (kept in step with it;
# nothing in the library imports run.py).
CONFIG_JSON = "config.json"
EVAL_JSON = "eval.json"
CHECKPOINT_SUBDIR = "checkpoints"
EVAL_SEED_OFFSET = 10_000      # run.py evaluates on seed config.seed + this
DEFAULT_EXPORT_SUBDIR = "export"
PARITY_TOLERANCE = 1e-5        # max |logits| and |value| error accepted
OPSET = 17
# Exported when the acting step cannot be exported with a symbolic batch.
DEFAULT_FIXED_BATCH_SIZES = (1,)

Params = Any


class ConversionError(RuntimeError):
  """jax2onnx or onnxruntime cannot handle this model (a tool limitation)."""


class LoadedRun(NamedTuple):
  """A trained run's acting model, ready to step.

  config: the run's Config (from config.json).
  env: the environment it was trained on.
  role: 'actor' (LSTM: agents lstm, asym, ald) or 'learner' (GTrXL: gtrxl).
  model: the acting `networks.RecurrentModel`.
  params: its parameters (numpy, no device axis).
  version: the training iteration of the checkpoint the params come from.
  """
  config: config_lib.Config
  env: env_api.Environment
  role: str
  model: networks.RecurrentModel
  params: Params
  version: int


class StepSignature(NamedTuple):
  """Names and shapes of the exported step's inputs and outputs.

  state: one dict per state leaf: name (its path in the state pytree), input
    and output (ONNX names), shape (without the batch axis), dtype.
  """
  observation: str
  start: str
  logits: str
  value: str
  state: Tuple[Dict[str, Any], ...]


# ------------------------------------------------------------ the run ---


def acting_role(agent: str) -> str:
  """Which model acts for an agent: 'actor' (LSTM) or 'learner' (GTrXL)."""
  from ald_jax import agents  # pylint: disable=g-import-not-at-top
  if agent not in agents.ROLES:
    raise ValueError(f"agent: unknown agent {agent!r}")
  return agents.ROLES[agent].acting


def read_config(logdir: str) -> config_lib.Config:
  """The Config of a run from its config.json.

  Fields the installed Config does not know (a run from a newer ald_jax) are
  ignored; fields it lacks take their defaults.

  Raises:
    ValueError: 'logdir: ...' when the directory or config.json is missing or
      unreadable.
  """
  if not os.path.isdir(logdir):
    raise ValueError(f"logdir: {logdir} does not exist")
  path = os.path.join(logdir, CONFIG_JSON)
  if not os.path.isfile(path):
    raise ValueError(f"logdir: no {CONFIG_JSON} in {logdir} (not a run "
                     f"directory of experiments/run.py)")
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as err:
    raise ValueError(f"logdir: {path} is unreadable ({err})") from None
  known = {field.name for field in dataclasses.fields(config_lib.Config)}
  return config_lib.Config(**{k: v for k, v in saved.items() if k in known})


def build_env(config: config_lib.Config) -> env_api.Environment:
  """The run's environment (`config.env` with `config.env_args`)."""
  return registry.make(config.env, **config_lib.parse_env_args(config.env_args))


def load_acting_params(logdir: str, step: Optional[int] = None, *,
                       warn: Callable[[str], None] = lambda line: None
                       ) -> LoadedRun:
  """Loads the acting model's params from a run's checkpoint.

  Args:
    logdir: a run directory written by experiments/run.py.
    step: the checkpoint (training iteration) to load; None: the latest one
      that verifies.
    warn: called with one line for each newer checkpoint skipped as corrupt.

  Returns:
    A `LoadedRun`.

  Raises:
    ValueError: one line ('logdir: ...') when the run has no config or no
      checkpoint, or the checkpoint does not fit the config (e.g. it was
      trained on another number of devices: run with
      XLA_FLAGS=--xla_force_host_platform_device_count=N).
  """
  from ald_jax import training  # pylint: disable=g-import-not-at-top
  config = read_config(logdir)
  directory = os.path.join(logdir, CHECKPOINT_SUBDIR)
  if not os.path.isdir(directory):  # Checkpointer would create it
    raise ValueError(f"logdir: no checkpoint in {directory}")
  with checkpointing.Checkpointer(directory) as ckpt:
    if ckpt.latest_step() is None:
      raise ValueError(f"logdir: no checkpoint in {directory}")
    env = build_env(config)
    trainer = training.make_trainer(config, env)
    # The structure of `trainer.to_host(trainer.init())`, without compiling
    # the initialiser.
    like = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype),
                        jax.eval_shape(trainer.init))
    try:
      if step is None and hasattr(ckpt, "restore_latest"):
        # The newest checkpoint that verifies (skipping corrupt ones).
        step, host = ckpt.restore_latest(like, warn=warn)
      else:
        step = ckpt.latest_step() if step is None else step
        host = ckpt.restore(step, like=like)
    except ValueError as err:
      raise ValueError(f"logdir: {' '.join(str(err).split())}") from err
  role = acting_role(config.agent)
  params = jax.tree.map(lambda x: np.asarray(x[0]), host.params[role])
  return LoadedRun(config=config, env=env, role=role,
                   model=trainer.models[role], params=params, version=int(step))


def describe_acting_model(config: config_lib.Config, role: str) -> str:
  """'LSTM-64' or 'GTrXL-L2-D64-M32' for the acting model of a config."""
  if role == "actor":
    return f"LSTM-{config.lstm_hidden}"
  return (f"GTrXL-L{config.gtrxl_layers}-D{config.gtrxl_d_model}-"
          f"M{config.gtrxl_memory_len}")


# ---------------------------------------------------------- conversion ---


def _leaf_name(path: Any) -> str:
  """'cell', 'keys_0', ... from a pytree path."""
  parts = []
  for key in path:
    for attr in ("name", "key", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return "_".join(parts) or "state"


def step_signature(model: networks.RecurrentModel) -> StepSignature:
  """The exported step's names and state leaves, from `model.initial_state`."""
  leaves = jax.tree_util.tree_flatten_with_path(model.initial_state(1))[0]
  state = tuple(
      {"name": _leaf_name(path), "input": f"state_{_leaf_name(path)}",
       "output": f"next_state_{_leaf_name(path)}",
       "shape": [int(d) for d in leaf.shape[1:]],
       "dtype": np.dtype(leaf.dtype).name}
      for path, leaf in leaves)
  return StepSignature(observation="observation", start="start",
                       logits="logits", value="value", state=state)


def step_function(model: networks.RecurrentModel, params: Params):
  """The acting step as a flat function of arrays (what is exported).

  Returns:
    f(observation f32 [B, O], start bool [B], *state_leaves [B, ...]) ->
    (logits f32 [B, A], value f32 [B], *new_state_leaves), the state leaves
    in `jax.tree.leaves(model.initial_state(B))` order; `params` are baked in
    as constants.
  """
  treedef = jax.tree.structure(model.initial_state(1))
  params = jax.tree.map(jnp.asarray, params)

  def step(observation, start, *state_leaves):
    output, state = model.step(params, jax.tree.unflatten(
        treedef, list(state_leaves)), observation, start)
    if output.logits is None:
      raise ValueError("model: has no policy head (a critic cannot act)")
    return (output.logits, output.value, *jax.tree.leaves(state))

  return step


@contextlib.contextmanager
def _symbolic_batch() -> Iterator[None]:
  """Lets `initial_state` accept the symbolic batch size while tracing.

  networks' `initial_state(batch_size)` checks that the size is a Python int;
  while jax2onnx traces with a symbolic batch, `step` calls it with the
  symbolic dimension. Inside this context the check skips such dimensions
  (concrete ones are still checked). Not needed once the check accepts
  symbolic dimensions.
  """
  original = getattr(networks, "_require_positive", None)
  if original is None:
    yield
    return

  def tolerant(**sizes):
    original(**{k: v for k, v in sizes.items()
                if isinstance(v, (int, np.integer))})

  networks._require_positive = tolerant  # pylint: disable=protected-access
  try:
    yield
  finally:
    networks._require_positive = original  # pylint: disable=protected-access


@contextlib.contextmanager
def _quiet_converter() -> Iterator[None]:
  """jax2onnx's IR serialiser warns about untyped shape constants: silence."""
  logger = logging.getLogger("onnx_ir")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def step_to_onnx(model: networks.RecurrentModel, params: Params,
                 observation_size: int, *, batch_size: Optional[int] = None,
                 opset: int = OPSET) -> Tuple[Any, StepSignature]:
  """Converts one acting step to ONNX with jax2onnx.

  With `batch_size=None` the batch dimension is symbolic (`deploy.BATCH_DIM`)
  and jax2onnx traces `model.step` itself (its flax.linen plugins map Dense
  layers to Gemm nodes). With a fixed batch size the step is first traced by
  JAX into a jaxpr of lax primitives, which jax2onnx then converts: slower
  graphs, but it sidesteps jax2onnx's flax plugins, which cannot convert
  every layer (e.g. a DenseGeneral on [B, D] inputs).

  Args:
    model: the acting model.
    params: its params (baked into the ONNX model as initialisers).
    observation_size: O.
    batch_size: a fixed batch size; None: the symbolic `deploy.BATCH_DIM`.
    opset: ONNX opset.

  Returns:
    (onnx.ModelProto, StepSignature). Inputs: observation f32 [B, O], start
    bool [B], the state leaves; outputs: logits f32 [B, A], value f32 [B],
    the new state leaves (names in the signature).

  Raises:
    ConversionError: jax2onnx cannot convert the step (one line naming
      the error).
  """
  import jax2onnx  # pylint: disable=g-import-not-at-top
  from jax.extend import core as jex_core  # pylint: disable=g-import-not-at-top
  signature = step_signature(model)
  batch = deploy.BATCH_DIM if batch_size is None else int(batch_size)
  inputs = [jax.ShapeDtypeStruct((batch, observation_size), jnp.float32),
            jax.ShapeDtypeStruct((batch,), jnp.bool_)] + [
                jax.ShapeDtypeStruct((batch, *leaf["shape"]), leaf["dtype"])
                for leaf in signature.state]
  input_names = [signature.observation, signature.start] + [
      leaf["input"] for leaf in signature.state]
  output_names = [signature.logits, signature.value] + [
      leaf["output"] for leaf in signature.state]
  function = step_function(model, params)
  try:
    if batch_size is None:
      context = _symbolic_batch()
    else:
      closed = jax.make_jaxpr(function)(*inputs)
      function = jex_core.jaxpr_as_fun(closed)
      context = contextlib.nullcontext()
    with context, _quiet_converter():
      proto = jax2onnx.to_onnx(function, inputs,
                               model_name="ald_jax_acting_step", opset=opset,
                               input_names=input_names,
                               output_names=output_names)
  except Exception as err:  # jax2onnx raises many types; report in one line
    message = " ".join(str(err).split())[:300]
    raise ConversionError(
        f"jax2onnx cannot convert the acting step with batch "
        f"{batch!r}: {type(err).__name__}: {message}") from err
  return proto, signature


def check_onnx_loads(proto: Any, batch_size: Optional[int]) -> None:
  """Raises ConversionError if onnxruntime rejects a converted model."""
  try:
    deploy.make_session(proto.SerializeToString(), batch_size=batch_size)
  except Exception as err:  # onnxruntime's own exception types
    message = " ".join(str(err).split())[:300]
    raise ConversionError(
        f"onnxruntime rejects the converted step (batch "
        f"{batch_size or deploy.BATCH_DIM!r}): {message}") from err


def convert_step(model: networks.RecurrentModel, params: Params,
                 observation_size: int,
                 batch_sizes: Optional[Sequence[int]] = None, *,
                 fallback_batch_sizes: Sequence[int] = DEFAULT_FIXED_BATCH_SIZES
                 ) -> Tuple[Dict[Optional[int], Any], StepSignature, str]:
  """ONNX models of the step: one with a symbolic batch, else one per size.

  Args:
    model, params, observation_size: as for `step_to_onnx`.
    batch_sizes: None: try the symbolic batch first and fall back to fixed
      `fallback_batch_sizes`; a sequence: fixed sizes only.
    fallback_batch_sizes: see batch_sizes.

  Returns:
    ({batch_size or None: ModelProto}, signature, note), `note` saying why a
    symbolic batch was not used ('' if it was).

  Raises:
    ConversionError: no model could be converted and loaded.
  """
  note = ""
  if batch_sizes is None:
    try:
      proto, signature = step_to_onnx(model, params, observation_size)
      check_onnx_loads(proto, 1)
      return {None: proto}, signature, note
    except ConversionError as err:
      batch_sizes = tuple(sorted(set(fallback_batch_sizes)))
      note = (f"exported for fixed batch sizes {list(batch_sizes)}: a "
              f"symbolic batch failed ({err})")
  protos = {}
  for size in sorted(set(int(b) for b in batch_sizes)):
    if size < 1:
      raise ValueError(f"batch_sizes: must be positive (got {size})")
    proto, signature = step_to_onnx(model, params, observation_size,
                                    batch_size=size)
    check_onnx_loads(proto, size)
    protos[size] = proto
  return protos, signature, note


def step_model_bytes(model: networks.RecurrentModel, params: Params,
                     observation_size: int, batch_size: int) -> bytes:
  """A serialised ONNX step usable at `batch_size` (symbolic batch if possible).

  Raises:
    ConversionError: the model cannot be converted at all.
  """
  protos, _, _ = convert_step(model, params, observation_size)
  if None not in protos:
    protos, _, _ = convert_step(model, params, observation_size,
                                batch_sizes=(batch_size,))
  return next(iter(protos.values())).SerializeToString()


# -------------------------------------------------------------- checks ---


def parity_check(run: LoadedRun, policy: deploy.ActorPolicy, *,
                 steps: int = 500, batch_size: int = 8, seed: int = 0
                 ) -> Dict[str, Any]:
  """Steps the JAX model and the exported policy side by side on real episodes.

  Both carry their own recurrent state over `steps` steps of `batch_size`
  envs (episodes end and restart along the way); actions are sampled from
  the JAX logits (so that varied states are visited) and applied to the envs.

  Args:
    run: the run (model, params, env).
    policy: the exported policy (greedy).
    steps: time steps.
    batch_size: envs stepped together.
    seed: env and sampling seed.

  Returns:
    {'steps', 'batch_size', 'episode_starts' (after the first step),
    'max_abs_logits_error', 'max_abs_value_error',
    'greedy_action_mismatches'}.
  """
  if not policy.greedy:
    raise ValueError("policy: parity_check needs a greedy policy")
  env, model = run.env, run.model
  params = jax.device_put(run.params)
  step = jax.jit(model.step)
  reset = jax.jit(jax.vmap(env.reset))
  env_step = jax.jit(jax.vmap(env.step))
  env_state, timestep = reset(jax.random.split(jax.random.PRNGKey(seed),
                                               batch_size))
  state = model.initial_state(batch_size)
  policy.reset(batch_size)
  rng = np.random.default_rng(seed)
  logits_error = value_error = 0.0
  mismatches = starts = 0
  for t in range(steps):
    observation = np.asarray(timestep.observation, np.float32)
    start = np.asarray(timestep.step_type == env_api.StepType.FIRST)
    if t:
      starts += int(start.sum())
    output, state = step(params, state, jnp.asarray(observation),
                         jnp.asarray(start))
    logits = np.asarray(output.logits)
    action, exported_logits = policy.step(observation, start)
    logits_error = max(logits_error, float(np.max(np.abs(
        exported_logits - logits))))
    value_error = max(value_error, float(np.max(np.abs(
        policy.last_value - np.asarray(output.value)))))
    mismatches += int(np.sum(action != np.argmax(logits, axis=-1)))
    sampled = np.argmax(logits + rng.gumbel(size=logits.shape), axis=-1)
    env_state, timestep = env_step(env_state, jnp.asarray(sampled, jnp.int32))
  return {"steps": steps, "batch_size": batch_size, "episode_starts": starts,
          "max_abs_logits_error": logits_error,
          "max_abs_value_error": value_error,
          "greedy_action_mismatches": mismatches}


def evaluate_policy(policy: deploy.ActorPolicy, env: env_api.Environment, *,
                    seed: int, num_episodes: int,
                    max_steps: int = 1_000_000) -> Dict[str, float]:
  """Greedy episodes of an exported policy, as `Trainer.evaluate` plays them.

  The same env seeds (`jax.random.split(PRNGKey(seed), num_episodes)`), each
  episode counted once until it ends; so with the same params this
  reproduces the run's eval.json. Episodes are independent, so a policy
  exported for fixed batch sizes plays them in chunks of its largest batch
  (the last chunk padded with repeats, which are not counted).

  Returns:
    {'eval_return', 'eval_success_rate', 'eval_episodes'}.
  """
  if not policy.greedy:
    raise ValueError("policy: evaluate_policy needs a greedy policy")
  if num_episodes < 1:
    raise ValueError(f"num_episodes: must be >= 1 (got {num_episodes})")
  keys = jax.random.split(jax.random.PRNGKey(seed), num_episodes)
  chunk = (num_episodes if policy.batch_sizes is None
           else max(policy.batch_sizes))
  returns, success = [], []
  for begin in range(0, num_episodes, chunk):
    chunk_keys = keys[begin:begin + chunk]
    count = chunk_keys.shape[0]
    if count < chunk:
      chunk_keys = jnp.concatenate(
          [chunk_keys, jnp.repeat(chunk_keys[-1:], chunk - count, axis=0)])
    chunk_returns, chunk_success = _play_greedy(policy, env, chunk_keys,
                                                max_steps)
    returns.append(chunk_returns[:count])
    success.append(chunk_success[:count])
  returns, success = np.concatenate(returns), np.concatenate(success)
  return {"eval_return": float(np.mean(returns)),
          "eval_success_rate": float(np.mean(success)),
          "eval_episodes": int(num_episodes)}


def _play_greedy(policy: deploy.ActorPolicy, env: env_api.Environment,
                 keys: jax.Array, max_steps: int
                 ) -> Tuple[np.ndarray, np.ndarray]:
  """One greedy episode per key, stepped together: (returns, success) [N]."""
  reset = jax.jit(jax.vmap(env.reset))
  env_step = jax.jit(jax.vmap(env.step))
  success_fn = jax.jit(jax.vmap(env.success))
  env_state, timestep = reset(keys)
  batch = keys.shape[0]
  policy.reset(batch)
  returns = np.zeros(batch)
  success = np.zeros(batch, bool)
  done = np.zeros(batch, bool)
  steps = 0
  while not done.all() and steps < max_steps:
    start = np.asarray(timestep.step_type == env_api.StepType.FIRST)
    action, _ = policy.step(np.asarray(timestep.observation, np.float32),
                            start)
    env_state, timestep = env_step(env_state, jnp.asarray(action, jnp.int32))
    active = ~done
    returns += np.where(active, np.asarray(timestep.reward), 0.0)
    ended = active & np.asarray(timestep.step_type == env_api.StepType.LAST)
    success |= ended & np.asarray(success_fn(env_state))
    done |= ended
    steps += 1
  return returns, success


# -------------------------------------------------------------- export ---


def _versions() -> Dict[str, str]:
  import jax2onnx  # pylint: disable=g-import-not-at-top
  import onnx  # pylint: disable=g-import-not-at-top
  import onnxruntime  # pylint: disable=g-import-not-at-top
  from importlib import metadata  # pylint: disable=g-import-not-at-top

  def version(name, module):
    try:
      return metadata.version(name)
    except metadata.PackageNotFoundError:
      return getattr(module, "__version__", "unknown")

  return {"jax": jax.__version__, "jax2onnx": version("jax2onnx", jax2onnx),
          "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _write_atomically(path: str, data: bytes) -> None:
  directory = os.path.dirname(path) or "."
  with tempfile.NamedTemporaryFile(dir=directory, delete=False) as f:
    f.write(data)
    temporary = f.name
  os.chmod(temporary, 0o644)  # NamedTemporaryFile makes it owner-only
  os.replace(temporary, path)


def export_run(logdir: str, out_dir: Optional[str] = None, *,
               run: Optional[LoadedRun] = None,
               batch_sizes: Optional[Sequence[int]] = None,
               parity_steps: int = 500, parity_batch: int = 8,
               verify_eval: bool = True) -> Dict[str, Any]:
  """Exports a run's acting model to `out_dir` (.onnx files + policy.json).

  Args:
    logdir: the run directory.
    run: its `load_acting_params(logdir)`, if already loaded.
    out_dir: where to write (created); default `<logdir>/export`.
    batch_sizes: None: one policy.onnx with a symbolic batch (falling back to
      fixed sizes 1 and parity_batch if the model cannot be exported so); a
      sequence: one policy_b<B>.onnx per fixed batch size.
    parity_steps: steps of `parity_check` (0: skip); a failure writes nothing.
    parity_batch: envs of the parity check (with fixed batch sizes: this one
      if exported, else the largest).
    verify_eval: replay the run's greedy evaluation (eval.json, if present)
      with the exported policy and record both results.

  Returns:
    The metadata written to policy.json (with 'parity' and 'eval' results).

  Raises:
    ValueError: the run cannot be loaded ('logdir: ...'), or the exported
      step disagrees with the JAX step ('parity: ...'; nothing is written).
    ConversionError: the acting model cannot be converted.
  """
  run = run or load_acting_params(logdir)
  out_dir = out_dir or os.path.join(logdir, DEFAULT_EXPORT_SUBDIR)
  protos, signature, note = convert_step(
      run.model, run.params, run.env.observation_size, batch_sizes,
      fallback_batch_sizes=DEFAULT_FIXED_BATCH_SIZES + (parity_batch,))
  os.makedirs(out_dir, exist_ok=True)
  written = []
  models = []
  for size, proto in protos.items():
    name = deploy.POLICY_ONNX if size is None else f"policy_b{size}.onnx"
    path = os.path.join(out_dir, name)
    _write_atomically(path, proto.SerializeToString())
    written.append(path)
    models.append({"file": name, "batch_size": size,
                   "sha256": deploy.file_sha256(path),
                   "bytes": os.path.getsize(path)})
  config = run.config
  metadata: Dict[str, Any] = {
      "format": deploy.FORMAT,
      "models": models,
      "onnx_opset": OPSET,
      "batch_dim": deploy.BATCH_DIM,
      "observation_size": int(run.env.observation_size),
      "num_actions": int(run.env.num_actions),
      "inputs": {"observation": signature.observation,
                 "start": signature.start},
      "outputs": {"logits": signature.logits, "value": signature.value},
      "state": [dict(leaf) for leaf in signature.state],
      "agent": config.agent,
      "acting_model": describe_acting_model(config, run.role),
      "acting_role": run.role,
      "env": config.env,
      "env_args": config.env_args,
      "params_version": run.version,
      "config": dataclasses.asdict(config),
      "source_logdir": os.path.abspath(logdir),
      "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "versions": _versions(),
  }
  if note:
    metadata["note"] = note
  metadata_path = os.path.join(out_dir, deploy.METADATA_JSON)
  written.append(metadata_path)

  def write_metadata():
    _write_atomically(metadata_path, json.dumps(
        metadata, indent=2, sort_keys=True).encode())

  write_metadata()
  try:
    policy = deploy.ActorPolicy.load(out_dir, greedy=True)
    if parity_steps > 0:
      sizes = policy.batch_sizes
      batch = (parity_batch if sizes is None or parity_batch in sizes
               else max(sizes))
      parity = parity_check(run, policy, steps=parity_steps,
                            batch_size=batch, seed=config.seed)
      metadata["parity"] = parity
      error = max(parity["max_abs_logits_error"],
                  parity["max_abs_value_error"])
      if error > PARITY_TOLERANCE or parity["greedy_action_mismatches"]:
        raise ValueError(
            f"parity: the exported step differs from the JAX step (max error "
            f"{error:.2e}, tolerance {PARITY_TOLERANCE:g}; "
            f"{parity['greedy_action_mismatches']} greedy actions differ); "
            f"nothing exported")
    eval_path = os.path.join(logdir, EVAL_JSON)
    if verify_eval and os.path.isfile(eval_path):
      with open(eval_path) as f:
        saved = json.load(f)
      episodes = int(saved.get("eval_episodes", config.eval_episodes))
      result = evaluate_policy(policy, run.env,
                               seed=config.seed + EVAL_SEED_OFFSET,
                               num_episodes=episodes)
      metadata["eval"] = {"exported": result, "eval_json": saved}
  except Exception:
    for path in written:
      if os.path.exists(path):
        os.remove(path)
    raise
  write_metadata()
  return metadata


def summary_lines(metadata: Dict[str, Any], out_dir: str) -> Sequence[str]:
  """What experiments/export.py prints about an export."""
  files = ", ".join(
      f"{m['file']} ({m['bytes'] / 1024:.0f} KiB"
      + (f", batch {m['batch_size']}" if m["batch_size"] else ", any batch")
      + ")" for m in metadata["models"])
  lines = [f"exported the {metadata['agent']} acting model "
           f"({metadata['acting_model']}, {metadata['env']}) at iteration "
           f"{metadata['params_version']} to {out_dir}: {files}, "
           f"{deploy.METADATA_JSON}"]
  if metadata.get("note"):
    lines.append(f"note: {metadata['note']}")
  parity = metadata.get("parity")
  if parity:
    lines.append(
        f"parity over {parity['steps']} steps x {parity['batch_size']} envs "
        f"({parity['episode_starts']} episode starts): max |logits error| "
        f"{parity['max_abs_logits_error']:.1e}, max |value error| "
        f"{parity['max_abs_value_error']:.1e}, greedy actions identical")
  evaluation = metadata.get("eval")
  if evaluation:
    ours, theirs = evaluation["exported"], evaluation["eval_json"]
    same = (ours["eval_success_rate"] == theirs.get("eval_success_rate")
            and abs(ours["eval_return"] - theirs.get("eval_return", math.nan))
            < 1e-6)
    lines.append(
        f"greedy eval of the exported policy ({ours['eval_episodes']} "
        f"episodes, the run's eval seeds): success "
        f"{ours['eval_success_rate']:.1%}, return {ours['eval_return']:.3f}; "
        f"eval.json: success {theirs.get('eval_success_rate', math.nan):.1%},"
        f" return {theirs.get('eval_return', math.nan):.3f}"
        + ("" if same else " (DIFFERENT)"))
  return lines

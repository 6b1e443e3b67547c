"""One training run from a Config: checks, training loop, files in the logdir.

The library half of `experiments/run.py` (which adds the command line, exit
codes and one-line errors); `experiments/study.py` and notebooks call it
directly:

    config = runner.parse_config(["prog", "--flagfile=experiments/configs/recall_ald.cfg"])
    env = runner.prepare(config)          # validates everything, compiles nothing
    state, last_metrics = runner.train(config, env)
    runner.evaluate_and_save(training.make_trainer(config, env), state, config)

Writes to `config.logdir`: `config.json`, `metrics.csv` (one row per progress
line and one at every checkpoint), TensorBoard event files,
`checkpoints/<iteration>/` (verified by a checksum), `actor_latency.json` when a
latency budget was checked and, after the final greedy evaluation, `eval.json`.
"""
import dataclasses
import importlib
import json
import math
import os
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Optional, Sequence, TextIO, Tuple

from absl import flags
import dm_env
import jax
import numpy as np

from ald_jax import checkpointing
from ald_jax import compile_watch
from ald_jax import config as config_lib
from ald_jax import logdir_lock
from ald_jax import logging_utils
from envs import api as env_api
from envs import registry

Config = config_lib.Config

CONFIG_JSON = "config.json"
EVAL_JSON = "eval.json"
CHECKPOINT_SUBDIR = "checkpoints"
CHECKPOINTS_TO_KEEP = 3
# Refuse sizes whose buffers alone need more than this share of the memory.
MEMORY_FRACTION = 0.5
EVAL_SEED_OFFSET = 10_000
# Fields that may change when resuming: they do not change what is trained.
RESUMABLE_FIELDS = frozenset({
    "total_env_steps", "logdir", "log_every_seconds",
    "checkpoint_every_iterations", "resume", "eval_episodes",
    "compilation_cache_dir", "actor_latency_budget_us", "actor_latency_runtime",
    # Where the distributed runtime's processes run, not what they compute.
    "ray_address", "ray_num_cpus", "actor_max_restarts"})
ACTOR_LATENCY_JSON = "actor_latency.json"
# The trainer's per-iteration episode counters; the CSV holds their sums over
# each logged interval instead (episodes, episode_return, success_rate).
_EPISODE_COUNTERS = ("episode_count", "episode_return_sum", "success_count")

_DEFINE_BY_TYPE = {
    bool: flags.DEFINE_bool,
    int: flags.DEFINE_integer,
    float: flags.DEFINE_float,
    str: flags.DEFINE_string,
}

# ------------------------------------------------------------------ flags ---


def define_config_flags(flag_values: flags.FlagValues) -> None:
  """Defines one flag per `Config` field: its name, default and help."""
  for field in dataclasses.fields(Config):
    define = _DEFINE_BY_TYPE.get(type(field.default))
    if define is None:
      raise TypeError(f"Config.{field.name}: no flag type for default "
                      f"{field.default!r}")
    define(field.name, field.default, field.metadata["help"],
           flag_values=flag_values)


def config_from_flags(flag_values: flags.FlagValues) -> Config:
  """The (unvalidated) `Config` holding the parsed flags' values."""
  return Config(**{field.name: flag_values[field.name].value
                   for field in dataclasses.fields(Config)})


def parse_config(argv: Sequence[str]) -> Config:
  """Parses command-line arguments (argv[0] is the program) into a Config.

  Uses fresh FlagValues, so it can be called repeatedly (e.g. to check every
  flagfile in tests). `--flagfile=...` is supported. Not validated.

  Raises:
    flags.Error: unknown flag or unparsable value.
    ValueError: positional arguments.
  """
  flag_values = flags.FlagValues()
  define_config_flags(flag_values)
  rest = flag_values(list(argv))
  if len(rest) > 1:
    raise ValueError(f"unexpected positional arguments {rest[1:]}")
  return config_from_flags(flag_values)


# ---------------------------------------------------- pre-compile checks ---


def _factory_resolves(name: str) -> bool:
  """Whether an env name is built in or an existing 'package.module:factory'."""
  if name in config_lib.BUILTIN_ENVS:
    return True
  module_name, _, attribute = name.partition(":")
  try:
    return callable(getattr(importlib.import_module(module_name), attribute))
  except (ImportError, AttributeError, ValueError):
    return False


def _env_label(config: Config) -> str:
  return config.env + (f"({config.env_args})" if config.env_args else "")


def build_env(config: Config) -> env_api.Environment:
  """Constructs the env and checks its outputs (traces, compiles nothing).

  One `reset` and `step` are traced (`envs.api.check_environment`): sizes,
  shapes and dtypes of the time steps, a state that keeps its layout. An env
  whose state has weak-typed leaves is wrapped in `envs.api.StrongTypes`, so
  that the training iteration compiles once.

  Raises:
    ValueError: 'env: ...' when the name does not resolve or the env breaks
      the API, 'env_args: ...' when the env rejects its arguments.
  """
  kwargs = config_lib.parse_env_args(config.env_args)
  try:
    env = registry.make(config.env, **kwargs)
  except (ValueError, TypeError, ImportError, AttributeError) as err:
    field = "env_args" if _factory_resolves(config.env) else "env"
    raise ValueError(f"{field}: {err}") from err
  if config.runtime == "distributed" and isinstance(env, dm_env.Environment):
    return env  # stepped on the host by the actors; not traced
  try:
    weak_state = env_api.check_environment(env)
  except ValueError as err:
    # A built-in env that fails with the given arguments: the arguments.
    field = ("env_args" if config.env in config_lib.BUILTIN_ENVS
             and config.env_args else "env")
    raise ValueError(f"{field}: {_env_label(config)}: {err}") from err
  return env_api.StrongTypes(env) if weak_state else env


def check_memory(config: Config, env: env_api.Environment) -> None:
  """Refuses sizes whose main buffers cannot fit in this machine's memory.

  A lower bound (env states, one segment, the distillation replay, params
  with their optimiser and target copies), traced with `jax.eval_shape`, so
  that `--num_envs=10**8` fails here in one line instead of in XLA's
  allocator (or the kernel's OOM killer).

  Raises:
    ValueError: naming the size flags and the estimate.
  """
  if isinstance(env, dm_env.Environment):
    return
  from ald_jax import training  # pylint: disable=g-import-not-at-top
  nbytes = lambda tree: sum(  # noqa: E731
      math.prod(x.shape) * np.dtype(x.dtype).itemsize
      for x in jax.tree.leaves(tree))
  key = jax.ShapeDtypeStruct((2,), np.uint32)
  env_bytes = nbytes(jax.eval_shape(env.reset, key))
  steps_kept = config.unroll_length * (
      1 + (config.replay_segments if config.agent == "ald" else 0))
  per_env = env_bytes * (config.unroll_length + 1) + steps_kept * 4 * (
      env.observation_size + 2 * env.num_actions + 4)
  models = training.build_models(config, env)
  # Params, Adam's two moments, the gradients and the V-MPO target copy.
  param_bytes = 5 * sum(nbytes(jax.eval_shape(model.init, key))
                        for model in models.values())
  need = config.num_envs * per_env + param_bytes
  try:
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError):
    return
  if need > MEMORY_FRACTION * have:
    gib = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
    field = "num_envs" if config.num_envs * per_env >= param_bytes else (
        "gtrxl_d_model")
    raise ValueError(
        f"{field}: these sizes need at least {gib(need)} (num_envs="
        f"{config.num_envs}, unroll_length={config.unroll_length}, "
        f"replay_segments={config.replay_segments}, model params "
        f"{gib(param_bytes)} with optimiser copies), over "
        f"{MEMORY_FRACTION:.0%} of this machine's {gib(have)}")


def check_actor_latency(config: Config, env: env_api.Environment,
                        trainer: Any, stream: Optional[TextIO] = None
                        ) -> Optional[Dict[str, Any]]:
  """Measures the acting step against --actor_latency_budget_us (0: off).

  Measured at the batch one device acts on, in JAX and, where jax2onnx and
  onnxruntime are installed, exported (see ald_jax/latency.py); the budget
  applies to --actor_latency_runtime. Prints one line with the figures.

  Returns:
    The measurement report (None when the budget is off).
  Raises:
    ValueError: 'actor_latency_budget_us: ...' when over the budget, or when
      the runtime the budget applies to could not be measured.
  """
  if config.actor_latency_budget_us <= 0:
    return None
  if isinstance(env, dm_env.Environment):
    raise ValueError("actor_latency_budget_us: not measured for a Python "
                     "dm_env.Environment (its step cost is the simulator's)")
  from ald_jax import latency  # pylint: disable=g-import-not-at-top
  stream = stream or sys.stdout
  from ald_jax import agents  # pylint: disable=g-import-not-at-top
  role = agents.ROLES[config.agent].acting
  runtimes = ("jax", "onnx")
  report = latency.measure_acting_latency(
      config, env, model=trainer.models[role] if trainer else None,
      runtimes=runtimes)
  figures = []
  for runtime in runtimes:
    result = report[runtime]
    figures.append(f"{runtime} {result['median_us']:.1f} us"
                   if "median_us" in result else
                   f"{runtime} not measured ({result['skipped']})")
  print(f"acting step ({report['model']}, batch {report['batch_size']}): "
        f"{', '.join(figures)}; budget {config.actor_latency_budget_us:g} us "
        f"({config.actor_latency_runtime})", file=stream, flush=True)
  measured = report[config.actor_latency_runtime]
  if "median_us" not in measured:
    raise ValueError(f"actor_latency_budget_us: the "
                     f"{config.actor_latency_runtime} step could not be "
                     f"measured ({measured['skipped']})")
  latency.check_latency_budget(
      measured["median_us"], config.actor_latency_budget_us,
      batch_size=report["batch_size"], runtime=config.actor_latency_runtime)
  return report


def _checkpoint_dir(logdir: str) -> str:
  return os.path.join(logdir, CHECKPOINT_SUBDIR)


def latest_checkpoint(logdir: str) -> Optional[int]:
  """Latest checkpointed iteration in `logdir` or None; creates nothing."""
  if not os.path.isdir(_checkpoint_dir(logdir)):
    return None
  with checkpointing.Checkpointer(_checkpoint_dir(logdir)) as ckpt:
    return ckpt.latest_step()


def check_logdir_writable(logdir: str) -> None:
  """Checks that `logdir` is (or can be created as) a writable directory.

  Creates nothing that stays: a probe file is opened and deleted in the
  nearest existing ancestor (permission bits alone do not tell: root ignores
  them, a read-only mount does not).

  Raises:
    ValueError: 'logdir: <reason>'.
  """
  path = os.path.abspath(logdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"logdir: {logdir} exists and is not a directory")
  ancestor = path
  while not os.path.exists(ancestor):
    ancestor = os.path.dirname(ancestor)
  if not os.path.isdir(ancestor):
    raise ValueError(f"logdir: cannot create {logdir}: {ancestor} is not a "
                     f"directory")
  try:
    tempfile.TemporaryFile(dir=ancestor).close()
  except OSError as err:
    raise ValueError(f"logdir: {ancestor} is not writable "
                     f"({err.strerror or err})") from err


def check_logdir(config: Config) -> None:
  """Checks --logdir against --resume and, resuming, the saved config.

  Raises:
    ValueError: '<field>: <reason>' naming the flag to change.
  """
  latest = latest_checkpoint(config.logdir)
  if config.resume and latest is None:
    raise ValueError(
        f"resume: no checkpoint in {_checkpoint_dir(config.logdir)}")
  if not config.resume and latest is not None:
    raise ValueError(f"logdir: {config.logdir} already holds checkpoints "
                     f"(latest iteration {latest}); pass --resume to continue "
                     f"or choose another --logdir")
  saved_path = os.path.join(config.logdir, CONFIG_JSON)
  if config.resume and os.path.exists(saved_path):
    try:
      with open(saved_path) as f:
        saved = json.load(f)
    except (OSError, ValueError) as err:
      raise ValueError(f"resume: cannot read {saved_path} ({err})") from err
    for field in dataclasses.fields(Config):
      if field.name in RESUMABLE_FIELDS or field.name not in saved:
        continue
      if saved[field.name] != getattr(config, field.name):
        raise ValueError(f"{field.name}: differs from the run being resumed "
                         f"({saved[field.name]!r} in {saved_path}; got "
                         f"{getattr(config, field.name)!r})")


def prepare(config: Config) -> env_api.Environment:
  """Every check that needs no compilation and writes nothing; returns the env.

  Raises:
    ValueError: '<field>: <reason>' for the first problem found.
  """
  config.validate()
  env = build_env(config)
  check_memory(config, env)
  check_logdir_writable(config.logdir)
  check_logdir(config)
  return env


# ------------------------------------------------------------- training ---


class NonFiniteError(RuntimeError):
  """A training iteration produced NaN or inf (see training.NONFINITE_QUANTITIES).

  Attributes:
    iteration: the first flagged iteration (1-based).
    quantities: what was not finite, e.g. 'RL loss, RL gradients'.
    last_checkpoint: the newest checkpoint on disk (all are finite), or None.
  """

  def __init__(self, iteration: int, quantities: str,
               last_checkpoint: Optional[int]):
    self.iteration = iteration
    self.quantities = quantities
    self.last_checkpoint = last_checkpoint
    kept = (f"checkpoints up to iteration {last_checkpoint} are kept"
            if last_checkpoint is not None else "no checkpoint was written")
    super().__init__(
        f"non-finite values at iteration {iteration} in {quantities}; the "
        f"run stopped and this state was not saved ({kept}). Lower the "
        f"learning rates or check the env's rewards and observations")


def _scalar(value: Any) -> float:
  """A host float from a scalar (or device-replicated) metric."""
  return float(np.ravel(np.asarray(value))[0])


def _describe_nonfinite(mask: int) -> str:
  from ald_jax import training  # pylint: disable=g-import-not-at-top
  return training.describe_nonfinite(mask)


class _IterationRecord:
  """Host-side bookkeeping of finished iterations: episodes and finiteness."""

  def __init__(self, checkpoints: checkpointing.Checkpointer):
    self.episodes = logging_utils.EpisodeAccumulator()
    self._checkpoints = checkpoints

  def add(self, metrics: Dict[str, Any]) -> None:
    """Adds one iteration's episode counters; raises NonFiniteError if flagged.

    Fetching blocks until that iteration has run.
    """
    nonfinite = metrics.get("nonfinite", 0)
    counts, nonfinite, iteration = jax.device_get(
        (tuple(metrics[k] for k in _EPISODE_COUNTERS), nonfinite,
         metrics["iteration"]))
    if int(_scalar(nonfinite)):
      self._checkpoints.wait_until_finished()
      raise NonFiniteError(int(_scalar(iteration)),
                           _describe_nonfinite(int(_scalar(nonfinite))),
                           self._checkpoints.latest_step())
    self.episodes.add(*(_scalar(v) for v in counts))


def _interval_row(metrics: Dict[str, float],
                  episodes: logging_utils.EpisodeAccumulator,
                  elapsed_s: float, steps_per_s: float) -> Dict[str, float]:
  """One metrics.csv row: interval episode stats, then the trainer's metrics."""
  row = {
      "iteration": int(metrics["iteration"]),
      "env_steps": int(metrics["env_steps"]),
      "elapsed_s": elapsed_s,
      "env_steps_per_s": steps_per_s,
      "episodes": episodes.episodes,
      "episode_return": episodes.mean_return,
      "success_rate": episodes.success_rate,
  }
  for name in sorted(metrics):
    if name not in row and name not in _EPISODE_COUNTERS:
      row[name] = metrics[name]
  return row


def write_config_json(config: Config) -> None:
  os.makedirs(config.logdir, exist_ok=True)
  path = os.path.join(config.logdir, CONFIG_JSON)
  with open(path + ".tmp", "w") as f:
    json.dump(dataclasses.asdict(config), f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)


def _restore(config: Config, trainer: Any,
             ckpt: checkpointing.Checkpointer, stream: TextIO
             ) -> Tuple[int, Any]:
  """(iteration, device state) of the newest checkpoint that verifies.

  Raises:
    ValueError: no usable checkpoint, another device count or structure.
  """
  like = trainer.to_host(trainer.init())
  iteration, host = _restore_verified(ckpt, like, trainer.num_devices, stream)
  return iteration, trainer.from_host(host)


def _restore_verified(ckpt: checkpointing.Checkpointer, like: Any,
                      num_devices: Optional[int], stream: TextIO
                      ) -> Tuple[int, Any]:
  """(step, host tree) of the newest checkpoint that verifies; removes the
  newer ones it skipped. `num_devices`: the leading axis expected (None:
  none)."""
  warn = lambda line: print(  # noqa: E731
      f"warning: {line}; removed, resuming from an older checkpoint",
      file=stream, flush=True)
  try:
    iteration, host = ckpt.restore_latest(like, warn=warn)
  except checkpointing.CheckpointMismatchError as err:
    saved_devices = _saved_device_count(ckpt) if num_devices else None
    if saved_devices is not None and saved_devices != num_devices:
      raise ValueError(
          f"num_devices: the checkpoint was written with {saved_devices} "
          f"device(s), this run uses {num_devices}; resume with "
          f"--num_devices={saved_devices} on a machine that has them") from err
    raise ValueError(f"resume: {err} (was it written with another --agent, "
                     f"--env or model sizes?)") from err
  except checkpointing.CorruptCheckpointError as err:
    raise ValueError(f"resume: {err}") from err
  # Newer steps were skipped as corrupt: they would block the saves that
  # retrace their iterations.
  for step in ckpt.all_steps():
    if step > iteration:
      ckpt.delete(step)
  return iteration, host


def _saved_device_count(ckpt: checkpointing.Checkpointer) -> Optional[int]:
  """Leading axis of the newest checkpoint's 'iteration' leaf, if readable."""
  for step in reversed(ckpt.all_steps()):
    try:
      shape = ckpt.saved_shapes(step).get("iteration", ((None,), None))[0]
    except Exception:  # pylint: disable=broad-except
      continue
    return shape[0] if shape else None
  return None


def _startup_line(counts: Dict[str, float], seconds: float) -> str:
  """How long the first iteration took to start, and what the cache gave."""
  line = f"first iteration took {seconds:.1f}s, compiling included"
  if counts["cache_requests"] and jax.config.jax_compilation_cache_dir:
    line += (f"; {int(counts['cache_hits'])} of "
             f"{int(counts['cache_requests'])} compiled programs came from "
             f"the compilation cache")
  return line


def train(config: Config, env: env_api.Environment, *,
          trainer: Any = None,
          stream: Optional[TextIO] = None,
          clock: Callable[[], float] = time.monotonic,
          actor_latency: Optional[Dict[str, Any]] = None,
          ) -> Tuple[Any, Dict[str, float]]:
  """Runs (or resumes) training until `config.total_env_steps`.

  Holds the logdir lock for the whole run; writes config.json only once a
  resumed checkpoint has been verified.

  Args:
    config: a validated Config (see `prepare`).
    env: the environment.
    trainer: an `ald_jax.training.Trainer`; built from config and env if None.
    stream: where progress lines go (default sys.stdout).
    clock: seconds, monotonic (injectable for tests).
    actor_latency: a `check_actor_latency` report, written to
      logdir/actor_latency.json.
  Returns:
    (final device state, the host metrics of the last iteration as floats;
    empty when a resumed run had nothing left to do).
  Raises:
    ValueError: the logdir is locked by another run, config.resume without a
      usable checkpoint, or one that does not fit.
    NonFiniteError: an iteration produced NaN/inf (nothing of it is saved).
  """
  stream = stream or sys.stdout
  if config.runtime == "distributed":
    with logdir_lock.LogdirLock(config.logdir) as lock:
      if lock.note:
        print(f"note: {lock.note}", file=stream, flush=True)
      check_logdir(config)
      _write_actor_latency(config, actor_latency)
      return _train_distributed_locked(config, env, stream)
  if trainer is None:
    # Imported on use: the flag checks and flagfile parsing need none of it.
    from ald_jax import training  # pylint: disable=g-import-not-at-top
    trainer = training.make_trainer(config, env)
  steps_per_iteration = trainer.env_steps_per_iteration
  total_iterations = math.ceil(config.total_env_steps / steps_per_iteration)
  with logdir_lock.LogdirLock(config.logdir) as lock:
    if lock.note:
      print(f"note: {lock.note}", file=stream, flush=True)
    check_logdir(config)  # again, now that no other run can change it
    _write_actor_latency(config, actor_latency)
    return _train_locked(config, trainer, total_iterations, stream, clock)


def _write_actor_latency(config: Config,
                         actor_latency: Optional[Dict[str, Any]]) -> None:
  if actor_latency is not None:
    with open(os.path.join(config.logdir, ACTOR_LATENCY_JSON), "w") as f:
      json.dump(actor_latency, f, indent=2, sort_keys=True)


def _train_distributed_locked(config: Config, env: Any, stream: TextIO
                              ) -> Tuple[Any, Dict[str, float]]:
  """--runtime=distributed: ald_jax.distributed with this logdir's files."""
  from ald_jax import distributed  # pylint: disable=g-import-not-at-top
  with checkpointing.Checkpointer(_checkpoint_dir(config.logdir),
                                  max_to_keep=CHECKPOINTS_TO_KEEP) as ckpt:
    start_state, iteration, env_steps = None, 0, 0
    if config.resume:
      like = distributed.checkpoint_like(config, env)
      iteration, host = _restore_verified(ckpt, like, None, stream)
      start_state = distributed.DistributedState(*host) if not isinstance(
          host, distributed.DistributedState) else host
      env_steps = int(start_state.counters["env_steps"])
    write_config_json(config)
    with logging_utils.MetricsWriter(
        config.logdir, resume_iteration=iteration if config.resume else None,
        resume_step=env_steps) as writer:
      state, metrics = distributed.train_distributed(
          config, env, stream=stream, checkpointer=ckpt,
          metrics_writer=writer, start_state=start_state)
    nonfinite = int(metrics.get("nonfinite", 0) or 0)
    if nonfinite:
      ckpt.wait_until_finished()
      raise NonFiniteError(int(metrics.get("iteration", 0)),
                           _describe_nonfinite(nonfinite), ckpt.latest_step())
  return state, metrics


def _train_locked(config: Config, trainer: Any, total_iterations: int,
                  stream: TextIO, clock: Callable[[], float]
                  ) -> Tuple[Any, Dict[str, float]]:
  steps_per_iteration = trainer.env_steps_per_iteration
  with checkpointing.Checkpointer(_checkpoint_dir(config.logdir),
                                  max_to_keep=CHECKPOINTS_TO_KEEP) as ckpt:
    if config.resume:
      iteration, state = _restore(config, trainer, ckpt, stream)
      if iteration >= total_iterations:
        print(f"note: the checkpoint is at iteration {iteration} "
              f"({iteration * steps_per_iteration} env steps), at or past "
              f"--total_env_steps={config.total_env_steps}: nothing to train",
              file=stream, flush=True)
    else:
      iteration = 0
      state = trainer.init()
    write_config_json(config)
    print(f"{config.agent} on {config.env}"
          f"{' (' + config.env_args + ')' if config.env_args else ''}: "
          f"{trainer.num_devices} device(s), {steps_per_iteration} env steps "
          f"per iteration, iterations {iteration}->{total_iterations}, "
          f"logdir {config.logdir}", file=stream, flush=True)
    with logging_utils.MetricsWriter(
        config.logdir,
        resume_iteration=iteration if config.resume else None,
        resume_step=iteration * steps_per_iteration) as writer:
      record = _IterationRecord(ckpt)
      start_time = last_line_time = clock()
      last_line_steps = float(iteration * steps_per_iteration)
      pending = None  # newest iteration's metrics, not yet in `record`
      host_metrics: Dict[str, float] = {}
      events = compile_watch.CompileEvents.install()
      launch_time = clock()
      first_iteration = iteration + 1
      first_signature = None
      while iteration < total_iterations:
        # Any trace after the first iteration's means it compiled again. The
        # (donated) input keeps its types, read only when that happens.
        previous_state = state
        traces_before = events.counts()["traces"]
        state, metrics = trainer.train_iteration(state)
        iteration += 1
        if first_signature is None:
          first_signature = compile_watch.input_signature(previous_state)
          jax.block_until_ready(metrics)
          print(_startup_line(events.counts(), clock() - launch_time),
                file=stream, flush=True)
        elif events.counts()["traces"] > traces_before:
          signature = compile_watch.input_signature(previous_state)
          print(f"warning: the training iteration compiled again at "
                f"iteration {iteration} (cause: "
                f"{compile_watch.signature_change(first_signature, signature)})"
                f"; expect a pause", file=stream, flush=True)
          first_signature = signature
        del previous_state
        # Fetching the previous iteration's counters lets the device run this
        # one meanwhile, while still bounding how far the host runs ahead.
        if pending is not None:
          record.add(pending)
        pending = metrics
        is_last = iteration == total_iterations
        every = config.checkpoint_every_iterations
        checkpoint_due = is_last or bool(every and iteration % every == 0)
        # A row at every checkpoint: a resume then truncates metrics.csv to
        # that row, leaving no gap and no duplicate.
        # The first line comes right after the first (compiling) iteration.
        if (checkpoint_due or iteration == first_iteration
            or clock() - last_line_time >= config.log_every_seconds):
          record.add(pending)  # raises before a non-finite state is saved
          pending = None
          host_metrics = {k: _scalar(v)
                          for k, v in jax.device_get(metrics).items()}
          now = clock()
          env_steps = host_metrics["env_steps"]
          steps_per_s = (env_steps - last_line_steps) / max(
              now - last_line_time, 1e-9)
          elapsed_s = writer.resumed_elapsed_s + now - start_time
          episodes = record.episodes
          writer.write(_interval_row(host_metrics, episodes, elapsed_s,
                                     steps_per_s), step=int(env_steps))
          # The first line's rate includes compilation: no estimate from it.
          first_line = last_line_time == start_time
          remaining_s = ((config.total_env_steps - env_steps) / steps_per_s
                         if steps_per_s > 0 and not first_line else math.nan)
          print(logging_utils.format_progress(logging_utils.Progress(
              elapsed_s=elapsed_s, iteration=iteration, env_steps=env_steps,
              env_steps_per_s=steps_per_s, mean_return=episodes.mean_return,
              success_rate=episodes.success_rate,
              kl=host_metrics.get("kl_actor_learner", math.nan),
              eta=host_metrics.get("eta", math.nan),
              alpha=host_metrics.get("alpha", math.nan),
              remaining_s=max(remaining_s, 0.0) if math.isfinite(remaining_s)
              else remaining_s)), file=stream, flush=True)
          episodes.reset()
          last_line_time, last_line_steps = now, env_steps
        if checkpoint_due:
          ckpt.save(iteration, trainer.to_host(state))
  return state, host_metrics


def evaluate_and_save(trainer: Any, state: Any, config: Config,
                      stream: Optional[TextIO] = None) -> Dict[str, float]:
  """Greedy evaluation on fresh seeds; printed and written to eval.json."""
  stream = stream or sys.stdout
  result = trainer.evaluate(state, seed=config.seed + EVAL_SEED_OFFSET,
                            num_episodes=config.eval_episodes)
  result = {k: _scalar(v) for k, v in result.items()}
  with open(os.path.join(config.logdir, EVAL_JSON), "w") as f:
    json.dump(result, f, indent=2, sort_keys=True)
  print(f"eval ({int(result.get('eval_episodes', config.eval_episodes))} "
        f"greedy episodes): return "
        f"{logging_utils.format_value(result['eval_return'], 3)}  success "
        f"{result['eval_success_rate']:.0%}", file=stream, flush=True)
  return result

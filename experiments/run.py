r"""Trains one agent on one environment: the ald_jax command-line entry point.

    python experiments/run.py --flagfile=experiments/configs/recall_ald.cfg \
        --logdir=runs/recall_ald_s0 --seed=0

Every `ald_jax.config.Config` field is a flag of the same name (`--helpfull`
lists them). All flags, the env arguments and the logdir are checked before
anything is compiled; a bad value exits with status 2 and one line
`run.py: error: --<flag>: <reason>`.

Writes to `--logdir`: `config.json`, `metrics.csv` (one row per progress line),
TensorBoard event files, `checkpoints/<iteration>/` and, after the final greedy
evaluation, `eval.json`. `--resume` continues from the latest checkpoint.
"""
import os
import sys

# Run as `python experiments/run.py`, Python puts experiments/ (not the repo
# root) on sys.path; the ald_jax and envs packages live in the repo root.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)
# XLA sizes its CPU thread pool from the core count; on 2-core machines programs
# with cross-device collectives (pmap over several CPU devices) can deadlock
# unless it is told there are more. Read when jax is imported, so set it first.
os.environ.setdefault("NPROC", "4")

# pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses
import importlib
import json
import math
import time
from typing import (Any, Callable, Dict, List, NoReturn, Optional, Sequence,
                    TextIO, Tuple)

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from ald_jax import checkpointing
from ald_jax import config as config_lib
from ald_jax import logging_utils
from envs import api as env_api
from envs import registry
# pylint: enable=g-import-not-at-top,wrong-import-position

Config = config_lib.Config

CONFIG_JSON = "config.json"
EVAL_JSON = "eval.json"
CHECKPOINT_SUBDIR = "checkpoints"
CHECKPOINTS_TO_KEEP = 3
EVAL_SEED_OFFSET = 10_000
# Fields that may change when resuming: they do not change what is trained.
RESUMABLE_FIELDS = frozenset({
    "total_env_steps", "logdir", "log_every_seconds",
    "checkpoint_every_iterations", "resume", "eval_episodes"})
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


def build_env(config: Config) -> env_api.Environment:
  """Constructs the env (cheap, compiles nothing).

  Raises:
    ValueError: 'env: ...' when the name does not resolve, 'env_args: ...'
      when the env rejects its arguments.
  """
  kwargs = config_lib.parse_env_args(config.env_args)
  try:
    return registry.make(config.env, **kwargs)
  except (ValueError, TypeError, ImportError, AttributeError) as err:
    field = "env_args" if _factory_resolves(config.env) else "env"
    raise ValueError(f"{field}: {err}") from err


def _checkpoint_dir(logdir: str) -> str:
  return os.path.join(logdir, CHECKPOINT_SUBDIR)


def latest_checkpoint(logdir: str) -> Optional[int]:
  """Latest checkpointed iteration in `logdir` or None; creates nothing."""
  if not os.path.isdir(_checkpoint_dir(logdir)):
    return None
  with checkpointing.Checkpointer(_checkpoint_dir(logdir)) as ckpt:
    return ckpt.latest_step()


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
    with open(saved_path) as f:
      saved = json.load(f)
    for field in dataclasses.fields(Config):
      if field.name in RESUMABLE_FIELDS or field.name not in saved:
        continue
      if saved[field.name] != getattr(config, field.name):
        raise ValueError(f"{field.name}: differs from the run being resumed "
                         f"({saved[field.name]!r} in {saved_path}; got "
                         f"{getattr(config, field.name)!r})")


def prepare(config: Config) -> env_api.Environment:
  """Every check that needs no compilation; returns the env.

  Raises:
    ValueError: '<field>: <reason>' for the first problem found.
  """
  config.validate()
  env = build_env(config)
  check_logdir(config)
  return env


# ------------------------------------------------------------- training ---


def _scalar(value: Any) -> float:
  """A host float from a scalar (or device-replicated) metric."""
  return float(np.ravel(np.asarray(value))[0])


def _fetch_episode_counts(metrics: Dict[str, Any]
                          ) -> Tuple[float, float, float]:
  """(episodes finished, their return sum, successes) of one iteration."""
  values = jax.device_get(tuple(metrics[k] for k in _EPISODE_COUNTERS))
  return tuple(_scalar(v) for v in values)


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
  with open(os.path.join(config.logdir, CONFIG_JSON), "w") as f:
    json.dump(dataclasses.asdict(config), f, indent=2, sort_keys=True)


def train(config: Config, env: env_api.Environment, *,
          trainer: Any = None,
          stream: Optional[TextIO] = None,
          clock: Callable[[], float] = time.monotonic,
          ) -> Tuple[Any, Dict[str, float]]:
  """Runs (or resumes) training until `config.total_env_steps`.

  Args:
    config: a validated Config (see `prepare`).
    env: the environment.
    trainer: an `ald_jax.training.Trainer`; built from config and env if None.
    stream: where progress lines go (default sys.stdout).
    clock: seconds, monotonic (injectable for tests).
  Returns:
    (final device state, the host metrics of the last iteration as floats;
    empty when a resumed run had nothing left to do).
  Raises:
    ValueError: config.resume without a checkpoint, or one that does not fit.
  """
  stream = stream or sys.stdout
  if trainer is None:
    # Imported on use: the flag checks and flagfile parsing need none of it.
    from ald_jax import training  # pylint: disable=g-import-not-at-top
    trainer = training.make_trainer(config, env)
  steps_per_iteration = trainer.env_steps_per_iteration
  total_iterations = math.ceil(config.total_env_steps / steps_per_iteration)
  write_config_json(config)
  with checkpointing.Checkpointer(_checkpoint_dir(config.logdir),
                                  max_to_keep=CHECKPOINTS_TO_KEEP) as ckpt:
    if config.resume:
      iteration = ckpt.latest_step()
      if iteration is None:
        raise ValueError(f"resume: no checkpoint in {ckpt.directory}")
      like = trainer.to_host(trainer.init())
      state = trainer.from_host(ckpt.restore(iteration, like))
    else:
      iteration = 0
      state = trainer.init()
    print(f"{config.agent} on {config.env}"
          f"{' (' + config.env_args + ')' if config.env_args else ''}: "
          f"{trainer.num_devices} device(s), {steps_per_iteration} env steps "
          f"per iteration, iterations {iteration}->{total_iterations}, "
          f"logdir {config.logdir}", file=stream, flush=True)
    with logging_utils.MetricsWriter(
        config.logdir,
        resume_iteration=iteration if config.resume else None) as writer:
      episodes = logging_utils.EpisodeAccumulator()
      start_time = last_line_time = clock()
      last_line_steps = float(iteration * steps_per_iteration)
      pending = None  # newest iteration's metrics, not yet in `episodes`
      host_metrics: Dict[str, float] = {}
      while iteration < total_iterations:
        state, metrics = trainer.train_iteration(state)
        iteration += 1
        # Fetching the previous iteration's counters lets the device run this
        # one meanwhile, while still bounding how far the host runs ahead.
        if pending is not None:
          episodes.add(*_fetch_episode_counts(pending))
        pending = metrics
        is_last = iteration == total_iterations
        if is_last or clock() - last_line_time >= config.log_every_seconds:
          episodes.add(*_fetch_episode_counts(pending))
          pending = None
          host_metrics = {k: _scalar(v)
                          for k, v in jax.device_get(metrics).items()}
          now = clock()
          env_steps = host_metrics["env_steps"]
          steps_per_s = (env_steps - last_line_steps) / max(
              now - last_line_time, 1e-9)
          elapsed_s = writer.resumed_elapsed_s + now - start_time
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
        every = config.checkpoint_every_iterations
        if is_last or (every and iteration % every == 0):
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


# ----------------------------------------------------------------- main ---


def _error_line(err: Exception) -> str:
  """'run.py: error: --<flag>: <reason>' from a '<field>: <reason>' error."""
  message = " ".join(str(err).split())
  name, sep, reason = message.partition(": ")
  if sep and name in {f.name for f in dataclasses.fields(Config)}:
    message = f"--{name}: {reason}"
  return f"run.py: error: {message}"


def _exit_with_error(err: Exception) -> NoReturn:
  print(_error_line(err), file=sys.stderr, flush=True)
  sys.exit(2)


def _parse_flags_or_exit(argv: List[str]) -> List[str]:
  """absl's flags parser, reporting bad flags in one line (no usage dump)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as err:
    _exit_with_error(err)


def main(argv: Sequence[str]) -> None:
  if not flags.FLAGS["verbosity"].present:
    # orbax logs every checkpoint step at INFO; keep stderr for problems.
    logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    _exit_with_error(ValueError(f"unexpected positional arguments {argv[1:]}"))
  config = config_from_flags(flags.FLAGS)
  try:
    env = prepare(config)
    from ald_jax import training  # pylint: disable=g-import-not-at-top
    trainer = training.make_trainer(config, env)
  except ValueError as err:
    _exit_with_error(err)
  state, _ = train(config, env, trainer=trainer)
  evaluate_and_save(trainer, state, config)


if __name__ == "__main__":
  define_config_flags(flags.FLAGS)
  app.run(main, flags_parser=_parse_flags_or_exit)

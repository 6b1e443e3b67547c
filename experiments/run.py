r"""Trains one agent on one environment: the ald_jax command-line entry point.

    python experiments/run.py --flagfile=experiments/configs/recall_ald.cfg \
        --logdir=runs/recall_ald_s0 --seed=0

Every `ald_jax.config.Config` field is a flag of the same name (`--helpfull`
lists them). All flags, the env (one traced `reset` and `step`), the memory the
buffers need and the logdir are checked before anything is compiled or
written; a bad value exits with status 2 and one line
`run.py: error: --<flag>: <reason>`.

Writes to `--logdir`: `config.json`, `metrics.csv` (one row per progress line
and one at every checkpoint), TensorBoard event files, `checkpoints/<iteration>/`
(verified by a checksum) and, after the final greedy evaluation, `eval.json`.
`--resume` continues from the newest checkpoint that verifies. The logdir is
locked for the run's lifetime (`.lock`). The checks and the training loop are
`ald_jax.runner`; this script adds the command line and the exit codes. Exit codes: 0 done, 2 bad input
(flags, env, logdir, checkpoints, memory, disk), 3 a non-finite loss, gradient
or parameter (the run stops before checkpointing it; see docs/reliability.md).
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
import errno
from typing import List, NoReturn, Optional, Sequence

from absl import app
from absl import flags
from absl import logging

from ald_jax import compile_watch
# The library names this script has always offered (tests and notebooks use
# them as `run.<name>`); they live in ald_jax.runner.
from ald_jax.runner import (  # pylint: disable=unused-import
    ACTOR_LATENCY_JSON, CHECKPOINT_SUBDIR, CONFIG_JSON, EVAL_JSON,
    RESUMABLE_FIELDS, Config, NonFiniteError,
    build_env, check_actor_latency, check_logdir, check_memory,
    config_from_flags, define_config_flags, evaluate_and_save,
    latest_checkpoint, parse_config, prepare, train, write_config_json)
# pylint: enable=g-import-not-at-top,wrong-import-position

EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3

# ----------------------------------------------------------------- main ---


def _error_line(err: Exception) -> str:
  """'run.py: error: --<flag>: <reason>' from a '<field>: <reason>' error."""
  message = " ".join(str(err).split())
  name, sep, reason = message.partition(": ")
  if sep and name in {f.name for f in dataclasses.fields(Config)}:
    message = f"--{name}: {reason}"
  return f"run.py: error: {message}"


def _exit_with_error(err: Exception, code: int = EXIT_BAD_INPUT) -> NoReturn:
  print(_error_line(err), file=sys.stderr, flush=True)
  sys.exit(code)


def _flagfiles(argv: Sequence[str]) -> List[str]:
  """The --flagfile paths named on the command line."""
  paths = []
  for i, arg in enumerate(argv):
    if arg.startswith("--flagfile="):
      paths.append(arg.partition("=")[2])
    elif arg == "--flagfile" and i + 1 < len(argv):
      paths.append(argv[i + 1])
  return paths


def _with_env_override_hint(err: ValueError, argv: Sequence[str],
                            config: Config) -> ValueError:
  """Says where --env_args came from when --env was changed on top of a
  flagfile whose --env_args were meant for its own env."""
  on_command_line = lambda name: any(  # noqa: E731
      arg == f"--{name}" or arg.startswith(f"--{name}=") for arg in argv)
  if (str(err).startswith("env_args:") and _flagfiles(argv)
      and on_command_line("env") and not on_command_line("env_args")):
    return ValueError(
        f"{err} -- --env={config.env} was given on the command line but "
        f"--env_args={config.env_args!r} comes from the flagfile, where it was "
        f"meant for that file's env; pass --env_args=... for {config.env} "
        f"(--env_args= for its defaults)")
  return err


def _parse_flags_or_exit(argv: List[str]) -> List[str]:
  """absl's flags parser, reporting bad flags in one line (no usage dump).

  With --only_check_args, runs every pre-compile check too and exits 0 or 2.
  """
  for path in _flagfiles(argv):
    if not os.path.isfile(path):
      _exit_with_error(ValueError(f"--flagfile: no such file: {path}"))
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as err:
    # absl prefixes some messages with 'ERROR:' fragments; drop them.
    _exit_with_error(ValueError(str(err).replace("ERROR::", "").strip()))
  if flags.FLAGS.only_check_args:
    try:
      if len(rest) > 1:
        raise ValueError(f"unexpected positional arguments {rest[1:]}")
      prepare(config_from_flags(flags.FLAGS))
    except ValueError as err:
      _exit_with_error(err)
    print("run.py: flags ok", flush=True)
    sys.exit(0)
  return rest


def _os_error(err: BaseException) -> Optional[OSError]:
  """The OSError that caused `err` (orbax wraps those of its writer), if any."""
  seen = set()
  while err is not None and id(err) not in seen:
    if isinstance(err, OSError):
      return err
    seen.add(id(err))
    err = err.__cause__ or err.__context__
  return None


def _out_of_memory(err: BaseException) -> bool:
  return "RESOURCE_EXHAUSTED" in str(err) or "Out of memory" in str(err)


def main(argv: Sequence[str]) -> None:
  if not flags.FLAGS["verbosity"].present:
    # orbax logs every checkpoint step at INFO; keep stderr for problems.
    logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    _exit_with_error(ValueError(f"unexpected positional arguments {argv[1:]}"))
  config = config_from_flags(flags.FLAGS)
  try:
    env = prepare(config)
    cache_dir = compile_watch.resolve_cache_dir(config.compilation_cache_dir)
    if cache_dir:
      compile_watch.enable_persistent_cache(cache_dir)
    if config.runtime == "distributed":
      from ald_jax import distributed  # pylint: disable=g-import-not-at-top
      latency_report = check_actor_latency(config, env, None)
      state, _ = train(config, env, actor_latency=latency_report)
      evaluate_and_save(distributed.Evaluator(config, env), state, config)
      return
    from ald_jax import training  # pylint: disable=g-import-not-at-top
    trainer = training.make_trainer(config, env)
    latency_report = check_actor_latency(config, env, trainer)
    state, _ = train(config, env, trainer=trainer,
                     actor_latency=latency_report)
    evaluate_and_save(trainer, state, config)
  except NonFiniteError as err:
    _exit_with_error(err, EXIT_NONFINITE)
  except ValueError as err:
    _exit_with_error(_with_env_override_hint(err, sys.argv[1:], config))
  except Exception as err:  # pylint: disable=broad-except
    os_error = _os_error(err)
    if os_error is not None:
      _exit_with_error(ValueError(
          f"logdir: cannot write to {config.logdir}: "
          f"{os_error.strerror or os_error}"
          + (" (disk full)" if os_error.errno == errno.ENOSPC else "")))
    if _out_of_memory(err):
      first_line = str(err).strip().splitlines()[0][:120]
      _exit_with_error(ValueError(
          f"num_envs: out of memory ({first_line}); reduce --num_envs, "
          f"--unroll_length, --replay_segments or the model sizes"))
    raise


if __name__ == "__main__":
  define_config_flags(flags.FLAGS)
  app.run(main, flags_parser=_parse_flags_or_exit)

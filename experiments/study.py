r"""The reproduction study: four agents x seeds, a sizing sweep, a K sweep.

    python experiments/study.py                # every phase, then the report
    python experiments/study.py --phases=main --envs=imaze --seeds=0,1,2
    python experiments/study.py --only_report         # rebuild docs/results_round1.md

Each run is one `experiments/run.py` training run (same Config, same
`ald_jax.runner.train`), done in-process one after another. Its flags are
`<--config_dir>/<env>.cfg` (default experiments/configs/study/) plus `--agent`, `--seed`,
`--total_env_steps` (the env's budget) and, for sweep runs, one override. A run
lives in `<runs_dir>/<env>-<env_args>-<budget>/<agent>[-<override>]-s<seed>`,
so identical runs requested by two phases (e.g. the sizing sweep at the chosen
setting and the main study) are trained once. A logdir holding `eval.json` is
complete and skipped; any other existing logdir is an interrupted run and is
trained again from scratch.

Phases:
  sizing: lstm and gtrxl, first seed only, at each `--sizing` env setting.
  main:   every agent of `--agents` x every seed, at the cfg's env setting.
  sweep:  ald on `--sweep_env` with each `--sweep` override, every seed.
  scale:  `--scale_agents` on `--sweep_env` with each `--scale` override.
  extra:  each `--extra` env:agent:overrides, every seed.
  acting: the acting throughput of each main agent (first seed's config).
The report (`--out` X.md, with figures, summary.csv and the run archive in X/)
is always rebuilt from whatever runs of the requested plan exist. A section of
the existing report between the ANALYSIS markers is kept verbatim.

Wall-clock: `elapsed_s` of metrics.csv. Before `runner.train` starts its clock the
study compiles the iteration (one throw-away iteration of a fresh state; the
same seed makes `runner.train` start from the identical state), so curves and
times-to-threshold exclude XLA compilation; compile time is reported apart.
"""
import os
import sys

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (_REPO_ROOT, os.path.join(_REPO_ROOT, "experiments")):
  if _path not in sys.path:
    sys.path.insert(0, _path)
os.environ.setdefault("NPROC", "4")  # see run.py

# pylint: disable=g-import-not-at-top,wrong-import-position
import csv
import dataclasses
import json
import math
import re
import shutil
import time
from typing import (Dict, List, NamedTuple, Optional, Sequence, TextIO,
                    Tuple)

from absl import app
from absl import flags
from absl import logging
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import plot as plot_lib
from ald_jax import agents as agents_lib
from ald_jax import config as config_lib
from ald_jax import logging_utils
from ald_jax import runner
# pylint: enable=g-import-not-at-top,wrong-import-position

AGENT_ORDER = agents_lib.AGENTS  # lstm, gtrxl, asym, ald
STUDY_JSON = "study.json"
ANALYSIS_START = "<!-- ANALYSIS:START (kept when the report is rebuilt) -->"
ANALYSIS_END = "<!-- ANALYSIS:END -->"

_FLAGS = flags.FLAGS
flags.DEFINE_list("envs", ["imaze", "metafetch"], "Envs of the main study.")
flags.DEFINE_list("agents", list(AGENT_ORDER), "Agents of the main study.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of every multi-seed phase; "
                  "the sizing sweep uses the first.")
flags.DEFINE_list("main_seeds", [], "env=seed:seed:... overrides of --seeds "
                  "for that env's main runs, e.g. imaze=0:1:2:3:4.")
flags.DEFINE_list("budgets", [], "env=steps overrides of the cfg's "
                  "total_env_steps, e.g. imaze=600000.")
flags.DEFINE_list("phases", ["sizing", "main", "sweep", "extra", "scale",
                             "acting"],
                  "Phases to run: sizing, main, sweep, extra, scale, acting "
                  "(the report is always written).")
SIZING_CANDIDATES = (
    "imaze:corridor_length=4", "imaze:corridor_length=6",
    "imaze:corridor_length=8", "metafetch:size=5,num_objects=3",
    "metafetch:size=4,num_objects=2")
LARGER_LEARNER = ("gtrxl_layers=4,gtrxl_heads=4,gtrxl_d_model=128,"
                  "gtrxl_mlp_width=256,total_env_steps=400000")
flags.DEFINE_multi_string("sizing", list(SIZING_CANDIDATES), "env:env_args "
                          "candidates of the sizing sweep, e.g. "
                          "'imaze:corridor_length=8'.")
flags.DEFINE_string("sweep_env", "imaze", "Env of the ald override sweep.")
flags.DEFINE_multi_string("sweep", [f"distill_steps_per_rl_step={k}"
                                    for k in (1, 2, 4, 8)],
                          "ald runs with one 'field=value[,field=value]' "
                          "Config override each.")
flags.DEFINE_multi_string("scale", [LARGER_LEARNER], "'field=value[,...]' "
                          "Config overrides (e.g. a larger GTrXL) run for "
                          "--scale_agents on --sweep_env, every seed.")
flags.DEFINE_multi_string("extra",
                          ["metafetch:ald:distill_steps_per_rl_step=8"],
                          "env:agent:field=value[,...] runs, every seed.")
flags.DEFINE_list("scale_agents", ["gtrxl", "ald"], "Agents of the scale "
                  "group.")
flags.DEFINE_list("thresholds", ["imaze=success_rate:0.9",
                                 "metafetch=episode_return:10.0"],
                  "env=metric:value: the smoothed training metric that counts "
                  "as 'reached'.")
flags.DEFINE_integer("min_window_episodes", 32, "Fewest finished episodes "
                     "in a smoothing window for its row to count (fewer: no "
                     "value, so never 'reached').")
flags.DEFINE_integer("smooth_env_steps", 20_000, "Window (env steps) of the "
                     "episode-weighted smoothing of the training metric.")
flags.DEFINE_string("config_dir", os.path.join(_REPO_ROOT, "experiments",
                                               "configs", "study"),
                    "Where the study's <env>.cfg flagfiles live.")
flags.DEFINE_string("runs_dir", "/work/study_runs", "Root of the run logdirs.")
flags.DEFINE_string("archive_dir", "auto",
                    "Where each complete run's small files (config, eval, "
                    "metrics.csv) are copied; a run found here is complete, "
                    "so a study continues across machines and sessions from "
                    "what is committed. auto: <report dir>/runs; empty: no "
                    "archive.")
flags.DEFINE_string("out", os.path.join(_REPO_ROOT, "docs",
                                        "results_round1.md"),
                    "The report X.md; figures and summary.csv go to "
                    "<its dir>/X/ (docs/results_round1.md: "
                    "docs/results_round1/).")
flags.DEFINE_bool("only_report", False, "Train nothing; rebuild the report.")
flags.DEFINE_integer("acting_iterations", 20, "Rollouts timed per agent by "
                     "the acting phase.")


# ------------------------------------------------------------------ plan ---


class RunSpec(NamedTuple):
  """One training run of the study.

  group: 'sizing', 'main' or 'sweep'. label: its line in tables and plots.
  argv: run.py-style flags (without the program name) defining its Config.
  """
  group: str
  env: str
  env_args: str
  agent: str
  seed: int
  budget: int
  label: str
  logdir: str
  argv: Tuple[str, ...]


def _slug(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9.]+", "", text.replace(",", "_")) or "default"


def parse_key_values(items: Sequence[str], name: str) -> Dict[str, str]:
  """['a=1', 'b=x:2'] -> {'a': '1', 'b': 'x:2'}; ValueError naming `name`."""
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key or not value:
      raise ValueError(f"{name}: expected key=value, got {item!r}")
    out[key] = value
  return out


def parse_thresholds(items: Sequence[str]) -> Dict[str, Tuple[str, float]]:
  """['imaze=success_rate:0.9'] -> {'imaze': ('success_rate', 0.9)}."""
  out = {}
  for env, value in parse_key_values(items, "thresholds").items():
    metric, _, number = value.partition(":")
    if metric not in plot_lib.METRICS:
      raise ValueError(f"thresholds: metric must be one of "
                       f"{plot_lib.METRICS}, got {metric!r}")
    out[env] = (metric, float(number))
  return out


def base_config(env: str, config_dir: str) -> runner.Config:
  path = os.path.join(config_dir, f"{env}.cfg")
  if not os.path.exists(path):
    raise ValueError(f"envs: no study config {path}")
  return runner.parse_config(["study", f"--flagfile={path}"])


def make_spec(group: str, env: str, agent: str, seed: int, *, config_dir: str,
              runs_dir: str, budgets: Dict[str, int],
              env_args: Optional[str] = None, override: str = "",
              label: Optional[str] = None) -> RunSpec:
  """The RunSpec of one run; its logdir is a function of what it trains."""
  base = base_config(env, config_dir)
  env_args = base.env_args if env_args is None else env_args
  budget = budgets.get(env, base.total_env_steps)
  fields = config_lib.parse_env_args(override)
  budget = int(fields.pop("total_env_steps", budget))  # an override wins
  folder = f"{env}-{_slug(env_args)}-{budget}"
  name = f"{agent}{'-' + _slug(override) if override else ''}-s{seed}"
  logdir = os.path.join(runs_dir, folder, name)
  argv = [f"--flagfile={os.path.join(config_dir, f'{env}.cfg')}",
          f"--agent={agent}", f"--seed={seed}", f"--env_args={env_args}",
          f"--total_env_steps={budget}", f"--logdir={logdir}"]
  argv += [f"--{k}={v}" for k, v in fields.items()]
  return RunSpec(group, env, env_args, agent, seed, budget, label or agent,
                 logdir, tuple(argv))


def plan(config_dir: str, runs_dir: str) -> List[RunSpec]:
  """Every run the flags ask for, sizing first, in execution order."""
  seeds = [int(s) for s in _FLAGS.seeds]
  if not seeds:
    raise ValueError("seeds: need at least one")
  budgets = {k: int(v) for k, v in
             parse_key_values(_FLAGS.budgets, "budgets").items()}
  common = dict(config_dir=config_dir, runs_dir=runs_dir, budgets=budgets)
  specs = []
  for candidate in filter(None, _FLAGS.sizing):  # --sizing= : none
    env, sep, env_args = candidate.partition(":")
    if not sep:
      raise ValueError(f"sizing: expected env:env_args, got {candidate!r}")
    for agent in ("lstm", "gtrxl"):
      specs.append(make_spec("sizing", env, agent, seeds[0], env_args=env_args,
                             label=f"{agent} {env_args}", **common))
  main_seeds = {env: [int(s) for s in value.split(":")] for env, value in
                parse_key_values(_FLAGS.main_seeds, "main_seeds").items()}
  for env in _FLAGS.envs:
    for agent in _FLAGS.agents:
      if agent not in AGENT_ORDER:
        raise ValueError(f"agents: unknown agent {agent!r}")
      for seed in main_seeds.get(env, seeds):
        specs.append(make_spec("main", env, agent, seed, **common))
  if _FLAGS.sweep_env:
    base = base_config(_FLAGS.sweep_env, config_dir)
    for override in _FLAGS.sweep:
      fields = config_lib.parse_env_args(override)
      unchanged = all(getattr(base, k) == v for k, v in fields.items())
      for seed in seeds:
        specs.append(make_spec(
            "sweep", _FLAGS.sweep_env, "ald", seed,
            override="" if unchanged else override,
            label=f"ald {override}", **common))
    for override in filter(None, _FLAGS.scale):
      for agent in _FLAGS.scale_agents:
        for seed in seeds:
          specs.append(make_spec("scale", _FLAGS.sweep_env, agent, seed,
                                 override=override, label=agent, **common))
  for item in filter(None, _FLAGS.extra):
    env, agent, override = (item.split(":", 2) + ["", ""])[:3]
    if agent not in AGENT_ORDER:
      raise ValueError(f"extra: expected env:agent:overrides, got {item!r}")
    for seed in seeds:
      specs.append(make_spec("extra", env, agent, seed, override=override,
                             label=f"{agent} {override}", **common))
  return specs


# -------------------------------------------------------------- training ---


def _comparable(config_dict: Dict[str, object]) -> Dict[str, object]:
  return {k: v for k, v in config_dict.items()
          if k not in runner.RESUMABLE_FIELDS}


ARCHIVED_FILES = (runner.CONFIG_JSON, runner.EVAL_JSON, STUDY_JSON,
                  logging_utils.METRICS_CSV)


def archived_logdir(spec: RunSpec) -> Optional[str]:
  """The archive copy's folder of spec: <archive_dir>/<env folder>/<name>."""
  root = _FLAGS.archive_dir
  if root == "auto":
    root = os.path.join(report_dir(_FLAGS.out), "runs")
  if not root:
    return None
  folder, name = spec.logdir.rstrip("/").split("/")[-2:]
  return os.path.join(root, folder, name)


def _shown_path(path: str) -> str:
  """A path as the report shows it: relative to the repo when inside it."""
  path = os.path.abspath(path)
  inside = path.startswith(_REPO_ROOT + os.sep)
  return os.path.relpath(path, _REPO_ROOT) if inside else path


def report_dir(out: str) -> str:
  """Figures, summary.csv and the run archive of report X.md: beside it, X/."""
  return os.path.splitext(os.path.abspath(out))[0]


def completed_logdir(spec: RunSpec) -> Optional[str]:
  """Where spec's complete run is (its logdir, else the archive), or None."""
  for logdir in (spec.logdir, archived_logdir(spec)):
    if logdir and os.path.exists(os.path.join(logdir, runner.EVAL_JSON)):
      return logdir
  return None


def archive(spec: RunSpec) -> None:
  """Copies the small files of spec's complete run to the archive."""
  target = archived_logdir(spec)
  if not target:
    return
  os.makedirs(target, exist_ok=True)
  for name in ARCHIVED_FILES:
    if os.path.exists(os.path.join(spec.logdir, name)):
      shutil.copy2(os.path.join(spec.logdir, name), os.path.join(target, name))
  if os.path.exists(acting_path(spec)):
    shutil.copy2(acting_path(spec), archived_acting_path(spec))


def train_spec(spec: RunSpec, stream: TextIO) -> bool:
  """Trains one run unless complete; returns whether it trained.

  Raises:
    ValueError: a complete run in spec.logdir was trained with another config.
  """
  config = runner.parse_config(["study", *spec.argv])
  done = completed_logdir(spec)
  if done:
    with open(os.path.join(done, runner.CONFIG_JSON)) as f:
      saved = json.load(f)
    if _comparable(saved) != _comparable(dataclasses.asdict(config)):
      raise ValueError(f"runs_dir: {done} holds a run of another config; "
                       f"delete it or choose another --runs_dir")
    if done == spec.logdir:
      archive(spec)  # a run of an older study.py, or one archived elsewhere
    return False
  if os.path.isdir(spec.logdir):
    shutil.rmtree(spec.logdir)  # interrupted: start again
  env = runner.prepare(config)
  os.makedirs(spec.logdir, exist_ok=True)
  if config.runtime == "distributed":
    result, info = _train_distributed(config, env, spec)
  else:
    result, info = _train_sync(config, env, spec)
  with open(os.path.join(spec.logdir, STUDY_JSON), "w") as f:
    json.dump(info, f, indent=2, sort_keys=True)
  archive(spec)
  compile_note = (f"+{info['compile_s']:.0f}s compile"
                  if "compile_s" in info else "start-up and compile included")
  print(f"  done in {info['train_wall_s']:.0f}s ({compile_note}): eval "
        f"success {result['eval_success_rate']:.0%}, return "
        f"{result['eval_return']:.2f}", file=stream, flush=True)
  import jax  # pylint: disable=g-import-not-at-top  (--only_report: no JAX)
  jax.clear_caches()
  return True


def _train_sync(config: runner.Config, env, spec: RunSpec):
  """Compiles the iteration apart, then trains: wall-clock excludes XLA."""
  import jax  # pylint: disable=g-import-not-at-top
  from ald_jax import training  # pylint: disable=g-import-not-at-top
  trainer = training.make_trainer(config, env)
  start = time.monotonic()
  warm_state, _ = trainer.train_iteration(trainer.init())
  jax.block_until_ready(warm_state)
  info = {"compile_s": time.monotonic() - start}
  del warm_state
  start = time.monotonic()
  with open(os.path.join(spec.logdir, "progress.log"), "w") as log:
    state, _ = runner.train(config, env, trainer=trainer, stream=log)
    info["train_wall_s"] = time.monotonic() - start
    result = runner.evaluate_and_save(trainer, state, config, stream=log)
  return result, info


def _train_distributed(config: runner.Config, env, spec: RunSpec):
  """Trains through the Ray runtime; its processes compile on their own, so
  the wall-clock to threshold is counted from the first learner update (see
  `summarise`)."""
  from ald_jax import distributed  # pylint: disable=g-import-not-at-top
  start = time.monotonic()
  with open(os.path.join(spec.logdir, "progress.log"), "w") as log:
    state, _ = runner.train(config, env, stream=log)
    info = {"train_wall_s": time.monotonic() - start}
    result = runner.evaluate_and_save(distributed.Evaluator(config, env),
                                      state, config, stream=log)
  return result, info


def archived_acting_path(spec: RunSpec) -> Optional[str]:
  """The archive's copy of `acting_path(spec)` (None: no archive)."""
  archived = archived_logdir(spec)
  return archived and os.path.join(os.path.dirname(archived),
                                   os.path.basename(acting_path(spec)))


def acting_path(spec: RunSpec) -> str:
  """Where the acting phase stores the acting throughput of spec's agent."""
  return os.path.join(os.path.dirname(spec.logdir),
                      f"acting-{spec.agent}.json")


def measure_acting(spec: RunSpec, iterations: int) -> float:
  """Env steps/s of the agent's acting model collecting segments (no learning).

  Times `iterations` rollouts (`Trainer.collect`: acting model step + env step
  in a jitted scan over vmapped envs) after one compiling call, then each of
  the trainer's phases alone (ms per call, in the stored JSON); stored in
  `acting_path(spec)` and reused when present.
  """
  path = acting_path(spec)
  stored = _stored_acting(spec)
  if math.isfinite(stored):
    return stored
  import jax  # pylint: disable=g-import-not-at-top
  from ald_jax import training  # pylint: disable=g-import-not-at-top
  config = runner.parse_config(["study", *spec.argv])
  trainer = training.make_trainer(config, runner.build_env(config))
  state, segment = trainer.collect(trainer.init())  # compiles
  jax.block_until_ready(segment)
  start = time.monotonic()
  for _ in range(iterations):
    state, segment = trainer.collect(state)
  jax.block_until_ready(segment)
  rollout_s = (time.monotonic() - start) / iterations
  steps_per_s = trainer.env_steps_per_iteration / rollout_s
  phase_ms = {"rollout": 1000 * rollout_s}
  calls = {"learner_update": lambda: trainer.phases["learner_update"](
      state, segment)}
  if "distillation" in trainer.phases:
    calls["distillation"] = lambda: trainer.phases["distillation"](state)
  for name, call in calls.items():
    jax.block_until_ready(call())  # compiles
    start = time.monotonic()
    for _ in range(iterations):
      out = call()
    jax.block_until_ready(out)
    phase_ms[name] = 1000 * (time.monotonic() - start) / iterations
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump({"acting_env_steps_per_s": steps_per_s, "phase_ms": phase_ms,
               "iterations": iterations}, f, indent=2)
  if archived_acting_path(spec):
    os.makedirs(os.path.dirname(archived_acting_path(spec)), exist_ok=True)
    shutil.copy2(path, archived_acting_path(spec))
  jax.clear_caches()
  return steps_per_s


# -------------------------------------------------------------- analysis ---


def load_metrics(logdir: str) -> Dict[str, np.ndarray]:
  """Columns of logdir/metrics.csv as float64 [num_rows] arrays (NaN: empty)."""
  with open(os.path.join(logdir, logging_utils.METRICS_CSV),
            newline="") as f:
    rows = list(csv.DictReader(f))
  if not rows:
    return {}
  return {key: np.array([float(row[key] or "nan") for row in rows])
          for key in rows[0]}


def smoothed(env_steps: np.ndarray, values: np.ndarray, episodes: np.ndarray,
             window: float, min_episodes: float = 1.0) -> np.ndarray:
  """Episode-weighted mean of `values` over rows in (x - window, x] per row x.

  Args:
    env_steps: float64 [N], increasing.
    values: float64 [N], a per-row mean over that row's episodes (NaN if none).
    episodes: float64 [N], episodes finished in each row's interval.
    window: env steps.
    min_episodes: fewer finished episodes in a window give NaN. The first
      rows of a run hold only the episodes that ended early, i.e. at a goal:
      their success rate says nothing of the policy.
  Returns:
    float64 [N]; NaN where the window holds fewer than `min_episodes`
    finished episodes. Each row's own interval is always included, whatever
    its length.
  """
  weights = np.where(np.isfinite(values), episodes, 0.0)
  filled = np.where(weights > 0, values, 0.0)
  out = np.full(env_steps.shape, np.nan)
  for i, x in enumerate(env_steps):
    inside = (env_steps > x - window) & (env_steps <= x)
    inside[i] = True
    total = weights[inside].sum()
    if total > 0 and total >= min_episodes:
      out[i] = (weights[inside] * filled[inside]).sum() / total
  return out


def first_reach(curve: np.ndarray, threshold: float) -> Optional[int]:
  """Index of the first row whose smoothed value is >= threshold, or None."""
  hits = np.flatnonzero(np.nan_to_num(curve, nan=-np.inf) >= threshold)
  return int(hits[0]) if hits.size else None


def held_fraction(curve: np.ndarray, index: Optional[int],
                  threshold: float) -> float:
  """Share of the smoothed rows from the first reach on that are >= threshold.

  A first crossing can be a noisy excursion: 1.0 means the run stayed at
  the threshold, near 0 that it touched it once. Rows whose window is too
  thin (NaN) are left out. NaN if the run never reached.

  Args:
    curve: float64 [N], `smoothed` values.
    index: `first_reach(curve, threshold)`.
    threshold: the level that counts as reached.
  """
  if index is None:
    return math.nan
  after = curve[index:]
  after = after[np.isfinite(after)]
  return float(np.mean(after >= threshold))


class RunResult(NamedTuple):
  """What the report uses of one completed run (NaN: not reached/measured)."""
  spec: RunSpec
  reach_steps: float
  reach_s: float
  final_train: float
  held_after_reach: float
  eval_success: float
  eval_return: float
  steps_per_s: float
  acting_steps_per_s: float
  compile_s: float
  train_wall_s: float
  logdir: str
  kl_final: float


def summarise(spec: RunSpec, thresholds: Dict[str, Tuple[str, float]],
              window: float) -> Optional[RunResult]:
  """The RunResult of a complete run, None if it is not complete.

  Wall-clock excludes compilation in both runtimes: a sync run compiles
  before its clock starts (`_train_sync`); a distributed run's processes
  compile after it, so its times are counted from its first metrics row
  (written at the first learner update), and that start-up is its compile_s.
  """
  logdir = completed_logdir(spec)
  if logdir is None:
    return None
  metric, threshold = thresholds[spec.env]
  columns = load_metrics(logdir)
  curve = smoothed(columns["env_steps"], columns[metric],
                   columns["episodes"], window, _FLAGS.min_window_episodes)
  index = first_reach(curve, threshold)
  with open(os.path.join(logdir, runner.EVAL_JSON)) as f:
    evaluation = json.load(f)
  info = {}
  if os.path.exists(os.path.join(logdir, STUDY_JSON)):
    with open(os.path.join(logdir, STUDY_JSON)) as f:
      info = json.load(f)
  distributed_run = is_distributed_run(logdir)
  elapsed, steps = columns["elapsed_s"], columns["env_steps"]
  startup_s, startup_steps = ((float(elapsed[0]), float(steps[0]))
                              if distributed_run else (0.0, 0.0))
  if distributed_run:
    info["compile_s"] = startup_s
  kl = columns.get("kl_actor_learner", np.array([np.nan]))
  return RunResult(
      spec=spec,
      reach_steps=math.nan if index is None else steps[index],
      reach_s=math.nan if index is None else elapsed[index] - startup_s,
      final_train=float(curve[-1]),
      held_after_reach=held_fraction(curve, index, threshold),
      eval_success=evaluation["eval_success_rate"],
      eval_return=evaluation["eval_return"],
      steps_per_s=float((steps[-1] - startup_steps) /
                        max(elapsed[-1] - startup_s, 1e-9)),
      acting_steps_per_s=_stored_acting(spec),
      compile_s=info.get("compile_s", math.nan),
      train_wall_s=info.get("train_wall_s", math.nan) - startup_s,
      logdir=logdir,
      kl_final=float(np.nanmean(kl[-5:])) if np.any(np.isfinite(kl[-5:]))
      else math.nan)


def is_distributed_run(logdir: str) -> bool:
  with open(os.path.join(logdir, runner.CONFIG_JSON)) as f:
    return json.load(f).get("runtime") == "distributed"


def _acting_file(spec: RunSpec) -> Optional[str]:
  """The acting phase's JSON of spec's agent, in runs_dir or the archive."""
  for path in (acting_path(spec), archived_acting_path(spec)):
    if path and os.path.exists(path):
      return path
  return None


def _stored_acting(spec: RunSpec) -> float:
  path = _acting_file(spec)
  if path is None:
    return math.nan
  with open(path) as f:
    return json.load(f)["acting_env_steps_per_s"]


def phase_table(specs: Sequence[RunSpec]) -> List[str]:
  """Milliseconds per call of each trainer phase, one row per agent."""
  lines = []
  for spec in specs:
    if _acting_file(spec) is None:
      continue
    with open(_acting_file(spec)) as f:
      ms = json.load(f).get("phase_ms", {})
    if not lines:
      lines = ["| agent | rollout ms | learner update ms | distillation ms | "
               "sum ms | rollout share |", "|---|---|---|---|---|---|"]
    total = sum(ms.values())
    lines.append(f"| {spec.agent} | {ms.get('rollout', math.nan):.1f} | "
                 f"{ms.get('learner_update', math.nan):.1f} | "
                 f"{_count(ms.get('distillation', math.nan))} | {total:.1f} | "
                 f"{ms.get('rollout', math.nan) / total:.0%} |")
  return lines


class Aggregate(NamedTuple):
  """Across one label's seeds. *_reached: mean/std over seeds that reached;
  censored_steps/_s: mean with unreached seeds counted at the budget / at
  their full training time (a lower bound when any did not reach)."""
  label: str
  num_runs: int
  num_reached: int
  steps_mean: float
  steps_std: float
  seconds_mean: float
  seconds_std: float
  censored_steps: float
  censored_s: float
  eval_success: Tuple[float, float]
  eval_return: Tuple[float, float]
  final_train: Tuple[float, float]
  held_after_reach: float
  steps_per_s: float
  acting_steps_per_s: float
  compile_s: float
  kl_final: float


def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
  values = np.asarray([v for v in values if np.isfinite(v)], np.float64)
  if not values.size:
    return math.nan, math.nan
  return float(values.mean()), float(values.std())


def aggregate(label: str, results: Sequence[RunResult]) -> Aggregate:
  reached = [r for r in results if np.isfinite(r.reach_steps)]
  steps = _mean_std([r.reach_steps for r in reached])
  seconds = _mean_std([r.reach_s for r in reached])
  censored_steps = np.mean([r.reach_steps if np.isfinite(r.reach_steps)
                            else r.spec.budget for r in results])
  censored_s = np.mean([r.reach_s if np.isfinite(r.reach_s)
                        else r.train_wall_s for r in results])
  return Aggregate(
      label=label, num_runs=len(results), num_reached=len(reached),
      steps_mean=steps[0], steps_std=steps[1], seconds_mean=seconds[0],
      seconds_std=seconds[1], censored_steps=float(censored_steps),
      censored_s=float(censored_s),
      eval_success=_mean_std([r.eval_success for r in results]),
      eval_return=_mean_std([r.eval_return for r in results]),
      final_train=_mean_std([r.final_train for r in results]),
      held_after_reach=_mean_std([r.held_after_reach for r in results])[0],
      steps_per_s=_mean_std([r.steps_per_s for r in results])[0],
      acting_steps_per_s=_mean_std([r.acting_steps_per_s
                                    for r in results])[0],
      compile_s=_mean_std([r.compile_s for r in results])[0],
      kl_final=_mean_std([r.kl_final for r in results])[0])


# ---------------------------------------------------------------- report ---


def _count(value: float) -> str:
  return "-" if not np.isfinite(value) else f"{value:,.0f}"


def _k(steps: float) -> str:
  return "-" if not np.isfinite(steps) else f"{steps / 1000:.0f}k"


def _pm(pair: Tuple[float, float], digits: int = 2, scale: float = 1.0,
        unit: str = "") -> str:
  mean, std = pair
  if not np.isfinite(mean):
    return "-"
  return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}{unit}"


def _reach_cells(agg: Aggregate) -> Tuple[str, str]:
  if not agg.num_reached:
    return "not reached", "not reached"
  steps = (f"{agg.steps_mean / 1000:.0f}k ± {agg.steps_std / 1000:.0f}k")
  seconds = f"{agg.seconds_mean:.1f} ± {agg.seconds_std:.1f}"
  return steps, seconds


def _held(fraction: float) -> str:
  return "-" if not np.isfinite(fraction) else f"{fraction:.0%}"


def results_table(aggs: Sequence[Aggregate], metric: str) -> List[str]:
  final_name = "success" if metric == "success_rate" else "return"
  lines = [
      f"| agent | reached | env steps to threshold | wall-clock s to "
      f"threshold | held after reach | censored mean steps / s | greedy eval "
      f"success | greedy eval return | final train {final_name} | train env "
      f"steps/s | acting env steps/s | compile s |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for agg in aggs:
    steps, seconds = _reach_cells(agg)
    lines.append(
        f"| {agg.label} | {agg.num_reached}/{agg.num_runs} | {steps} | "
        f"{seconds} | {_held(agg.held_after_reach)} | "
        f"{_k(agg.censored_steps)} / {agg.censored_s:.1f} | "
        f"{_pm(agg.eval_success)} | {_pm(agg.eval_return)} | "
        f"{_pm(agg.final_train)} | {agg.steps_per_s:,.0f} | "
        f"{_count(agg.acting_steps_per_s)} | {agg.compile_s:.0f} |")
  return lines


def per_seed_table(results_by_label: Dict[str, List[RunResult]]) -> List[str]:
  seeds = sorted({r.spec.seed for rs in results_by_label.values() for r in rs})
  lines = ["| label | " + " | ".join(f"seed {s}: steps / s" for s in seeds)
           + " |", "|---|" + "---|" * len(seeds)]
  for label, results in results_by_label.items():
    by_seed = {r.spec.seed: r for r in results}
    cells = []
    for seed in seeds:
      r = by_seed.get(seed)
      if r is None:
        cells.append("not run")
      elif np.isfinite(r.reach_steps):
        cells.append(f"{_k(r.reach_steps)} / {r.reach_s:.1f}s")
      else:
        cells.append(f"> {_k(r.spec.budget)} (final {r.final_train:.2f})")
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return lines


def _ratio(numerator: float, denominator: float) -> str:
  if not (np.isfinite(numerator) and np.isfinite(denominator)):
    return "-"
  return f"{numerator / denominator:.2f}x"


def claim_verdict(value: float, limit: float, less: bool,
                  numerator_censored: bool, denominator_censored: bool) -> str:
  """Whether `value = a / b` meets `value <= limit` (less) or `>= limit`.

  A censored mean is a lower bound of the true one (a seed that never reached
  counts at the budget), so a censored numerator can only make the true ratio
  larger and a censored denominator only smaller. Returns "yes" or "no" where
  the bounds decide it, "undetermined" where they do not.
  """
  holds = value <= limit if less else value >= limit
  if numerator_censored and denominator_censored:
    return "undetermined"
  if numerator_censored:  # true ratio >= value
    decided = (not holds) if less else holds
  elif denominator_censored:  # true ratio <= value
    decided = holds if less else (not holds)
  else:
    decided = True
  if not decided:
    return "undetermined"
  return "yes" if holds else "no"


def claims_table(aggs: Dict[str, Aggregate]) -> List[str]:
  """The paper's headline checks, on censored means (lower bounds if any seed
  did not reach; see `claim_verdict`)."""
  lines = ["| check | measured | holds? |", "|---|---|---|"]
  lstm, gtrxl, asym, ald = (aggs.get(a) for a in AGENT_ORDER)

  def row(name, a, b, attr, limit, less=True):
    if a is None or b is None:
      lines.append(f"| {name} | not run | - |")
      return
    value = getattr(a, attr) / getattr(b, attr)
    a_censored, b_censored = (x.num_reached < x.num_runs for x in (a, b))
    censored = [x.label for x, c in ((a, a_censored), (b, b_censored)) if c]
    digits = 1 if attr == "censored_s" else 0
    lines.append(f"| {name} | {value:.2f}x ({getattr(a, attr):,.{digits}f} vs "
                 f"{getattr(b, attr):,.{digits}f})"
                 f"{' (censored: ' + ', '.join(censored) + ')' if censored else ''}"
                 f" | {claim_verdict(value, limit, less, a_censored, b_censored)}"
                 f" |")

  row("gtrxl needs >= 2x fewer env steps than lstm (lstm / gtrxl)", lstm,
      gtrxl, "censored_steps", 2.0, less=False)
  row("ald env steps <= 1.3x gtrxl's (ald / gtrxl)", ald, gtrxl,
      "censored_steps", 1.3)
  row("ald wall-clock < gtrxl's (ald / gtrxl)", ald, gtrxl, "censored_s",
      1.0 - 1e-9)
  row("ald wall-clock <= 1.5x lstm's (ald / lstm)", ald, lstm, "censored_s",
      1.5)
  row("asym worse than ald in env steps (asym / ald)", asym, ald,
      "censored_steps", 1.0 + 1e-9, less=False)
  row("ald fewer env steps than lstm (lstm / ald)", lstm, ald,
      "censored_steps", 1.0 + 1e-9, less=False)
  return lines


def plot_kl(results: Sequence[RunResult], out: str, window: float) -> None:
  """KL(actor || learner) over env steps, mean across seeds per label."""
  by_label: Dict[str, List[np.ndarray]] = {}
  for r in results:
    pairs = plot_lib.load_column_pair(r.logdir, "env_steps",
                                      "kl_actor_learner")
    if len(pairs):
      by_label.setdefault(r.spec.label, []).append(pairs)
  if not by_label:
    return
  figure, axes = plt.subplots(figsize=(6.4, 4.0))
  for label, runs in by_label.items():
    curve = plot_lib.aggregate(runs)
    axes.plot(curve.x, curve.mean, label=f"{label} (n={curve.num_runs})")
  axes.set_yscale("log")
  axes.set_xlabel("env steps")
  axes.set_ylabel("KL(actor || learner), nats")
  axes.set_title("actor-learner KL on the collected data")
  axes.grid(alpha=0.3)
  axes.legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(out, dpi=110)
  plt.close(figure)
  del window


def _kept_analysis(out: str) -> str:
  if os.path.exists(out):
    with open(out) as f:
      text = f.read()
    start, end = text.find(ANALYSIS_START), text.find(ANALYSIS_END)
    if 0 <= start < end:
      return text[start:end + len(ANALYSIS_END)]
  return (f"{ANALYSIS_START}\n(No analysis written yet.)\n{ANALYSIS_END}")


def write_summary_csv(results: Sequence[RunResult], path: str) -> None:
  fields = ["group", "env", "env_args", "label", "agent", "seed", "budget",
            "reach_steps", "reach_s", "held_after_reach", "final_train",
            "eval_success",
            "eval_return", "steps_per_s", "acting_steps_per_s", "compile_s",
            "train_wall_s", "kl_final"]
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(fields)
    for r in results:
      s = r.spec
      writer.writerow([s.group, s.env, s.env_args, s.label, s.agent, s.seed,
                       s.budget] + [f"{getattr(r, k):.6g}" for k in fields[7:]])


def _plots(results: Sequence[RunResult], name: str, fig_dir: str,
           metric: str, rel_dir: str) -> List[str]:
  lines = []
  logdirs = [r.logdir for r in results]
  labels = [r.spec.label for r in results]
  # A distributed run's clock starts before its processes compile: its time
  # axis starts at its first learner update, as its times to threshold do.
  startup_s = [r.compile_s if is_distributed_run(r.logdir) else 0.0
               for r in results]
  for x in ("env_steps", "time"):
    path = os.path.join(fig_dir, f"{name}_{x}.png")
    plot_lib.plot_curves(logdirs, path, x=x, metric=metric, labels=labels,
                         title=f"{name}: training {metric.replace('_', ' ')}",
                         x_offsets=startup_s if x == "time" else None)
    lines.append(f"![{name} by {x}]({rel_dir}/{os.path.basename(path)})")
  return lines


def write_report(specs: Sequence[RunSpec], out: str, argv: Sequence[str]
                 ) -> List[RunResult]:
  """Writes the markdown report, its figures and summary.csv."""
  thresholds = parse_thresholds(_FLAGS.thresholds)
  window = _FLAGS.smooth_env_steps
  fig_dir = report_dir(out)
  rel_dir = os.path.relpath(fig_dir, os.path.dirname(os.path.abspath(out)))
  os.makedirs(fig_dir, exist_ok=True)
  results, missing = [], []
  seen = set()
  for spec in specs:
    key = (spec.group, spec.logdir)
    if key in seen:
      continue
    seen.add(key)
    result = summarise(spec, thresholds, window)
    (results if result else missing).append(result or spec)
  write_summary_csv(results, os.path.join(fig_dir, "summary.csv"))

  lines = ["# Reproduction study: Actor-Learner Distillation", "",
           "Generated by `experiments/study.py` (numbers, tables, figures); "
           "only the Analysis section is written by hand.", "",
           "Command: `python experiments/study.py " + " ".join(argv) + "`", "",
           "## Protocol", ""]
  env_lines = []
  distributed = any(base_config(env, _FLAGS.config_dir).runtime ==
                    "distributed" for env in {s.env for s in specs})
  for env in sorted({s.env for s in specs if s.group != "sizing"}):
    metric, threshold = thresholds[env]
    base = base_config(env, _FLAGS.config_dir)
    cfg_path = os.path.join(_FLAGS.config_dir, f"{env}.cfg")
    budget = next(s.budget for s in specs if s.env == env)
    env_lines.append(
        f"- **{env}** (`{base.env_args}`): budget {budget:,} env steps per run;"
        f" "
        f"threshold: smoothed training {metric.replace('_', ' ')} >= "
        f"{threshold:g}. Config: `{_shown_path(cfg_path)}` "
        f"(num_envs {base.num_envs}, unroll {base.unroll_length}, LSTM "
        f"{base.lstm_hidden}, GTrXL {base.gtrxl_layers}x{base.gtrxl_d_model} "
        f"memory {base.gtrxl_memory_len}, {base.rl_loss}, K="
        f"{base.distill_steps_per_rl_step}, replay {base.replay_segments}, "
        f"alpha_reg {base.alpha_reg}).")
  lines += env_lines + [
      "",
      f"- **Reached**: the first metrics.csv row (one row per "
      f"`log_every_seconds` of training) at which the training-episode metric, "
      f"averaged over all episodes finished in the trailing window of "
      f"{window:,} env steps ending at that row (the row's own interval always "
      f"included; at least {_FLAGS.min_window_episodes} episodes, else the row "
      f"does not count), is >= the threshold. Env steps and wall-clock are that "
      f"row's `env_steps` and `elapsed_s`. *Held after reach*: the share of "
      f"the smoothed rows from that row on that stay >= the threshold (mean "
      f"over the seeds that reached): a first crossing can be a brief "
      f"excursion.",
      "- Training metrics come from the stochastic acting policy; *greedy eval*"
      " is `eval.json`: 64 argmax episodes of the acting model on fresh seeds "
      "after the budget.",
      "- Wall-clock excludes XLA compilation (one warm-up iteration before the "
      "clock starts; its time is the *compile s* column)." + (
          " A distributed-runtime run's processes compile after its clock "
          "starts, so its wall-clock and train env steps/s count from its "
          "first metrics row (the first learner update), and that start-up "
          "is its *compile s*." if distributed else "") + " *Acting env steps/s*:"
      f" the acting model collecting segments alone (`Trainer.collect`, "
      f"{_FLAGS.acting_iterations} segments after a compiling one, untrained "
      f"params; a separate `acting` phase). *Train env steps/s*: "
      "budget / training time (acting + learning + distillation).",
      "- *Censored mean*: mean over seeds, with a seed that never reached "
      "counted at the full budget (steps) or full training time (s): a lower "
      "bound whenever n reached < n seeds. The claims table uses it.",
      "- mean ± std are over seeds (population std). All runs on the same "
      "2-core CPU, one at a time.", ""]

  lines += [ _kept_analysis(out).replace("\r", ""), ""]

  groups = [("sizing", "Sizing sweep (lstm vs gtrxl, first seed)"),
            ("main", "Main study"),
            ("sweep", "Distillation-ratio sweep (ald)"),
            ("extra", "Further ald runs"),
            ("scale", "Larger learner (" + "; ".join(
                f"`{o}`" for o in _FLAGS.scale) + ")")]
  for group, title in groups:
    group_results = [r for r in results if r.spec.group == group]
    if not group_results:
      continue
    lines += [f"## {title}", ""]
    for env in sorted({r.spec.env for r in group_results}):
      env_results = [r for r in group_results if r.spec.env == env]
      metric, threshold = thresholds[env]
      by_label: Dict[str, List[RunResult]] = {}
      for r in env_results:
        by_label.setdefault(r.spec.label, []).append(r)
      aggs = {label: aggregate(label, rs) for label, rs in by_label.items()}
      lines += [f"### {env}: {metric.replace('_', ' ')} >= {threshold:g}", ""]
      lines += results_table(list(aggs.values()), metric) + [""]
      lines += ["Per seed (env steps / wall-clock s to threshold):", ""]
      lines += per_seed_table(by_label) + [""]
      if group in ("main", "scale"):
        lines += ["Paper's claims (censored means):", ""]
        lines += claims_table(aggs) + [""]
      if group == "main":
        first = {}
        for r in env_results:
          first.setdefault(r.spec.agent, r.spec)
        table = phase_table(list(first.values()))
        if table:
          lines += ["Cost of one iteration (one [T, B] segment) by phase, "
                    "each timed alone by the acting phase (untrained params, "
                    "ms per call):", ""] + table + [""]
      lines += _plots(env_results, f"{group}_{env}", fig_dir, metric,
                      rel_dir) + [""]
      kl_results = [r for r in env_results if r.spec.agent == "ald"]
      if kl_results:
        kl_path = os.path.join(fig_dir, f"{group}_{env}_kl.png")
        plot_kl(kl_results, kl_path, window)
        if os.path.exists(kl_path):
          lines += [f"![{group} {env} KL]({rel_dir}/"
                    f"{os.path.basename(kl_path)})", ""]
  if missing:
    lines += ["## Not run", "",
              "Planned but without a completed run (no eval.json):", ""]
    lines += [f"- {s.group}: {s.env} `{s.env_args}` {s.label} seed {s.seed}"
              for s in missing] + [""]
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    f.write("\n".join(lines))
  return results


# ------------------------------------------------------------------ main ---


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  specs = plan(_FLAGS.config_dir, _FLAGS.runs_dir)
  thresholds = parse_thresholds(_FLAGS.thresholds)
  for spec in specs:
    if spec.env not in thresholds:
      raise ValueError(f"thresholds: none for env {spec.env!r}")
  if not _FLAGS.only_report:
    todo = [s for s in specs if s.group in _FLAGS.phases]
    for i, spec in enumerate(todo):
      print(f"[{i + 1}/{len(todo)}] {spec.group} {spec.env} "
            f"({spec.env_args}) {spec.label} seed {spec.seed}: {spec.logdir}",
            flush=True)
      if not train_spec(spec, sys.stdout):
        print("  complete already; skipped", flush=True)
    if "acting" in _FLAGS.phases:
      for spec in specs:
        if spec.group == "main" and spec.seed == int(_FLAGS.seeds[0]):
          print(f"acting {spec.env} {spec.agent}: "
                f"{measure_acting(spec, _FLAGS.acting_iterations):,.0f} env "
                f"steps/s", flush=True)
  if os.path.exists(_FLAGS.out) and not any(map(completed_logdir, specs)):
    # E.g. --only_report on a machine without the runs: a report of nothing
    # would replace the one that exists.
    raise ValueError(f"out: no complete run of this plan in --runs_dir or the "
                     f"archive; {_FLAGS.out} is left as it is")
  shown = [a for a in sys.argv[1:]]
  write_report(specs, _FLAGS.out, shown)
  print(f"wrote {_FLAGS.out}", flush=True)


if __name__ == "__main__":
  app.run(main)

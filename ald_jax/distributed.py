"""The distributed runtime: actors, learner, replay and distillers on Ray.

```
 actor 0..N-1 (CPU, acting model)  --segments-->  learner (accelerator)
      ^  (pull acting params + version              |  bounded queue, batches of
      |   between segments)                         |  distinct streams, per-stream
      |                                             |  GTrXL memory, policy-lag bound,
      |                                             v  pmapped RL update
      +------------------------------------------ hub (params + replay + rate limiter)
                                                    ^   |
                                   gradients (async) |   | minibatches + params
                                                    |   v
                                              distiller 0..D-1 (ald)
```

Every box is a Ray actor (a process) wrapping a plain class of
`ald_jax.workers`; payloads are NumPy arrays. The driver (`train_distributed`,
in the calling process) starts them, polls their counters, writes the metric
rows, progress lines and checkpoints, and shuts everything down at the end or
on Ctrl-C. See docs/distributed.md.

* Actors (`num_actors`, each `envs_per_actor` streams, `actor_inference`
  batched | per_env) act with the newest acting params they have pulled and
  send segments tagged with that params version. A pure-JAX env is rolled out
  in a jitted scan; a Python `dm_env.Environment` is stepped on the host. An
  actor that dies is restarted by Ray (`actor_max_restarts`); the restart is
  counted, and its streams' next segments reset their learner memory.
* The learner consumes batches of `num_envs` rows, drops segments more than
  `max_policy_lag` versions old, carries each stream's GTrXL memory across
  its consecutive segments, and takes the same pmapped update as the
  synchronous runtime (`learner.Learner.update`). After each update it
  publishes its params (version = update count): to the hub as acting params
  (lstm, gtrxl, asym), or (ald) inserts the batch into the hub's replay.
* ald: distillers sample minibatches from the hub's replay and send
  gradients back; the hub applies them to the actor params it holds (these
  are the actors' acting params). `distill_steps_per_rl_step` is enforced as a
  sample-to-insert ratio (`workers.RateLimiter`): inserts wait for the
  distillers and distillers for inserts, so the ratio over a run is K within
  `distill_error_buffer` steps.

Resume continues from the learner's and the hub's checkpointed state and
counters, with fresh actors and empty queues and replay: it is not
bit-identical to an uninterrupted run (nor is a run bit-reproducible: the
interleaving of processes is not deterministic).

Nothing in the library imports this module; `experiments/run.py
--runtime=distributed` does.
"""
from __future__ import annotations

import csv
import math
import os
import sys
import threading
import time
import traceback
import warnings
from typing import Any, Callable, Dict, List, NamedTuple, Optional, TextIO, Tuple

import jax
import numpy as np
import ray

from ald_jax import acting as acting_lib
from ald_jax import agents
from ald_jax import learner as learner_lib
from ald_jax import logging_utils
from ald_jax import workers
from ald_jax.config import Config

SEGMENTS_CSV = "segments.csv"
POLL_SECONDS = 0.25
# NONFINITE bits, as training.NONFINITE_QUANTITIES (which needs no import here).
_NONFINITE_BITS = {"env rewards/observations": 0, "RL loss": 1,
                   "RL gradients": 2, "RL-trained params": 3,
                   "distillation loss": 4, "distillation gradients": 5,
                   "distilled actor params": 6}
_COUNTER_NAMES = ("iteration", "env_steps", "distill_steps", "dropped_segments",
                  "stream_resets", "actor_restarts")


class DistributedState(NamedTuple):
  """What a distributed run checkpoints (host arrays, no device axis).

  learner: the learner's `LearnerState` (memory left out: streams restart).
  distill: ald: {'params': actor params, 'opt_state': their optimiser
    state}; None for the other agents.
  counters: name -> int64 [] (see `_COUNTER_NAMES`).
  """
  learner: learner_lib.LearnerState
  distill: Optional[Dict[str, Any]]
  counters: Dict[str, np.ndarray]


def checkpoint_like(config: Config, env: Any) -> DistributedState:
  """A fresh state's host copy: the `like` of `Checkpointer.restore`."""
  info = workers.env_info(config, env)
  models = agents.build_models(config, info)
  params = workers.initial_params(config, models)
  learner = learner_lib.Learner(config, models, info.num_actions)
  state = jax.device_get(learner.init(params, 1)._replace(memory=()))
  distill = None
  if agents.ROLES[config.agent].distill:
    opt = learner_lib.optimiser(config.actor_learning_rate,
                                config.max_grad_norm)
    distill = jax.device_get({"params": params["actor"],
                              "opt_state": opt.init(params["actor"])})
  counters = {k: np.zeros((), np.int64) for k in _COUNTER_NAMES}
  return jax.tree.map(np.asarray, DistributedState(state, distill, counters))


def acting_params(config: Config, state: DistributedState) -> Any:
  """The acting model's params in a DistributedState."""
  roles = agents.ROLES[config.agent]
  if roles.distill:
    return state.distill["params"]
  return state.learner.params[roles.acting]


class Evaluator:
  """Greedy evaluation of a DistributedState's acting model.

  `evaluate(state, seed, num_episodes)` has the signature (and the result)
  of `training.Trainer.evaluate`, so `run.evaluate_and_save(evaluator, ...)`
  works unchanged. Python dm_env envs: success is unknown (NaN).
  """

  def __init__(self, config: Config, env: Any):
    self.config = config
    self.env = env
    self.info = workers.env_info(config, env)
    roles = agents.ROLES[config.agent]
    self.model = agents.build_models(config, self.info)[roles.acting]
    self._acting = (None if self.info.is_host_env else acting_lib.Acting(
        env, self.model, config.unroll_length))

  def evaluate(self, state: DistributedState, seed: int, num_episodes: int
               ) -> Dict[str, float]:
    params = acting_params(self.config, state)
    if self._acting is not None:
      return self._acting.evaluate(params, seed, num_episodes)
    envs = workers.make_host_envs(_with_seed(self.config, seed),
                                  min(num_episodes, 16), 0)
    return acting_lib.host_evaluate(self.model, params, envs, num_episodes)


def _with_seed(config: Config, seed: int) -> Config:
  import dataclasses  # pylint: disable=g-import-not-at-top
  return dataclasses.replace(config, seed=seed)


# --------------------------------------------------------------- Ray actors ---


class _ActorProcess:
  """Ray wrapper of `workers.ActorCore`: acts in a thread from construction.

  Constructed again by Ray after the process dies (`max_restarts`); each
  incarnation registers with the hub, which counts restarts.
  """

  def __init__(self, config: Config, env: Any, actor_id: int, hub, learner):
    self.pid = os.getpid()
    self.hub, self.learner = hub, learner
    epoch = ray.get(hub.register_actor.remote(actor_id, self.pid))
    self.core = workers.ActorCore(config, env, actor_id, epoch)
    self.error: Optional[str] = None
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._loop, daemon=True)
    self._thread.start()

  def _loop(self) -> None:
    try:
      while not self._stop.is_set():
        got = ray.get(self.hub.get_acting_params.remote(self.core.params_id))
        if got is not None:
          self.core.set_params(*got)
        if self.core.params is None:
          time.sleep(0.05)
          continue
        message = self.core.act()
        # Waits while this actor's share of the learner's queue is full, so
        # that the next segment is acted with params as fresh as possible.
        if not ray.get(self.learner.add_segment.remote(message)):
          return  # the learner stopped
    except Exception:  # pylint: disable=broad-except
      if not self._stop.is_set():
        self.error = traceback.format_exc()

  def info(self) -> Dict[str, Any]:
    return {"pid": self.pid, "epoch": self.core.epoch, "seq": self.core.seq,
            "error": self.error}

  def stop(self) -> bool:
    self._stop.set()
    return True


class _LearnerProcess:
  """Ray wrapper of `workers.LearnerCore`: updates in a thread after `start`."""

  def __init__(self, config: Config, info: workers.EnvInfo, params: Any, hub,
               start: Optional[DistributedState]):
    self.config = config
    self.hub = hub
    self.roles = agents.ROLES[config.agent]
    self.core = workers.LearnerCore(
        config, info, params, start=None if start is None else start.learner)
    if start is not None:
      self.core.env_steps = int(start.counters["env_steps"])
      self.core.dropped = int(start.counters["dropped_segments"])
      self.core.streams.resets = int(start.counters["stream_resets"])
    self.done = False
    self.error: Optional[str] = None
    self.nonfinite = 0
    self._thread: Optional[threading.Thread] = None

  def start(self) -> str:
    self._thread = threading.Thread(target=self._loop, daemon=True)
    self._thread.start()
    return jax.devices()[0].platform

  def _loop(self) -> None:
    config, core = self.config, self.core
    try:
      while not core.stopped and core.env_steps < config.total_env_steps:
        result = core.step(timeout=0.5)
        if result is None:
          continue
        segment, extras, metrics = result
        self.nonfinite |= _learner_nonfinite(segment, metrics)
        params = core.params()
        if self.roles.distill:
          learner_params = (None if config.distill_targets == "stored"
                            else params["learner"])
          while not ray.get(self.hub.insert.remote(
              core.version, workers.replay_item(config, segment, extras),
              learner_params, timeout=1.0)):
            if core.stopped:
              return
        else:
          ray.get(self.hub.put_acting_params.remote(
              core.version, params[self.roles.acting]))
        if self.nonfinite:
          break
    except Exception:  # pylint: disable=broad-except
      self.error = traceback.format_exc()
    finally:
      self.done = True

  def add_segment(self, message: workers.SegmentMessage) -> bool:
    if self.done:
      return False
    return self.core.add_segment(message, timeout=0.5) and not self.done

  def poll(self) -> Dict[str, Any]:
    out = self.core.poll()
    out.update(done=self.done, error=self.error, nonfinite=self.nonfinite,
               success_known=self.core.success_known)
    return out

  def snapshot(self) -> learner_lib.LearnerState:
    return self.core.snapshot()

  def stop(self) -> bool:
    self.core.stop()
    if self._thread is not None:
      self._thread.join(timeout=30)
    return True


def _learner_nonfinite(segment: acting_lib.Segment,
                       metrics: Dict[str, float]) -> int:
  bits = 0
  ts = segment.timesteps
  if not (np.all(np.isfinite(ts.reward)) and
          np.all(np.isfinite(ts.observation))):
    bits |= 1 << _NONFINITE_BITS["env rewards/observations"]
  if not math.isfinite(metrics.get("learner_loss", 0.0)):
    bits |= 1 << _NONFINITE_BITS["RL loss"]
  if metrics.get("finite_grads", 1.0) < 1.0:
    bits |= 1 << _NONFINITE_BITS["RL gradients"]
  if not metrics.get("finite_params", 1.0) >= 1.0:
    bits |= 1 << _NONFINITE_BITS["RL-trained params"]
  return bits


class _HubProcess:
  """Ray wrapper of `workers.HubCore` (a threaded actor)."""

  def __init__(self, config: Config, info: workers.EnvInfo, params: Any,
               start: Optional[DistributedState]):
    counters = None if start is None else {
        k: int(v) for k, v in start.counters.items()}
    self.core = workers.HubCore(
        config, info, params,
        start_distill=None if start is None else start.distill,
        counters=counters)
    if start is not None:
      self.core.restarts = int(start.counters["actor_restarts"])

  def register_actor(self, actor_id, pid):
    return self.core.register_actor(actor_id, pid)

  def actor_pids(self):
    return self.core.actor_pids()

  def get_acting_params(self, have_id):
    return self.core.get_acting_params(have_id)

  def put_acting_params(self, version, params):
    return self.core.put_acting_params(version, params)

  def insert(self, version, item, learner_params=None, timeout=None):
    return self.core.insert(version, item, learner_params, timeout=timeout)

  def sample(self, have_actor_id, have_learner_version, timeout=1.0):
    return self.core.sample(have_actor_id, have_learner_version, timeout)

  def apply(self, grads, metrics):
    return self.core.apply(grads, metrics)

  def drain(self, timeout):
    return self.core.drain(timeout)

  def poll(self):
    return self.core.poll()

  def snapshot(self):
    return self.core.snapshot()

  def acting_params(self):
    return self.core.acting_params()

  def stop(self):
    self.core.stop()
    return True


class _DistillerProcess:
  """Ray wrapper of `workers.DistillerCore`: distills in a thread."""

  def __init__(self, config: Config, info: workers.EnvInfo, hub):
    self.hub = hub
    self.core = workers.DistillerCore(config, info)
    self.error: Optional[str] = None
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._loop, daemon=True)
    self._thread.start()

  def _loop(self) -> None:
    try:
      while not self._stop.is_set():
        sample = ray.get(self.hub.sample.remote(
            self.core.actor_id, self.core.learner_version, 0.5))
        if sample is None:
          continue
        self.core.set_params(sample["actor"], sample["learner"])
        grads, metrics = self.core.grads(sample["batch"])
        ray.get(self.hub.apply.remote(grads, metrics))
    except Exception:  # pylint: disable=broad-except
      if not self._stop.is_set():
        self.error = traceback.format_exc()

  def info(self) -> Dict[str, Any]:
    return {"pid": os.getpid(), "error": self.error}

  def stop(self) -> bool:
    self._stop.set()
    self._thread.join(timeout=10)
    return True


# ------------------------------------------------------------------ driver ---


def _worker_env_vars(cpu_only: bool, single_thread: bool = False
                     ) -> Dict[str, str]:
  """Environment of the Ray worker processes.

  cpu_only: JAX on the CPU only. single_thread: XLA:CPU without its own
  thread pool (actors and the hub: many small calls, one process per core).
  """
  paths = [p for p in sys.path if p and os.path.isdir(p)]
  env = {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)),
         "NPROC": os.environ.get("NPROC", "4"),
         # Several processes share the accelerator (learner, distillers).
         "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
         "TF_CPP_MIN_LOG_LEVEL": "2"}
  if single_thread:
    env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false"
  if cpu_only:
    env["JAX_PLATFORMS"] = "cpu"
  elif os.environ.get("JAX_PLATFORMS"):
    env["JAX_PLATFORMS"] = os.environ["JAX_PLATFORMS"]
  return env


def _start_ray(config: Config) -> Tuple[bool, bool]:
  """Connects to Ray: (whether this call connected, whether to a local
  instance it started). A driver that connected also disconnects at the end:
  left connected, it would die with a joined cluster that is later stopped."""
  if ray.is_initialized():
    return False, False
  common = dict(include_dashboard=False, logging_level="warning",
                log_to_driver=True,
                runtime_env={"env_vars": _worker_env_vars(cpu_only=False)})
  with warnings.catch_warnings():
    # Ray starts its daemons by fork+exec, which is safe in a JAX process.
    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called")
    if config.ray_address:
      ray.init(address=config.ray_address, **common)
      return True, False
    ray.init(address="local",
             num_cpus=config.ray_num_cpus or min(os.cpu_count() or 1, 4),
             **common)
  return True, True


def _ray_line(local: bool) -> str:
  """Which Ray cluster the run's processes live on, and its resources."""
  resources = ray.cluster_resources()
  where = ("a local Ray instance" if local else
           f"the Ray cluster at {ray.get_runtime_context().gcs_address}")
  return (f"ray: {where}, {len(ray.nodes())} node(s), "
          f"{resources.get('CPU', 0):g} CPU(s), {resources.get('GPU', 0):g} "
          f"GPU(s)")


def _placement(local: bool) -> Dict[str, Dict[str, Any]]:
  """Ray options per role: actors on CPUs, learner/distillers on a GPU."""
  gpus = ray.cluster_resources().get("GPU", 0)
  cpu_env = {"env_vars": _worker_env_vars(cpu_only=True, single_thread=True)}
  acc_env = {"env_vars": _worker_env_vars(cpu_only=gpus == 0)}
  # On one machine every role shares its cores (no CPU reservation); on a
  # cluster each actor reserves a CPU, so that actors spread over CPU nodes.
  actor_cpus = 0 if local else 1
  return {
      "actor": dict(num_cpus=actor_cpus, runtime_env=cpu_env),
      "hub": dict(num_cpus=0, runtime_env=cpu_env),
      "learner": dict(num_cpus=0 if local else 1,
                      num_gpus=0.5 if gpus >= 1 else 0, runtime_env=acc_env),
      "distiller": dict(num_cpus=0, num_gpus=0 if gpus < 1 else None,
                        runtime_env=acc_env),
  }


class _Interval:
  """What the driver accumulates between two metric rows."""

  def __init__(self, now: float, env_steps: float, distill_steps: float):
    self.start, self.env_steps, self.distill_steps = now, env_steps, distill_steps
    self.updates = 0
    self.episodes = np.zeros(3)
    self.lags: List[Tuple[float, float, int]] = []
    self.act_seconds = 0.0
    self.acted_steps = 0
    self.distill_metrics: List[Dict[str, float]] = []


def train_distributed(
    config: Config, env: Any, *,
    stream: Optional[TextIO] = None,
    checkpointer: Any = None,
    metrics_writer: Optional[logging_utils.MetricsWriter] = None,
    start_state: Optional[DistributedState] = None,
    clock: Callable[[], float] = time.monotonic,
    on_poll: Optional[Callable[[Dict[str, Any]], None]] = None,
) -> Tuple[DistributedState, Dict[str, float]]:
  """Runs (or resumes) a distributed training run until `total_env_steps`.

  Args:
    config: a validated Config (`runtime` is not read: this is the runtime).
    env: the pure-JAX env, or a Python `dm_env.Environment` (the actors then
      build `envs_per_actor` of them each from `config.env`).
    stream: where progress lines go (default sys.stdout).
    checkpointer: a `checkpointing.Checkpointer` (None: no checkpoints);
      saves `DistributedState`s at learner versions that cross a multiple
      of `checkpoint_every_iterations`, and at the end.
    metrics_writer: a `logging_utils.MetricsWriter` for the metric rows
      (None: none written); its `resumed_elapsed_s` is added to elapsed_s.
    start_state: a restored `DistributedState` to resume from (see
      `checkpoint_like`), or None to start afresh.
    clock: seconds, monotonic.
    on_poll: called in the driver after each poll with a dict of counters
      and `actor_pids` (for tests and tools).
  Returns:
    (the final DistributedState, the host metrics of the last row; its
    'nonfinite' is non-zero when the run stopped on a non-finite value, and
    then no checkpoint of that state was written).
  """
  stream = stream or sys.stdout
  config.validate()
  # Ray first: it starts its processes before this one runs JAX threads.
  connected, started = _start_ray(config)
  try:
    return _train(config, env, stream, checkpointer, metrics_writer,
                  start_state, clock, on_poll, started)
  finally:
    if connected and ray.is_initialized():
      ray.shutdown()


def _train(config, env, stream, checkpointer, metrics_writer, start_state,
           clock, on_poll, started):
  roles = agents.ROLES[config.agent]
  info = workers.env_info(config, env)
  models = agents.build_models(config, info)
  params = workers.initial_params(config, models)
  if start_state is not None:
    params = dict(params)
    params.update(start_state.learner.params)
    if start_state.distill is not None:
      params["actor"] = start_state.distill["params"]
  counters0 = ({k: int(v) for k, v in start_state.counters.items()}
               if start_state is not None else {k: 0 for k in _COUNTER_NAMES})
  handles: List[Any] = []
  hub = learner = None
  actors: List[Any] = []
  distillers: List[Any] = []
  segments_file = None
  try:
    place = _placement(local=started)
    hub = ray.remote(_HubProcess).options(
        max_concurrency=config.num_actors + config.num_distillers + 8,
        **place["hub"]).remote(config, info, params, start_state)
    handles.append(hub)
    learner = ray.remote(_LearnerProcess).options(
        max_concurrency=config.num_actors + 6, **place["learner"]).remote(
            config, info, {k: params[k] for k in roles.rl_models}, hub,
            start_state)
    handles.append(learner)
    if roles.distill:
      options = dict(place["distiller"])
      if options.get("num_gpus") is None:
        options["num_gpus"] = 0.5 / config.num_distillers
      distillers = [ray.remote(_DistillerProcess).options(**options).remote(
          config, info, hub) for _ in range(config.num_distillers)]
      handles.extend(distillers)
    # Held by this driver until the end: a restarted actor is constructed
    # again from these (github.com/ray-project/ray/issues/53727).
    config_ref, env_ref = ray.put(config), ray.put(env)
    actors = [ray.remote(_ActorProcess).options(
        max_restarts=config.actor_max_restarts, **place["actor"]).remote(
            config_ref, env_ref, i, hub, learner)
              for i in range(config.num_actors)]
    handles.extend(actors)
    platform = ray.get(learner.start.remote())
    os.makedirs(config.logdir, exist_ok=True)
    segments_path = os.path.join(config.logdir, SEGMENTS_CSV)
    resuming = start_state is not None and os.path.exists(segments_path)
    segments_file = open(segments_path, "a" if resuming else "w", newline="")
    segments_csv = csv.writer(segments_file)
    if not resuming:
      segments_csv.writerow(["learner_version", "actor", "epoch", "seq",
                             "behaviour_version", "lag", "consumed"])
    print(_ray_line(started), file=stream, flush=True)
    print(f"{config.agent} on {config.env}"
          f"{' (' + config.env_args + ')' if config.env_args else ''}: "
          f"distributed, {config.num_actors} actor(s) x "
          f"{config.envs_per_actor} env(s) ({config.actor_inference}), "
          f"learner on {platform}"
          f"{f', {config.num_distillers} distiller(s)' if roles.distill else ''}"
          f", {config.num_envs} env rows per RL step, iteration "
          f"{counters0['iteration']}, logdir {config.logdir}",
          file=stream, flush=True)
    return _drive(config, env, roles, learner, hub, distillers, actors,
                  checkpointer, metrics_writer, stream, clock, on_poll,
                  segments_csv, segments_file, counters0, start_state)
  finally:
    if segments_file is not None:
      segments_file.close()
    _shutdown(handles, started)


def _drive(config, env, roles, learner, hub, distillers, actors, checkpointer,
           writer, stream, clock, on_poll, segments_csv, segments_file,
           counters0, start_state):
  """The driver's poll loop; returns (final state, last row)."""
  resumed_elapsed = writer.resumed_elapsed_s if writer is not None else 0.0
  start_time = last_line = clock()
  version = counters0["iteration"]
  last_ckpt, saved_this_run = version, False
  interval = _Interval(start_time, counters0["env_steps"],
                       counters0["distill_steps"])
  last_learner_metrics: Dict[str, float] = {}
  row: Dict[str, float] = {}
  totals = dict(counters0)
  success_known = True
  lp = hp = None
  last_health = start_time
  health: Dict[int, float] = {}
  while True:
    time.sleep(POLL_SECONDS)
    lp = ray.get(learner.poll.remote())
    hp = ray.get(hub.poll.remote())
    if lp["error"]:
      raise RuntimeError(f"learner failed:\n{lp['error']}")
    if clock() - last_health >= 2.0:
      last_health = clock()
      _check_health(actors, distillers, health, last_health)
    for record in lp["records"]:
      segments_csv.writerow(record)
    segments_file.flush()
    version = lp["version"]
    interval.updates += lp["updates"]
    interval.episodes += lp["episodes"]
    interval.act_seconds += lp["act_seconds"]
    interval.acted_steps += lp["acted_steps"]
    success_known = success_known and lp["success_known"]
    if not math.isnan(lp["lag_mean"]):
      interval.lags.append((lp["lag_mean"], lp["lag_max"], lp["updates"]))
    if hp["metrics"]:
      interval.distill_metrics.append(hp["metrics"])
    if lp["metrics"]:
      last_learner_metrics = lp["metrics"]
    totals.update(iteration=version, env_steps=lp["env_steps"],
                  distill_steps=hp["distill_steps"],
                  dropped_segments=lp["dropped"],
                  stream_resets=lp["stream_resets"],
                  actor_restarts=hp["restarts"])
    nonfinite = lp["nonfinite"] | _hub_nonfinite(hp["metrics"])
    done = lp["done"] or nonfinite
    if on_poll is not None:
      on_poll({**totals, "actor_pids": ray.get(hub.actor_pids.remote()),
               "queue_depth": lp["queue_depth"], "done": done})
    now = clock()
    if last_learner_metrics and (
        done or now - last_line >= config.log_every_seconds):
      if done and roles.distill and not nonfinite:
        # The rate's last distill steps, then the final counters.
        ray.get(hub.drain.remote(60.0))
        hp2 = ray.get(hub.poll.remote())
        if hp2["metrics"]:
          interval.distill_metrics.append(hp2["metrics"])
        totals["distill_steps"] = hp2["distill_steps"]
        hp = {**hp2, "distill_steps_since_poll": 0}
        nonfinite |= _hub_nonfinite(hp2["metrics"])
      row = _row(config, interval, totals, last_learner_metrics, hp, lp,
                 now, resumed_elapsed + now - start_time, success_known,
                 nonfinite)
      if writer is not None:
        writer.write(row, step=int(row["env_steps"]))
      print(_progress_line(config, row), file=stream, flush=True)
      last_line = now
      interval = _Interval(now, totals["env_steps"], totals["distill_steps"])
    every = config.checkpoint_every_iterations
    # The end state replaces a checkpoint of the same learner version saved
    # earlier in this run: segments dropped for lag and the distillers' last
    # steps still changed the counters and the actor params since.
    replace_final = done and saved_this_run and version == last_ckpt
    if (checkpointer is not None and not nonfinite and
        (version > last_ckpt or replace_final) and
        (done or (every and version // every > last_ckpt // every))):
      if replace_final:
        checkpointer.delete(version)
      checkpointer.save(version, jax.device_get(_snapshot(
          learner, hub, totals)))
      last_ckpt, saved_this_run = version, True
    if done:
      break
  if nonfinite:
    print(f"stopped: non-finite values (nonfinite={nonfinite})", file=stream,
          flush=True)
  ray.get([a.stop.remote() for a in distillers])
  state = _snapshot(learner, hub, totals)
  return state, row


UNHEALTHY_SECONDS = 120.0


def _check_health(actors: List[Any], distillers: List[Any],
                  last_ok: Dict[int, float], now: float) -> None:
  """Raises if an actor or distiller thread failed, or if one has not
  answered for UNHEALTHY_SECONDS (dead with its restarts used up); one that
  is being restarted is given that long."""
  handles = actors + distillers
  refs = [h.info.remote() for h in handles]
  ready, _ = ray.wait(refs, num_returns=len(refs), timeout=5.0)
  for i, ref in enumerate(refs):
    last_ok.setdefault(i, now)
    if ref in ready:
      try:
        info = ray.get(ref)
      except ray.exceptions.RayActorError:
        info = None  # died: Ray restarts it (or its restarts are used up)
      if info is not None:
        if info.get("error"):
          raise RuntimeError(f"a worker failed:\n{info['error']}")
        last_ok[i] = now
    if now - last_ok[i] > UNHEALTHY_SECONDS:
      kind = "actor" if i < len(actors) else "distiller"
      index = i if i < len(actors) else i - len(actors)
      raise RuntimeError(f"{kind} {index} has not answered for "
                         f"{UNHEALTHY_SECONDS:.0f} s (dead, restarts used up?)")


def _hub_nonfinite(metrics: Dict[str, float]) -> int:
  if not metrics:
    return 0
  bits = 0
  if not math.isfinite(metrics.get("loss", 0.0)):
    bits |= 1 << _NONFINITE_BITS["distillation loss"]
  if metrics.get("finite_grads", 1.0) < 1.0:
    bits |= 1 << _NONFINITE_BITS["distillation gradients"]
  return bits


def _snapshot(learner, hub, totals: Dict[str, int]) -> DistributedState:
  learner_state, distill = ray.get([learner.snapshot.remote(),
                                    hub.snapshot.remote()])
  counters = {k: np.asarray(totals[k], np.int64) for k in _COUNTER_NAMES}
  return DistributedState(learner_state, distill, counters)


def _row(config, interval: _Interval, totals, learner_metrics, hp, lp, now,
         elapsed_s, success_known, nonfinite) -> Dict[str, float]:
  """One metrics.csv row: the sync runtime's columns, then per-role ones."""
  seconds = max(now - interval.start, 1e-9)
  env_steps = totals["env_steps"]
  count, return_sum, successes = interval.episodes
  nan = math.nan
  row: Dict[str, float] = {
      "iteration": int(totals["iteration"]),
      "env_steps": int(env_steps),
      "elapsed_s": elapsed_s,
      "env_steps_per_s": (env_steps - interval.env_steps) / seconds,
      "episodes": float(count),
      "episode_return": return_sum / count if count else nan,
      "success_rate": (successes / count if count and success_known else nan),
  }
  metrics = dict(learner_metrics)
  metrics.pop("finite_grads", None)
  metrics.pop("finite_params", None)
  distill = {}
  if interval.distill_metrics:
    keys = set.intersection(*(set(m) for m in interval.distill_metrics))
    distill = {k: float(np.mean([m[k] for m in interval.distill_metrics]))
               for k in keys}
  metrics["actor_loss"] = distill.get("loss", nan)
  for name in sorted(metrics):
    row.setdefault(name, metrics[name])
  lags = interval.lags
  weights = np.array([n for _, _, n in lags], float)
  row.update({
      "actor_env_steps_per_s": interval.acted_steps / seconds,
      "actor_busy_env_steps_per_s": (
          interval.acted_steps / interval.act_seconds
          if interval.act_seconds else nan),
      "learner_updates_per_s": interval.updates / seconds,
      "distill_steps_per_s": (totals["distill_steps"] - interval.distill_steps)
                             / seconds,
      "distill_steps": int(totals["distill_steps"]),
      "distill_ratio": (totals["distill_steps"] / totals["iteration"]
                        if totals["iteration"] else nan),
      "queue_depth": float(lp["queue_depth"]),
      "policy_lag_mean": (float(np.average([m for m, _, _ in lags],
                                           weights=np.maximum(weights, 1)))
                          if lags else nan),
      "policy_lag_max": float(max(m for _, m, _ in lags)) if lags else nan,
      "dropped_segments": int(totals["dropped_segments"]),
      "stream_resets": int(totals["stream_resets"]),
      "actor_restarts": int(totals["actor_restarts"]),
      "nonfinite": int(nonfinite),
  })
  return row


def _progress_line(config: Config, row: Dict[str, float]) -> str:
  base = logging_utils.format_progress(logging_utils.Progress(
      elapsed_s=row["elapsed_s"], iteration=row["iteration"],
      env_steps=row["env_steps"], env_steps_per_s=row["env_steps_per_s"],
      mean_return=row["episode_return"], success_rate=row["success_rate"],
      kl=row.get("kl_actor_learner", math.nan), eta=row.get("eta", math.nan),
      alpha=row.get("alpha", math.nan),
      remaining_s=(config.total_env_steps - row["env_steps"]) /
      row["env_steps_per_s"] if row["env_steps_per_s"] > 0 else math.nan))
  fmt = logging_utils.format_count
  parts = [f"learner {row['learner_updates_per_s']:.3g}/s"]
  if agents.ROLES[config.agent].distill:
    parts.append(f"distill {row['distill_steps_per_s']:.3g}/s "
                 f"(x{row['distill_ratio']:.3g})")
  lag = row["policy_lag_mean"]
  parts.append(f"q {int(row['queue_depth'])}")
  if not math.isnan(lag):
    parts.append(f"lag {lag:.2g}/{int(row['policy_lag_max'])}")
  if row["dropped_segments"]:
    parts.append(f"dropped {fmt(row['dropped_segments'])}")
  if row["actor_restarts"]:
    parts.append(f"restarts {int(row['actor_restarts'])}")
  return base + "  | " + "  ".join(parts)


def _shutdown(handles: List[Any], started: bool) -> None:
  """Stops and kills every process of the run (and Ray if we started it)."""
  if not ray.is_initialized():
    return
  try:
    refs = [h.stop.remote() for h in handles]
    ray.wait(refs, num_returns=len(refs), timeout=10)
  except Exception:  # pylint: disable=broad-except
    pass
  for handle in handles:
    try:
      ray.kill(handle, no_restart=True)
    except Exception:  # pylint: disable=broad-except
      pass
  if started:
    ray.shutdown()

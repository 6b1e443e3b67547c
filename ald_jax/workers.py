"""The distributed runtime's processes as plain Python classes (no Ray).

`ald_jax.distributed` places these in Ray actors and connects them; here
they talk only through method calls and injected callables, so each one can
be built and tested in one process.

  ActorCore      one actor process: `envs_per_actor` env streams acted on by
                 the acting model (batched, or per env at batch 1), emitting
                 `SegmentMessage`s tagged with the acting params' version.
  LearnerCore    the learner: a bounded segment queue, batches of distinct
                 streams, the per-stream GTrXL memory (`learner.StreamMemory`),
                 the policy-lag bound, and the pmapped `Learner.update`.
  HubCore        the parameter and replay server: the acting params actors
                 pull (with versions), for ald the actor params that the
                 distillers update (HOGWILD: several distillers' gradients
                 applied asynchronously by one optimiser), the replay of
                 recent learner batches, and the sample-to-insert
                 `RateLimiter` that enforces `distill_steps_per_rl_step`.
  DistillerCore  one distiller: the pmapped `Distiller.grads` on a minibatch
                 sampled from the hub.

Versions: the learner's params version is its update count. A segment carries
the version of the params it was acted with; its policy lag at consumption is
the learner's version then minus that.
"""
from __future__ import annotations

import collections
import inspect
import math
import threading
import time
from typing import (Any, Callable, Deque, Dict, Hashable, List, NamedTuple,
                    Optional, Tuple)

import dm_env
import jax
import jax.numpy as jnp
import numpy as np

from ald_jax import acting as acting_lib
from ald_jax import agents
from ald_jax import distillation
from ald_jax import learner as learner_lib
from ald_jax import losses
from ald_jax.config import Config, parse_env_args
from envs import registry
from envs.api import TimeStep

Params = Any
AXIS = learner_lib.AXIS


# --------------------------------------------------------------- helpers ---


class EnvInfo(NamedTuple):
  """What the models need to know of an env."""
  observation_size: int
  num_actions: int
  is_host_env: bool        # a Python dm_env.Environment (no jit)


def _resolve_factory(name: str) -> Callable[..., Any]:
  if ":" not in name:
    return lambda **kw: registry.make(name, **kw)
  module_name, _, attribute = name.partition(":")
  import importlib  # pylint: disable=g-import-not-at-top
  return getattr(importlib.import_module(module_name), attribute)


def make_host_envs(config: Config, count: int, first_stream: int) -> Any:
  """`count` Python dm_env envs from `config.env` as one BatchedHostEnv.

  The factory is called once per stream, with `seed=<stream index + seed>` if
  it takes a `seed` argument (so that streams differ).
  """
  from envs import dm_env_adapters  # pylint: disable=g-import-not-at-top
  factory = _resolve_factory(config.env)
  kwargs = parse_env_args(config.env_args)
  try:
    takes_seed = "seed" in inspect.signature(factory).parameters
  except (TypeError, ValueError):
    takes_seed = False
  envs = []
  for i in range(count):
    extra = ({"seed": config.seed * 100_003 + first_stream + i}
             if takes_seed and "seed" not in kwargs else {})
    envs.append(factory(**kwargs, **extra))
  return dm_env_adapters.BatchedHostEnv(
      envs, append_previous_action_and_reward=config.dm_env_append_action_reward)


def env_info(config: Config, env: Any) -> EnvInfo:
  """EnvInfo of a pure-JAX env or of a Python dm_env.Environment."""
  if isinstance(env, dm_env.Environment):
    host = make_host_envs(config, 1, 0)
    return EnvInfo(host.observation_size, host.num_actions, True)
  return EnvInfo(env.observation_size, env.num_actions, False)


def initial_params(config: Config, models: Dict[str, Any]) -> Params:
  """The agent's params at step 0: those the synchronous runtime starts from."""
  param_key = jax.random.split(jax.random.PRNGKey(config.seed), 4)[0]
  return jax.device_get(agents.init_params(models, param_key))


def _to_host(tree: Any) -> Any:
  return jax.tree.map(np.asarray, jax.device_get(tree))


def shard(tree: Any, devices: int, time_major: bool) -> Any:
  """Splits the batch axis (1 if time-major, else 0) into [devices, B/devices]."""
  def split(x):
    x = np.asarray(x)
    if time_major:
      t, b = x.shape[:2]
      return x.reshape((t, devices, b // devices) + x.shape[2:]).swapaxes(0, 1)
    return x.reshape((devices, x.shape[0] // devices) + x.shape[1:])
  return jax.tree.map(split, tree)


def unshard(tree: Any, time_major: bool) -> Any:
  """Inverse of `shard`."""
  def merge(x):
    x = np.asarray(x)
    if time_major:
      x = x.swapaxes(0, 1)
      return x.reshape((x.shape[0], -1) + x.shape[3:])
    return x.reshape((-1,) + x.shape[2:])
  return jax.tree.map(merge, tree)


def shard_segment(segment: acting_lib.Segment, devices: int
                  ) -> acting_lib.Segment:
  return acting_lib.Segment(
      timesteps=shard(segment.timesteps, devices, True),
      actions=shard(segment.actions, devices, True),
      behaviour_logits=shard(segment.behaviour_logits, devices, True),
      acting_state=shard(segment.acting_state, devices, False))


def replicate(tree: Any, devices: List[Any]) -> Any:
  """`tree` copied onto each of `devices` (leading axis len(devices))."""
  mesh = jax.sharding.Mesh(np.array(devices), (AXIS,))
  sharding = jax.sharding.NamedSharding(mesh,
                                        jax.sharding.PartitionSpec(AXIS))
  return jax.device_put(jax.tree.map(
      lambda x: np.broadcast_to(np.asarray(x), (len(devices),) + np.shape(x)),
      jax.device_get(tree)), sharding)


class SegmentMessage(NamedTuple):
  """What an actor sends the learner: one segment of its env streams."""
  actor_id: int
  epoch: int              # the actor's incarnation (0, then +1 per restart)
  seq: int                # segment number within the incarnation
  version: int            # learner version of the params it acted with
  segment: acting_lib.Segment  # numpy, [T + 1, B] time steps etc.
  episodes: np.ndarray    # f64 [3]: episodes ended, their return sum,
                          # successes (NaN: success unknown)
  act_seconds: float      # wall-clock spent acting it

  @property
  def env_steps(self) -> int:
    return int(np.prod(self.segment.actions.shape))

  @property
  def streams(self) -> List[Tuple[int, int]]:
    return [(self.actor_id, i) for i in range(self.segment.actions.shape[1])]


# ----------------------------------------------------------------- actor ---


class ActorCore:
  """One actor: env streams, the acting model, segments.

  Args:
    config: the run's Config (envs_per_actor, actor_inference, ...).
    env: the pure-JAX env, or a Python dm_env.Environment (then the actor
      builds `envs_per_actor` of them from `config.env`).
    actor_id, epoch: identity of this actor and incarnation; seed the envs.
  """

  def __init__(self, config: Config, env: Any, actor_id: int, epoch: int = 0):
    self.config = config
    self.actor_id = actor_id
    self.epoch = epoch
    self.info = env_info(config, env)
    roles = agents.ROLES[config.agent]
    self.model = agents.build_models(config, self.info)[roles.acting]
    self.per_env = config.actor_inference == "per_env"
    batch = config.envs_per_actor
    self.seq = 0
    self.params: Optional[Params] = None
    self.params_id = -1
    self.version = -1
    if self.info.is_host_env:
      self._host = acting_lib.HostActing(
          make_host_envs(config, batch, actor_id * batch), self.model,
          config.unroll_length, per_env=self.per_env,
          seed=hash((config.seed, actor_id, epoch)) % 2**31)
      self.has_success = False
    else:
      self._acting = acting_lib.Acting(env, self.model, config.unroll_length)
      key = jax.random.fold_in(jax.random.fold_in(
          jax.random.PRNGKey(config.seed), 1 + actor_id), epoch)
      env_key, action_key = jax.random.split(key)
      env_keys = jax.random.split(env_key, batch)
      action_keys = jax.random.split(action_key, batch)
      self._rollout = jax.jit(self._acting.rollout)
      if self.per_env:
        self._states = [self._acting.init(env_keys[i:i + 1],
                                          action_keys[i:i + 1])
                        for i in range(batch)]
      else:
        self._states = [self._acting.init(env_keys, action_keys)]
      self.has_success = True

  def set_params(self, params_id: int, version: int, params: Params) -> None:
    self.params = jax.device_put(params)
    self.params_id, self.version = params_id, version

  def act(self) -> SegmentMessage:
    """One segment of every stream with the current params."""
    if self.params is None:
      raise RuntimeError("act: no params yet")
    start = time.perf_counter()
    if self.info.is_host_env:
      segment, counts = self._host.rollout(self.params)
      episodes = np.array([counts["count"], counts["return_sum"], math.nan])
    else:
      segments, episodes = [], np.zeros(3)
      for i, state in enumerate(self._states):
        state, segment = self._rollout(self.params, state)
        self._states[i] = state
        segments.append(segment)
        stats = state.episode_stats
        episodes += np.array(jax.device_get(
            (stats.count, stats.return_sum, stats.success_count)), np.float64)
      segment = (acting_lib.concat_segments(jax.device_get(segments))
                 if len(segments) > 1 else _to_host(segments[0]))
    message = SegmentMessage(
        actor_id=self.actor_id, epoch=self.epoch, seq=self.seq,
        version=self.version, segment=segment, episodes=episodes,
        act_seconds=time.perf_counter() - start)
    self.seq += 1
    return message


# --------------------------------------------------------------- learner ---


class LearnerCore:
  """The learner: segment queue -> batches -> pmapped RL updates.

  A batch is `num_envs / envs_per_actor` segments of distinct actors (so of
  distinct streams), the oldest waiting segment of each, oldest first. At
  most ceil(segment_queue_size / num_actors) segments of one actor wait;
  its next `add_segment` blocks (the actors' backpressure).
  Segments whose policy lag exceeds `max_policy_lag` are dropped (counted;
  the stream's next segment then finds a gap and its memory is reset).

  Thread-safety: `add_segment` may be called from other threads while one
  thread calls `step`; `snapshot` and `poll` take the lock.
  """

  def __init__(self, config: Config, info: EnvInfo, params: Params, *,
               start: Optional[learner_lib.LearnerState] = None,
               devices: Optional[List[Any]] = None):
    self.config = config
    self.models = agents.build_models(config, info)
    self.learner = learner_lib.Learner(config, self.models, info.num_actions)
    devices = devices or jax.local_devices()[:config.num_devices or None]
    if config.num_envs % len(devices):
      raise ValueError(f"num_envs: must be divisible by the learner's device "
                       f"count ({len(devices)}), got {config.num_envs}")
    self.devices = devices
    self.num_devices = len(devices)
    local_rows = config.num_envs // self.num_devices
    state = self.learner.init(params, local_rows)
    if start is not None:
      state = start._replace(memory=state.memory)
    self._state = replicate(state, devices)
    self._update = jax.pmap(self.learner.update, axis_name=AXIS,
                            devices=devices)
    self._finite = jax.jit(learner_lib.all_finite)
    self.streams = learner_lib.StreamMemory(self.learner.initial_memory(1))
    self.segments_per_batch = config.num_envs // config.envs_per_actor
    # Received segments waiting for a batch, per actor (FIFO), bounded in
    # total by segment_queue_size.
    self._pending: Dict[int, Deque[Tuple[int, SegmentMessage]]] = {}
    self._pending_count = 0
    self.per_actor_capacity = max(1, -(-config.segment_queue_size //
                                       config.num_actors))
    self._arrivals = 0
    self._cond = threading.Condition()
    self._lock = threading.Lock()
    self._stopped = threading.Event()
    self.version = int(jax.device_get(state.update_count))
    self.env_steps = 0
    self.dropped = 0
    self._records: List[Tuple[int, int, int, int, int, int, int]] = []
    self._lags: List[int] = []
    self._episodes = np.zeros(3)
    self._metrics: Dict[str, float] = {}
    self._updates_since_poll = 0
    self._act_seconds = 0.0
    self._acted_steps = 0
    self.success_known = True

  # ------------------------------------------------------------ intake
  def add_segment(self, message: SegmentMessage, timeout: float = 1.0
                  ) -> bool:
    """Queues a segment (blocks while the queue is full); False if stopped.

    A segment too old for `max_policy_lag` already on arrival is dropped
    at once (it would be dropped anyway, and must not take a queue slot).
    """
    with self._cond:
      # A bound per actor (not only in total): a batch needs segments of
      # distinct actors, so no actor may fill the queue for the others.
      mine = self._pending.setdefault(message.actor_id, collections.deque())
      while len(mine) >= self.per_actor_capacity:
        if self._stopped.is_set():
          return False
        self._cond.wait(timeout)
      if self._stopped.is_set():
        return False
      with self._lock:
        self._intake(message)
        if not self._drop_if_stale(message):
          mine.append((self._arrivals, message))
          self._arrivals += 1
          self._pending_count += 1
      self._cond.notify_all()
      return True

  def stop(self) -> None:
    self._stopped.set()
    with self._cond:
      self._cond.notify_all()

  @property
  def stopped(self) -> bool:
    return self._stopped.is_set()

  def queue_depth(self) -> int:
    return self._pending_count

  def _drop_if_stale(self, message: SegmentMessage) -> bool:
    """Drops (and logs) a segment over the lag bound; call with the lock."""
    lag = self.version - message.version
    if lag <= self.config.max_policy_lag:
      return False
    self.dropped += 1
    self._records.append((self.version, message.actor_id, message.epoch,
                          message.seq, message.version, lag, 0))
    return True

  def _next_batch(self, timeout: float) -> Optional[List[SegmentMessage]]:
    """The oldest segment of each of `segments_per_batch` actors (distinct
    streams), oldest first; None if stopped or none came within `timeout`.

    Segments that became too old while waiting are dropped here.
    """
    deadline = time.monotonic() + timeout
    with self._cond:
      while True:
        with self._lock:
          for queue_ in self._pending.values():
            while queue_ and self._drop_if_stale(queue_[0][1]):
              queue_.popleft()
              self._pending_count -= 1
        ready = sorted((q[0][0], actor) for actor, q in self._pending.items()
                       if q)
        if len(ready) >= self.segments_per_batch:
          batch = [self._pending[actor].popleft()[1]
                   for _, actor in ready[:self.segments_per_batch]]
          self._pending_count -= len(batch)
          self._cond.notify_all()
          return batch
        self._cond.notify_all()
        remaining = deadline - time.monotonic()
        if self._stopped.is_set() or remaining <= 0:
          return None
        self._cond.wait(min(remaining, 0.1))

  def _intake(self, message: SegmentMessage) -> None:
    """Counts a received segment (consumed or dropped), once."""
    self.env_steps += message.env_steps
    self._episodes += np.nan_to_num(message.episodes, nan=0.0)
    if math.isnan(message.episodes[2]):
      self.success_known = False
    self._act_seconds += message.act_seconds
    self._acted_steps += message.env_steps

  # ------------------------------------------------------------ update
  def update_batch(self, segment: acting_lib.Segment, memory: Any
                   ) -> Tuple[Dict[str, float], learner_lib.UpdateExtras, Any]:
    """One pmapped update on a host batch ([T + 1, B], memory [B, ...]).

    Returns (host metrics, host extras (mask, outputs, memory at start; all
    [.., B, ..] unsharded), memory after the segment [B, ...]).
    """
    d = self.num_devices
    carried = bool(jax.tree.leaves(memory))
    state = self._state
    if carried:
      state = state._replace(memory=shard(memory, d, False))
    state, metrics, extras = self._update(state, shard_segment(segment, d))
    metrics, finite, duals = jax.device_get(
        (metrics, self._finite(state.params),
         jax.tree.map(lambda x: x[0], state.duals)))
    metrics = {k: float(np.asarray(v)[0]) for k, v in metrics.items()}
    metrics["finite_params"] = float(np.all(finite))
    metrics.setdefault("kl_actor_learner", math.nan)
    eta, alpha = losses.vmpo_duals_values(duals)
    vmpo = self.config.rl_loss == "vmpo"
    metrics["eta"] = float(eta) if vmpo else math.nan
    metrics["alpha"] = float(alpha) if vmpo else math.nan
    extras = jax.device_get(extras)
    extras = learner_lib.UpdateExtras(
        mask=unshard(extras.mask, True),
        outputs=unshard(extras.outputs, True),
        memory_at_start=memory)
    new_memory = (unshard(jax.device_get(state.memory), False) if carried
                  else memory)
    with self._lock:
      self._state = state
      self.version += 1
    return metrics, extras, new_memory

  def step(self, timeout: float = 1.0
           ) -> Optional[Tuple[acting_lib.Segment, learner_lib.UpdateExtras,
                               Dict[str, float]]]:
    """Takes one batch from the queue and updates; None if none came.

    Returns (the batch segment, the update's extras, host metrics).
    """
    batch = self._next_batch(timeout)
    if batch is None:
      return None
    streams = [s for m in batch for s in m.streams]
    seqs = [(m.epoch, m.seq) for m in batch
            for _ in range(m.segment.actions.shape[1])]
    with self._lock:
      memory = self.streams.gather(streams, seqs)
      version = self.version
      for m in batch:
        lag = version - m.version
        self._lags.append(lag)
        self._records.append((version, m.actor_id, m.epoch, m.seq, m.version,
                              lag, 1))
    segment = acting_lib.concat_segments([m.segment for m in batch])
    metrics, extras, new_memory = self.update_batch(segment, memory)
    with self._lock:
      self.streams.scatter(streams, seqs, new_memory)
      self._metrics = metrics
      self._updates_since_poll += 1
    return segment, extras, metrics

  # ------------------------------------------------------------ outputs
  def params(self) -> Params:
    """Host copy of the RL-trained params (one device's)."""
    with self._lock:
      return _to_host(jax.tree.map(lambda x: x[0], self._state.params))

  def duals(self) -> Tuple[float, float]:
    with self._lock:
      duals = jax.tree.map(lambda x: x[0], self._state.duals)
    eta, alpha = losses.vmpo_duals_values(duals)
    return float(eta), float(alpha)

  def snapshot(self) -> learner_lib.LearnerState:
    """Host copy of the learner state (one device's; memory left out)."""
    with self._lock:
      state = jax.tree.map(lambda x: x[0], self._state._replace(memory=()))
      return _to_host(state)

  def poll(self) -> Dict[str, Any]:
    """Counters, and what happened since the previous poll."""
    with self._lock:
      lags, records = self._lags, self._records
      self._lags, self._records = [], []
      out = {
          "version": self.version, "env_steps": self.env_steps,
          "dropped": self.dropped, "stream_resets": self.streams.resets,
          "queue_depth": self.queue_depth(),
          "episodes": self._episodes.copy(),
          "updates": self._updates_since_poll,
          "metrics": dict(self._metrics),
          "lag_mean": float(np.mean(lags)) if lags else math.nan,
          "lag_max": float(np.max(lags)) if lags else math.nan,
          "records": records,
          "act_seconds": self._act_seconds, "acted_steps": self._acted_steps,
      }
      self._episodes = np.zeros(3)
      self._updates_since_poll = 0
      self._act_seconds, self._acted_steps = 0.0, 0
    return out


# ------------------------------------------------------------------- hub ---


class RateLimiter:
  """Reverb-style sample-to-insert ratio over counters (no locking here).

  With `samples_per_insert` K and `error_buffer` E (in samples): an insert
  is allowed while the samples after it would lag the target by at most E,
  `K * (inserts + 1) - samples <= E`; a sample while it does not run ahead,
  `samples + 1 <= K * inserts`. With E >= K both sides can always progress
  in turn, and at any time `|samples - K * inserts| <= E`: over a run of N
  inserts the ratio is K within E / N.
  """

  def __init__(self, samples_per_insert: float, error_buffer: float):
    if error_buffer < samples_per_insert:
      raise ValueError(f"error_buffer: must be >= samples_per_insert "
                       f"({samples_per_insert}), got {error_buffer}")
    self.samples_per_insert = samples_per_insert
    self.error_buffer = error_buffer
    self.inserts = 0
    self.samples = 0

  def can_insert(self) -> bool:
    return (self.samples_per_insert * (self.inserts + 1) - self.samples
            <= self.error_buffer)

  def can_sample(self) -> bool:
    return self.inserts > 0 and (
        self.samples + 1 <= self.samples_per_insert * self.inserts)

  @property
  def ratio(self) -> float:
    return self.samples / self.inserts if self.inserts else math.nan


class HostReplay:
  """The last `capacity` learner batches for distillation, on the host.

  An item is one batch: observation [T, B, O], start [T, B], mask [T, B],
  actor_state [B, ...] and either learner_state [B, ...] (targets
  recomputed) or learner_logits [T, B, A] and learner_value [T, B] (stored).
  `sample` draws `rows` (item, env) rows without replacement from the items
  held (with replacement if fewer are held) and returns them as a
  `distillation.Replay` of rows (observation [T, n, O], states [n, ...]).
  """

  def __init__(self, capacity: int, seed: int = 0):
    self.capacity = capacity
    self._items: Deque[Dict[str, Any]] = collections.deque(maxlen=capacity)
    self._rng = np.random.default_rng(seed)

  def __len__(self) -> int:
    return len(self._items)

  def add(self, item: Dict[str, Any]) -> None:
    self._items.append(item)

  def sample(self, rows: int) -> distillation.Replay:
    items = list(self._items)
    batch = items[0]["mask"].shape[1]
    total = len(items) * batch
    picks = self._rng.choice(total, size=rows, replace=rows > total)
    item_idx, env_idx = picks // batch, picks % batch

    def time_major(name):
      if items[0].get(name) is None:
        return None
      return np.stack([items[i][name][:, e] for i, e in zip(item_idx, env_idx)],
                      axis=1)

    def batch_major(name):
      if items[0].get(name) is None:
        return None
      return jax.tree.map(
          lambda *xs: np.stack([x[e] for x, e in zip(xs, env_idx)], axis=0),
          *[items[i][name] for i in item_idx])

    return distillation.Replay(
        observation=time_major("observation"), start=time_major("start"),
        mask=time_major("mask"), actor_state=batch_major("actor_state"),
        learner_state=batch_major("learner_state"),
        learner_logits=time_major("learner_logits"),
        learner_value=time_major("learner_value"),
        next_slot=np.zeros((), np.int32))


class HubCore:
  """Params, replay and rate limiter shared by actors, learner, distillers.

  Acting params: `put_acting_params` (learner, non-ald agents) or the
  distillers' updates (ald) change them; each change gets a new `params_id`
  and carries the learner `version` current then. `get_acting_params(have)`
  returns them when newer than `have`.

  ald: `insert` (learner, after each RL step; blocks while the rate limiter
  refuses) adds the batch to the replay; `sample` (distillers; blocks while
  the rate limiter refuses) returns a minibatch with the current actor
  params and the newest learner params; `apply` applies a distiller's
  gradients to the actor params (HOGWILD: gradients of possibly older
  params, applied as they come by one optimiser).
  """

  def __init__(self, config: Config, info: EnvInfo, params: Params, *,
               start_distill: Optional[Dict[str, Any]] = None,
               counters: Optional[Dict[str, int]] = None):
    self.config = config
    roles = agents.ROLES[config.agent]
    self.distill = roles.distill
    self._cond = threading.Condition()
    self._stopped = False
    self.version = int((counters or {}).get("iteration", 0))
    self.params_id = 0
    self._acting_params = params[roles.acting]
    self._learner_params: Optional[Params] = None
    self._learner_version = -1
    self._epochs: Dict[int, int] = {}
    self._pids: Dict[int, int] = {}
    self.restarts = 0
    self._distill_metrics: List[Dict[str, float]] = []
    self.applied = int((counters or {}).get("distill_steps", 0))
    self._applied_since_poll = 0
    if self.distill:
      models = agents.build_models(config, info)
      self.distiller = distillation.Distiller(
          config, models, info.num_actions, info.observation_size)
      self._apply = jax.jit(self.distiller.apply)
      actor_params = params["actor"]
      opt_state = self.distiller.optimiser.init(actor_params)
      if start_distill is not None:
        actor_params = start_distill["params"]
        opt_state = start_distill["opt_state"]
      self._actor_params = jax.device_put(actor_params)
      self._opt_state = jax.device_put(opt_state)
      self._acting_params = _to_host(self._actor_params)
      k = config.distill_steps_per_rl_step
      self.limiter = RateLimiter(k, config.distill_error_buffer or 2 * k)
      self.limiter.inserts = self.version
      self.limiter.samples = self.applied
      self.replay = HostReplay(config.replay_segments, seed=config.seed)
      self._rows = config.distill_batch_envs or config.num_envs

  # ------------------------------------------------------------ actors
  def register_actor(self, actor_id: int, pid: int) -> int:
    """Called by each actor incarnation; returns its epoch (0, 1, ...)."""
    with self._cond:
      epoch = self._epochs.get(actor_id, -1) + 1
      self._epochs[actor_id] = epoch
      self._pids[actor_id] = pid
      if epoch > 0:
        self.restarts += 1
      return epoch

  def actor_pids(self) -> Dict[int, int]:
    with self._cond:
      return dict(self._pids)

  def get_acting_params(self, have_id: int
                        ) -> Optional[Tuple[int, int, Params]]:
    with self._cond:
      if self.params_id <= have_id:
        return None
      if self.distill and self._acting_params is None:
        self._acting_params = _to_host(self._actor_params)
      return self.params_id, self.version, self._acting_params

  def put_acting_params(self, version: int, params: Params) -> None:
    with self._cond:
      self._acting_params = params
      self.version = version
      self.params_id += 1
      self._cond.notify_all()

  # ---------------------------------------------------------- learner
  def put_learner_params(self, version: int, params: Params) -> None:
    with self._cond:
      self._learner_params = params
      self._learner_version = version

  def insert(self, version: int, item: Dict[str, Any],
             learner_params: Optional[Params] = None,
             timeout: Optional[float] = None) -> bool:
    """Adds one learner batch; blocks while the rate limiter refuses.

    Returns False if stopped (or timed out) before it could insert.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    with self._cond:
      while not self.limiter.can_insert():
        if self._stopped or (deadline and time.monotonic() > deadline):
          return False
        self._cond.wait(0.1)
      self.replay.add(item)
      self.limiter.inserts += 1
      self.version = version
      self.params_id += 1   # the version the acting params are tagged with
      if learner_params is not None:
        self._learner_params = learner_params
        self._learner_version = version
      self._cond.notify_all()
      return True

  # -------------------------------------------------------- distillers
  def sample(self, have_actor_id: int, have_learner_version: int,
             timeout: float = 1.0) -> Optional[Dict[str, Any]]:
    """A minibatch and the params to compute its gradient with.

    Blocks (up to `timeout`) while the rate limiter refuses; None then or
    when stopped. Params are included only when newer than the caller's.
    """
    deadline = time.monotonic() + timeout
    with self._cond:
      while not self.limiter.can_sample():
        if self._stopped or time.monotonic() > deadline:
          return None
        self._cond.wait(0.05)
      self.limiter.samples += 1
      batch = self.replay.sample(self._rows)
      out = {"batch": batch, "actor": None, "learner": None}
      if self.params_id > have_actor_id:
        if self._acting_params is None:
          self._acting_params = _to_host(self._actor_params)
        out["actor"] = (self.params_id, self._acting_params)
      if (self._learner_params is not None and
          self._learner_version > have_learner_version):
        out["learner"] = (self._learner_version, self._learner_params)
      self._cond.notify_all()
      return out

  def apply(self, grads: Params, metrics: Dict[str, float]) -> None:
    """Applies one distiller's gradients to the actor params."""
    with self._cond:
      self._actor_params, self._opt_state = self._apply(
          self._actor_params, self._opt_state, grads)
      self._acting_params = None  # host copy made on the next read
      self.params_id += 1
      self.applied += 1
      self._applied_since_poll += 1
      self._distill_metrics.append(metrics)
      self._cond.notify_all()

  def drain(self, timeout: float) -> bool:
    """Waits until the distillers have taken every allowed sample."""
    deadline = time.monotonic() + timeout
    with self._cond:
      while (self.distill and self.applied < self.limiter.samples_per_insert *
             self.limiter.inserts):
        if time.monotonic() > deadline:
          return False
        self._cond.wait(0.1)
      return True

  def stop(self) -> None:
    with self._cond:
      self._stopped = True
      self._cond.notify_all()

  # ---------------------------------------------------------- outputs
  def snapshot(self) -> Optional[Dict[str, Any]]:
    """Host copy of the distillation state (ald), else None."""
    if not self.distill:
      return None
    with self._cond:
      return {"params": _to_host(self._actor_params),
              "opt_state": _to_host(self._opt_state)}

  def acting_params(self) -> Params:
    with self._cond:
      if self._acting_params is None:
        self._acting_params = _to_host(self._actor_params)
      return self._acting_params

  def poll(self) -> Dict[str, Any]:
    with self._cond:
      metrics = self._distill_metrics
      self._distill_metrics = []
      out = {"restarts": self.restarts, "distill_steps": self.applied,
             "distill_steps_since_poll": self._applied_since_poll,
             "samples": self.limiter.samples if self.distill else 0,
             "inserts": self.limiter.inserts if self.distill else 0,
             "ratio": self.limiter.ratio if self.distill else math.nan,
             "replay_size": len(self.replay) if self.distill else 0}
      self._applied_since_poll = 0
    if metrics:
      keys = set.intersection(*(set(m) for m in metrics))
      out["metrics"] = {k: float(np.mean([m[k] for m in metrics]))
                        for k in keys}
      out["metrics"]["finite_grads"] = float(all(
          m.get("finite_grads", 1.0) > 0 for m in metrics))
    else:
      out["metrics"] = {}
    return out


def replay_item(config: Config, segment: acting_lib.Segment,
                extras: learner_lib.UpdateExtras) -> Dict[str, Any]:
  """The replay item of one learner batch (what `HubCore.insert` takes)."""
  ts = segment.timesteps
  item = {"observation": np.asarray(ts.observation[:-1]),
          "start": np.asarray(ts.step_type[:-1] == 0),
          "mask": np.asarray(extras.mask),
          "actor_state": segment.acting_state}
  if config.distill_targets == "stored":
    item["learner_logits"] = np.asarray(extras.outputs[0])
    item["learner_value"] = np.asarray(extras.outputs[1])
  else:
    item["learner_state"] = extras.memory_at_start
  return item


# ------------------------------------------------------------- distiller ---


class DistillerCore:
  """One distiller: gradients of the distillation loss on hub minibatches."""

  def __init__(self, config: Config, info: EnvInfo,
               devices: Optional[List[Any]] = None):
    self.config = config
    models = agents.build_models(config, info)
    devices = devices or jax.local_devices()[:config.num_devices or None]
    rows = config.distill_batch_envs or config.num_envs
    if rows % len(devices):
      devices = devices[:1]
    self.devices = devices
    self.distiller = distillation.Distiller(
        config, models, info.num_actions, info.observation_size,
        num_devices=len(devices))
    self._grads = jax.pmap(self.distiller.grads, axis_name=AXIS,
                           devices=devices)
    self.actor_id = -1
    self.learner_version = -1
    self._actor_params = None
    self._learner_params = None

  def set_params(self, actor: Optional[Tuple[int, Params]],
                 learner: Optional[Tuple[int, Params]]) -> None:
    if actor is not None:
      self.actor_id, self._actor_params = actor[0], replicate(actor[1],
                                                              self.devices)
    if learner is not None:
      self.learner_version = learner[0]
      self._learner_params = replicate(learner[1], self.devices)

  def grads(self, batch: distillation.Replay
            ) -> Tuple[Params, Dict[str, float]]:
    """Gradients (host, one copy) and metrics on one minibatch of rows."""
    d = len(self.devices)
    rows = distillation.Replay(
        observation=shard(batch.observation, d, True),
        start=shard(batch.start, d, True), mask=shard(batch.mask, d, True),
        actor_state=shard(batch.actor_state, d, False),
        learner_state=shard(batch.learner_state, d, False),
        learner_logits=shard(batch.learner_logits, d, True),
        learner_value=shard(batch.learner_value, d, True),
        next_slot=np.zeros((d,), np.int32))
    learner_params = self._learner_params
    if learner_params is None:   # stored targets: not used by the loss
      learner_params = replicate({}, self.devices)
    grads, metrics = self._grads(self._actor_params, learner_params, rows)
    grads = _to_host(jax.tree.map(lambda x: x[0], grads))
    metrics = {k: float(np.asarray(v)[0]) for k, v in
               jax.device_get(metrics).items()}
    return grads, metrics

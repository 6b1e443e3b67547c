"""The roles (acting, learner, distillation) and the distributed runtime's
plain classes (ald_jax.workers), without Ray."""
import dataclasses

import jax
import numpy as np
import pytest

from ald_jax import acting as acting_lib
from ald_jax import agents
from ald_jax import config as config_lib
from ald_jax import learner as learner_lib
from ald_jax import training
from ald_jax import workers
from ald_jax.config import Config
from envs import registry

TINY = dict(env="recall", env_args="delay=2", num_envs=8, unroll_length=6,
            total_env_steps=10**6, encoder_hidden=16, lstm_hidden=16,
            gtrxl_layers=1, gtrxl_heads=2, gtrxl_d_model=16, gtrxl_mlp_width=16,
            gtrxl_memory_len=4, replay_segments=2)


def _unreplicate(tree):
  return jax.tree.map(lambda x: np.asarray(x)[0], jax.device_get(tree))


def _max_diff(a, b):
  return max(jax.tree.leaves(jax.tree.map(
      lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) -
                                       np.asarray(y, np.float64)))),
      a, b)), default=0.0)


def test_one_list_of_agents():
  assert config_lib.AGENTS is agents.AGENTS
  assert tuple(agents.ROLES) == agents.AGENTS == ("lstm", "gtrxl", "asym",
                                                  "ald")
  assert training._ROLES is agents.ROLES  # pylint: disable=protected-access


@pytest.mark.parametrize("agent,rl_loss", [("ald", "vmpo"), ("lstm", "ppo")])
def test_learner_role_update_equals_sync_learner_update(agent, rl_loss):
  """workers.LearnerCore (the distributed learner) == the sync runtime's
  learner phase, on the same batch, params, optimiser state and memory."""
  config = Config(agent=agent, rl_loss=rl_loss, **TINY)
  env = registry.make("recall", delay=2)
  trainer = training.make_trainer(config, env)
  state, _ = trainer.train_iteration(trainer.init())  # non-initial memory
  state, segment = trainer.collect(state)
  host = trainer.to_host(state)
  learner_start = _unreplicate(host.learner)
  synced = trainer.phases["learner_update"](state, segment)
  want = _unreplicate(synced.learner)

  info = workers.env_info(config, env)
  core = workers.LearnerCore(config, info, learner_start.params,
                             start=learner_start._replace(memory=()))
  metrics, extras, memory = core.update_batch(
      _unreplicate(segment), learner_start.memory)
  got = core.snapshot()
  assert np.isfinite(metrics["learner_loss"])
  assert _max_diff(want.params, got.params) < 1e-6
  assert _max_diff(want.duals, got.duals) < 1e-6
  assert _max_diff(want.opt_state, got.opt_state) < 1e-6
  assert _max_diff(want.memory, memory) < 1e-6
  assert int(got.update_count) == int(want.update_count) == 2
  # The update moved the params (the comparison is not vacuous).
  assert _max_diff(want.params, learner_start.params) > 1e-5
  if agent == "ald":
    assert extras.mask.shape == (config.unroll_length, config.num_envs)


@pytest.mark.parametrize("distill_targets", [
    "recompute", pytest.param("stored", marks=pytest.mark.slow)])
def test_distill_step_equals_sync_distillation_step(distill_targets):
  """One distiller gradient + the hub's optimiser step == the sync runtime's
  distillation phase (K = 1) on the same minibatch and params."""
  config = Config(agent="ald", distill_steps_per_rl_step=1,
                  distill_targets=distill_targets, **TINY)
  env = registry.make("recall", delay=2)
  trainer = training.make_trainer(config, env)
  state = trainer.init()
  for _ in range(2):
    state, _ = trainer.train_iteration(state)
  distiller = trainer.roles["distiller"]
  batch = jax.pmap(lambda s: distiller.sample_distill_batch(
      s.distill.replay, jax.random.split(s.rng, 1)[0]), axis_name="devices")(
          state)
  host = trainer.to_host(state)
  synced = trainer.phases["distillation"](state)
  want = _unreplicate(synced.distill.params)

  info = workers.env_info(config, env)
  start_distill = {"params": _unreplicate(host.distill.params),
                   "opt_state": _unreplicate(host.distill.opt_state)}
  params = {"actor": start_distill["params"],
            "learner": _unreplicate(host.learner.params["learner"])}
  hub = workers.HubCore(config, info, params, start_distill=start_distill)
  core = workers.DistillerCore(config, info)
  core.set_params((1, start_distill["params"]), (1, params["learner"]))
  grads, metrics = core.grads(_unreplicate(batch))
  hub.apply(grads, metrics)
  got = hub.snapshot()["params"]
  assert np.isfinite(metrics["loss"])
  assert _max_diff(want, got) < 1e-6
  assert _max_diff(want, start_distill["params"]) > 1e-5


def test_stream_memory_resets_on_gaps_and_counts_them():
  initial = {"h": np.zeros((1, 2), np.float32)}
  table = learner_lib.StreamMemory(initial)
  streams = [("a", 0), ("a", 1)]
  first = table.gather(streams, [(0, 0), (0, 0)])
  np.testing.assert_array_equal(first["h"], np.zeros((2, 2)))
  table.scatter(streams, [(0, 0), (0, 0)], {"h": np.ones((2, 2))})
  # Consecutive: carried.
  np.testing.assert_array_equal(
      table.gather(streams, [(0, 1), (0, 1)])["h"], np.ones((2, 2)))
  assert table.resets == 0
  table.scatter(streams, [(0, 1), (0, 1)], {"h": 2 * np.ones((2, 2))})
  # Stream 0 skips segment 2 (a gap), stream 1 restarted (new epoch).
  got = table.gather(streams, [(0, 3), (1, 0)])
  np.testing.assert_array_equal(got["h"], np.zeros((2, 2)))
  assert table.resets == 2
  # A stream first seen mid-way is a reset too; a fresh one is not.
  table.gather([("b", 0), ("c", 0)], [(0, 5), (0, 0)])
  assert table.resets == 3


def test_rate_limiter_keeps_the_ratio_within_its_error_buffer():
  limiter = workers.RateLimiter(samples_per_insert=3, error_buffer=6)
  assert not limiter.can_sample() and limiter.can_insert()
  rng = np.random.default_rng(0)
  for _ in range(2000):
    if rng.random() < 0.5 and limiter.can_insert():
      limiter.inserts += 1
    elif limiter.can_sample():
      limiter.samples += 1
    assert abs(limiter.samples - 3 * limiter.inserts) <= 6
    assert limiter.can_insert() or limiter.can_sample()  # no deadlock
  assert limiter.inserts > 100
  assert abs(limiter.ratio - 3) <= 6 / limiter.inserts
  with pytest.raises(ValueError, match="error_buffer"):
    workers.RateLimiter(samples_per_insert=4, error_buffer=2)


def _message(actor_id, seq, version, batch=2, epoch=0):
  t = 3
  ts = acting_lib.TimeStep(
      step_type=np.ones((t + 1, batch), np.int32),
      reward=np.zeros((t + 1, batch), np.float32),
      discount=np.ones((t + 1, batch), np.float32),
      observation=np.zeros((t + 1, batch, 4), np.float32))
  segment = acting_lib.Segment(
      timesteps=ts, actions=np.zeros((t, batch), np.int32),
      behaviour_logits=np.zeros((t, batch, 2), np.float32), acting_state=())
  return workers.SegmentMessage(actor_id, epoch, seq, version, segment,
                                np.zeros(3), 0.01)


def test_learner_batches_distinct_streams_and_drops_stale_segments():
  config = Config(agent="lstm", runtime="distributed", num_envs=4,
                  envs_per_actor=2, num_actors=3, max_policy_lag=1,
                  segment_queue_size=16, encoder_hidden=8, lstm_hidden=8)
  info = workers.EnvInfo(observation_size=4, num_actions=2, is_host_env=False)
  models = agents.build_models(config, info)
  core = workers.LearnerCore(config, info,
                             workers.initial_params(config, models))
  core.version = 5
  for message in [_message(0, 0, 5), _message(0, 1, 5), _message(1, 0, 3),
                  _message(2, 0, 4)]:
    assert core.add_segment(message)
  batch = core._next_batch(timeout=1.0)  # pylint: disable=protected-access
  # Actor 0's second segment waits (its streams are in the batch); actor 1's
  # is 2 versions old (dropped); actor 2's (lag 1) fills the batch.
  assert [(m.actor_id, m.seq) for m in batch] == [(0, 0), (2, 0)]
  assert core.dropped == 1
  assert core.env_steps == 4 * 3 * 2  # every received segment counts
  assert core.queue_depth() == 1
  records = core.poll()["records"]
  assert [r[-1] for r in records] == [0]  # the dropped one, logged
  assert records[0][5] == 2  # its lag


def test_host_replay_samples_rows_of_recent_batches():
  replay = workers.HostReplay(capacity=2, seed=0)
  for k in range(3):
    replay.add({"observation": np.full((4, 3, 5), k, np.float32),
                "start": np.zeros((4, 3), bool),
                "mask": np.ones((4, 3), np.float32),
                "actor_state": {"c": np.full((3, 7), k, np.float32)},
                "learner_state": {"m": np.full((3, 2, 2), k, np.float32)}})
  assert len(replay) == 2
  rows = replay.sample(5)
  assert rows.observation.shape == (4, 5, 5)
  assert rows.actor_state["c"].shape == (5, 7)
  assert rows.learner_state["m"].shape == (5, 2, 2)
  assert rows.learner_logits is None
  # Only the two most recent batches (1 and 2); rows stay aligned.
  np.testing.assert_array_equal(rows.observation[0, :, 0],
                                rows.actor_state["c"][:, 0])
  assert set(rows.observation[0, :, 0]) <= {1.0, 2.0}


def test_distributed_config_is_validated():
  base = dict(runtime="distributed", num_actors=2, envs_per_actor=4,
              num_envs=8)
  Config(**base).validate()
  for change, field in [({"num_envs": 12}, "num_envs"),
                        ({"num_envs": 6}, "num_envs"),
                        ({"actor_inference": "x"}, "actor_inference"),
                        ({"num_actors": 0}, "num_actors"),
                        ({"max_policy_lag": -1}, "max_policy_lag"),
                        ({"distill_error_buffer": 1}, "distill_error_buffer"),
                        ({"runtime": "async"}, "runtime")]:
    with pytest.raises(ValueError, match=f"^{field}:"):
      Config(**{**base, **change}).validate()
  # The sync runtime ignores the distributed fields.
  Config(num_envs=12, envs_per_actor=5).validate()


def test_actor_per_env_inference_equals_batched():
  """per_env (each stream at batch 1) acts exactly like batched inference:
  the same env streams and sampling keys, so the same segments."""
  segments = {}
  for mode in ("batched", "per_env"):
    config = Config(agent="ald", runtime="distributed", num_actors=1,
                    envs_per_actor=3, actor_inference=mode,
                    **{**TINY, "num_envs": 3})
    env = registry.make("recall", delay=2)
    actor = workers.ActorCore(config, env, actor_id=0)
    models = agents.build_models(config, workers.env_info(config, env))
    actor.set_params(0, 0, workers.initial_params(config, models)["actor"])
    segments[mode] = [actor.act() for _ in range(2)]
  for a, b in zip(segments["batched"], segments["per_env"]):
    np.testing.assert_array_equal(a.segment.actions, b.segment.actions)
    np.testing.assert_array_equal(a.segment.timesteps.observation,
                                  b.segment.timesteps.observation)
    np.testing.assert_allclose(a.segment.behaviour_logits,
                               b.segment.behaviour_logits, atol=1e-5)
    assert _max_diff(a.segment.acting_state, b.segment.acting_state) < 1e-5
    assert a.segment.actions.shape == (TINY["unroll_length"], 3)
    np.testing.assert_array_equal(a.episodes, b.episodes)


def test_host_acting_records_the_logits_its_model_unrolls_to():
  """HostActing over Python dm_env envs (both inference modes): recorded
  behaviour logits == the model's unroll from the recorded start state."""
  from envs import dm_env_adapters  # pylint: disable=g-import-not-at-top
  from envs.dm_env_adapters import JaxToDmEnv  # pylint: disable=g-import-not-at-top
  config = Config(agent="lstm", **TINY)
  jax_env = registry.make("recall", delay=1)
  model = agents.build_models(config, jax_env)["actor"]
  params = model.init(jax.random.PRNGKey(1))
  out = {}
  for per_env in (False, True):
    envs = dm_env_adapters.BatchedHostEnv(
        [JaxToDmEnv(jax_env, seed=s) for s in range(3)])
    host = acting_lib.HostActing(envs, model, 6, per_env=per_env, seed=0)
    host.rollout(params)                       # a non-initial start state
    segment, counts = host.rollout(params)
    ts = segment.timesteps
    unrolled, _ = model.unroll(params, segment.acting_state,
                               ts.observation[:-1], ts.step_type[:-1] == 0)
    np.testing.assert_allclose(unrolled.logits, segment.behaviour_logits,
                               atol=1e-5)
    assert (ts.step_type[1:-1] == 0).any()     # covers episode resets
    assert counts["count"] > 0
    out[per_env] = segment
  np.testing.assert_array_equal(out[False].actions, out[True].actions)

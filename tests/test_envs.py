"""Tests of the pure-JAX environments: scripted episodes and API conventions."""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from envs import api
from envs import registry
from envs.imaze import IMaze
from envs.metafetch import MetaFetch
from envs.recall import Recall

N, E, S, W = 0, 1, 2, 3
NUM_STEPS = 48  # Rollout length of the generic tests (one compile per env).

RECALL = Recall(num_cues=3, delay=2)
IMAZE = IMaze(corridor_length=2, step_penalty=0.05, time_limit_factor=2.0)
METAFETCH = MetaFetch(size=4, num_objects=3, view_size=3, time_limit=12,
                      wrong_object_penalty=0.5)
ALL_ENVS = [RECALL, IMAZE, METAFETCH]
ENV_IDS = ["recall", "imaze", "metafetch"]


# Compiled once per env and shared by all tests.
@functools.lru_cache(maxsize=None)
def jitted_reset(env):
  return jax.jit(env.reset)


@functools.lru_cache(maxsize=None)
def jitted_step(env):
  return jax.jit(env.step)


@functools.lru_cache(maxsize=None)
def jitted_rollout(env):
  """(key, actions int32 [T]) -> (states [T + 1], time steps [T + 1])."""

  def rollout(key, actions):
    state, time_step = env.reset(key)

    def body(state, action):
      state, time_step = env.step(state, action)
      return state, (state, time_step)

    _, (states, time_steps) = jax.lax.scan(body, state, actions)
    prepend = lambda first, rest: jnp.concatenate([first[None], rest])
    return (jax.tree.map(prepend, state, states),
            jax.tree.map(prepend, time_step, time_steps))

  return jax.jit(rollout)


def random_actions(env, seed, num_steps=NUM_STEPS):
  return np.random.default_rng(seed).integers(
      0, env.num_actions, num_steps).astype(np.int32)


def index(tree, i):
  return jax.tree.map(lambda x: x[i], tree)


def run_script(env, state, actions):
  """Steps `env` through `actions`; returns the list of (state, time step)."""
  step = jitted_step(env)
  out = []
  for action in actions:
    state, time_step = step(state, jnp.int32(action))
    out.append((state, time_step))
  return out


def assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


# ----------------------------------------------------------------------------
# Generic API conventions, for every env.


@pytest.mark.parametrize("env", ALL_ENVS, ids=ENV_IDS)
def test_auto_reset_after_last_gives_first(env):
  for seed in range(3):
    _, time_steps = jitted_rollout(env)(jax.random.PRNGKey(seed),
                                        random_actions(env, seed))
    step_type = np.asarray(time_steps.step_type)
    last = step_type == api.StepType.LAST
    first = step_type == api.StepType.FIRST
    assert last.sum() >= 2, "rollout too short to cover several episodes"
    assert first[0]
    # FIRST exactly on the steps after LAST (and at t = 0).
    np.testing.assert_array_equal(first[1:], last[:-1])
    np.testing.assert_array_equal(np.asarray(time_steps.reward)[first], 0.0)
    np.testing.assert_array_equal(np.asarray(time_steps.discount)[first], 1.0)
    tail = np.asarray(time_steps.observation)[first, -env.num_actions - 1:]
    np.testing.assert_array_equal(tail, 0.0)


@pytest.mark.parametrize("env", ALL_ENVS, ids=ENV_IDS)
def test_step_count_restarts_each_episode(env):
  states, time_steps = jitted_rollout(env)(jax.random.PRNGKey(7),
                                           random_actions(env, 7))
  first = np.asarray(time_steps.first())
  step_count = np.asarray(states.step_count)
  expected = np.zeros_like(step_count)
  for t in range(1, len(step_count)):
    expected[t] = 0 if first[t] else expected[t - 1] + 1
  np.testing.assert_array_equal(step_count, expected)


@pytest.mark.parametrize("env", ALL_ENVS, ids=ENV_IDS)
def test_observation_tail_is_previous_action_and_reward(env):
  actions = random_actions(env, 1)
  _, time_steps = jitted_rollout(env)(jax.random.PRNGKey(1), actions)
  observation = np.asarray(time_steps.observation)
  reward = np.asarray(time_steps.reward)
  first = np.asarray(time_steps.first())
  for t in range(1, len(observation)):
    if first[t]:
      continue
    expected = np.zeros(env.num_actions + 1, np.float32)
    expected[actions[t - 1]] = 1.0
    expected[-1] = reward[t]
    np.testing.assert_array_equal(observation[t, -env.num_actions - 1:],
                                  expected)


@pytest.mark.parametrize("env", ALL_ENVS, ids=ENV_IDS)
def test_jit_and_no_jit_and_scan_agree(env):
  num_steps = 16
  actions = random_actions(env, 2)
  key = jax.random.PRNGKey(2)
  scanned = jitted_rollout(env)(key, actions)
  state, time_step = env.reset(key)
  jit_state, jit_time_step = jitted_reset(env)(key)
  assert_trees_equal((state, time_step), (jit_state, jit_time_step))
  for t in range(num_steps):
    state, time_step = env.step(state, jnp.int32(actions[t]))
    jit_state, jit_time_step = jitted_step(env)(jit_state,
                                                jnp.int32(actions[t]))
    assert_trees_equal((state, time_step), (jit_state, jit_time_step))
    assert_trees_equal((state, time_step), index(scanned, t + 1))


@pytest.mark.parametrize("env", ALL_ENVS, ids=ENV_IDS)
def test_vmap_agrees_with_single_envs(env):
  batch, num_steps = 64, 10
  keys = jax.random.split(jax.random.PRNGKey(3), batch)
  actions = np.random.default_rng(3).integers(
      0, env.num_actions, (num_steps, batch)).astype(np.int32)
  states, time_steps = jax.jit(jax.vmap(env.reset))(keys)
  batched_step = jax.jit(jax.vmap(env.step))
  batched = [(states, time_steps)]
  for t in range(num_steps):
    states, time_steps = batched_step(states, actions[t])
    batched.append((states, time_steps))
  batched = jax.device_get(batched)  # NumPy, for cheap per-env indexing.
  for i in range(batch):
    state, time_step = jitted_reset(env)(keys[i])
    assert_trees_equal((state, time_step), index(batched[0], i))
    for t in range(num_steps):
      state, time_step = jitted_step(env)(state, actions[t, i])
      assert_trees_equal((state, time_step), index(batched[t + 1], i))


@pytest.mark.parametrize("env", ALL_ENVS, ids=ENV_IDS)
def test_specs_match_observations(env):
  _, time_steps = jitted_rollout(env)(jax.random.PRNGKey(4),
                                      random_actions(env, 4))
  spec = env.observation_spec()
  assert spec.shape == (env.observation_size,)
  for t in range(0, NUM_STEPS, 7):
    observation = np.asarray(time_steps.observation[t])
    spec.validate(observation)
  action_spec = env.action_spec()
  assert action_spec.num_values == env.num_actions
  assert time_steps.step_type.dtype == jnp.int32
  assert time_steps.reward.dtype == jnp.float32
  assert time_steps.discount.dtype == jnp.float32


@pytest.mark.parametrize("env", ALL_ENVS, ids=ENV_IDS)
def test_typed_and_raw_keys_give_the_same_episode(env):
  raw_state, raw_time_step = jitted_reset(env)(jax.random.PRNGKey(5))
  typed_state, typed_time_step = env.reset(jax.random.key(5))
  assert raw_state.key.dtype == jnp.uint32
  assert_trees_equal((raw_state, raw_time_step), (typed_state, typed_time_step))


@pytest.mark.parametrize("env", ALL_ENVS, ids=ENV_IDS)
def test_render_is_multiline_and_changes_when_the_agent_moves(env):
  state, _ = jitted_reset(env)(jax.random.PRNGKey(6))
  picture = env.render(state)
  assert isinstance(picture, str) and len(picture.splitlines()) >= 2
  position_field = {RECALL: None, IMAZE: "position",
                    METAFETCH: "agent_position"}[env]
  moves = 0
  for action in range(env.num_actions):
    next_state, _ = jitted_step(env)(state, jnp.int32(action))
    next_picture = env.render(next_state)
    assert next_picture != picture  # At least the time changes.
    if position_field and not np.array_equal(
        getattr(state, position_field), getattr(next_state, position_field)):
      moves += 1
      # The map itself (below the header line) shows the move.
      assert next_picture.splitlines()[1:] != picture.splitlines()[1:]
  assert position_field is None or moves > 0


INVALID_PARAMETERS = [
    (Recall, dict(num_cues=1), "num_cues"),
    (Recall, dict(delay=-1), "delay"),
    (IMaze, dict(corridor_length=0), "corridor_length"),
    (IMaze, dict(step_penalty=-0.1), "step_penalty"),
    (IMaze, dict(time_limit_factor=0.5), "time_limit_factor"),
    (MetaFetch, dict(size=1), "size"),
    (MetaFetch, dict(num_objects=0), "num_objects"),
    (MetaFetch, dict(size=3, num_objects=9), "more objects than free cells"),
    (MetaFetch, dict(view_size=4), "view_size"),
    (MetaFetch, dict(view_size=-1), "view_size"),
    (MetaFetch, dict(time_limit=0), "time_limit"),
    (MetaFetch, dict(wrong_object_penalty=-1.0), "wrong_object_penalty"),
]


@pytest.mark.parametrize("cls,kwargs,message", INVALID_PARAMETERS,
                         ids=[m for _, _, m in INVALID_PARAMETERS])
def test_invalid_parameters_raise(cls, kwargs, message):
  with pytest.raises(ValueError, match=message):
    cls(**kwargs)


def test_registry():
  assert registry.make("imaze", corridor_length=3) == IMaze(corridor_length=3)
  assert registry.make("recall") == Recall()
  assert registry.make("metafetch", size=3) == MetaFetch(size=3)
  assert registry.make("envs.recall:Recall", delay=1) == Recall(delay=1)
  with pytest.raises(ValueError, match="name must be one of"):
    registry.make("maze")
  with pytest.raises(ValueError, match="cannot import"):
    registry.make("no_such_module_xyz:Env")
  with pytest.raises(ValueError, match="no callable"):
    registry.make("envs.recall:NoSuchEnv")
  with pytest.raises(ValueError, match="corridor_length"):
    registry.make("imaze", corridor_length=0)


# ----------------------------------------------------------------------------
# Recall.


@pytest.mark.parametrize("correct", [True, False])
def test_recall_scripted_answer(correct):
  env = RECALL
  for seed in range(4):
    state, time_step = jitted_reset(env)(jax.random.PRNGKey(seed))
    cue = int(state.cue)
    observation = np.asarray(time_step.observation)
    np.testing.assert_array_equal(observation[:env.num_cues],
                                  np.eye(env.num_cues)[cue])
    assert observation[env.num_cues] == 0.0  # No query flag yet.
    answer = cue if correct else (cue + 1) % env.num_cues
    # Delay steps and the step onto the query, with actions that are not the
    # answer (they must have no effect).
    filler = [(cue + 2) % env.num_cues] * (env.delay + 1)
    outcome = run_script(env, state, filler + [answer])
    for t, (_, ts) in enumerate(outcome[:-1]):
      assert int(ts.step_type) == api.StepType.MID
      assert float(ts.reward) == 0.0 and float(ts.discount) == 1.0
      observation = np.asarray(ts.observation)
      np.testing.assert_array_equal(observation[:env.num_cues], 0.0)
      assert observation[env.num_cues] == float(t == env.delay)
    final_state, final = outcome[-1]
    assert int(final.step_type) == api.StepType.LAST
    assert float(final.discount) == 0.0
    assert float(final.reward) == float(correct)
    assert bool(env.success(final_state)) == correct


def test_recall_cues_are_all_drawn():
  states, _ = jax.vmap(jitted_reset(RECALL))(
      jax.random.split(jax.random.PRNGKey(0), 300))
  counts = np.bincount(np.asarray(states.cue), minlength=RECALL.num_cues)
  assert np.all(counts > 60), counts


# ----------------------------------------------------------------------------
# I-Maze. Hand-drawn layout of IMAZE (corridor_length 2), independent of the
# implementation's grid builder.

IMAZE_LAYOUT = ["#####",
                "#...#",
                "##.##",
                "##.##",
                "#A.B#",
                "#####"]
CELL_CODES = {"#": 0, ".": 1, "A": 2, "B": 3}


def imaze_reference_view(row, column):
  """float64 [36]: one-hot 3x3 view around (row, column) of IMAZE_LAYOUT."""
  view = np.zeros((3, 3, 4))
  for dr, dc in itertools.product(range(3), range(3)):
    r, c = row + dr - 1, column + dc - 1
    inside = 0 <= r < len(IMAZE_LAYOUT) and 0 <= c < len(IMAZE_LAYOUT[0])
    view[dr, dc, CELL_CODES[IMAZE_LAYOUT[r][c]] if inside else 0] = 1.0
  return view.reshape(-1)


def imaze_start(cue):
  """A reset state of IMAZE whose cue is `cue` (searching over seeds)."""
  for seed in range(100):
    state, time_step = jitted_reset(IMAZE)(jax.random.PRNGKey(seed))
    if int(state.cue) == cue:
      return state, time_step
  raise AssertionError("cue never drawn")


def test_imaze_grid_matches_hand_drawn_layout():
  expected = np.array([[CELL_CODES[c] for c in row] for row in IMAZE_LAYOUT])
  np.testing.assert_array_equal(IMAZE.grid(), expected)
  assert IMAZE.shortest_path_length == 4 and IMAZE.time_limit == 8


@pytest.mark.parametrize("cue", [0, 1])
@pytest.mark.parametrize("to_cued_goal", [True, False])
def test_imaze_shortest_path_to_a_goal(cue, to_cued_goal):
  state, _ = imaze_start(cue)
  goes_west = (cue == 0) == to_cued_goal  # Goal A is west, goal B east.
  script = [S] * (IMAZE.corridor_length + 1) + [W if goes_west else E]
  outcome = run_script(IMAZE, state, script)
  for _, ts in outcome[:-1]:
    assert int(ts.step_type) == api.StepType.MID
    np.testing.assert_allclose(float(ts.reward), -IMAZE.step_penalty)
    assert float(ts.discount) == 1.0
  final_state, final = outcome[-1]
  assert int(final.step_type) == api.StepType.LAST
  assert float(final.discount) == 0.0
  assert float(final.reward) == (1.0 if to_cued_goal else -1.0)
  assert bool(IMAZE.success(final_state)) == to_cued_goal
  # The next step starts a new episode whatever the action.
  _, after = jitted_step(IMAZE)(final_state, jnp.int32(N))
  assert int(after.step_type) == api.StepType.FIRST


def test_imaze_walls_block():
  state, _ = imaze_start(0)
  blocked_at_start = [N]  # Row 0 is wall.
  outcome = run_script(IMAZE, state, blocked_at_start)
  np.testing.assert_array_equal(outcome[-1][0].position, [1, 2])
  # West twice along the top row: the second move hits the wall at (1, 0).
  outcome = run_script(IMAZE, state, [W, W])
  np.testing.assert_array_equal(outcome[0][0].position, [1, 1])
  np.testing.assert_array_equal(outcome[1][0].position, [1, 1])
  # In the corridor, east and west are walls.
  outcome = run_script(IMAZE, state, [S, E, W])
  for s, _ in outcome:
    np.testing.assert_array_equal(s.position, [2, 2])


def test_imaze_view_and_cue_visibility_match_reference():
  for cue in (0, 1):
    start_state, start_time_step = imaze_start(cue)
    visited = [(start_state, start_time_step)]
    # Both scripts stay within the time limit (8 steps) and avoid the goals.
    for script in ([E, W, W, E, S, S, N], [S, S, S, N]):
      visited += run_script(IMAZE, start_state, script)
    for s, ts in visited:
      row, column = (int(x) for x in s.position)
      observation = np.asarray(ts.observation)
      np.testing.assert_array_equal(observation[:36],
                                    imaze_reference_view(row, column))
      expected_cue = np.eye(2)[cue] if row == 1 else np.zeros(2)
      np.testing.assert_array_equal(observation[36:38], expected_cue)
    # The script visited both the top row and the corridor.
    assert {int(s.position[0]) for s, _ in visited} == {1, 2, 3, 4}


def test_imaze_time_limit_truncates_with_discount_one():
  state, _ = imaze_start(1)
  outcome = run_script(IMAZE, state, [N] * IMAZE.time_limit)
  for _, ts in outcome[:-1]:
    assert int(ts.step_type) == api.StepType.MID
  final_state, final = outcome[-1]
  assert int(final.step_type) == api.StepType.LAST
  assert float(final.discount) == 1.0
  np.testing.assert_allclose(float(final.reward), -IMAZE.step_penalty)
  assert not bool(IMAZE.success(final_state))


def test_imaze_cue_is_random_per_episode():
  states, _ = jax.vmap(jitted_reset(IMAZE))(
      jax.random.split(jax.random.PRNGKey(1), 200))
  fraction = float(np.mean(np.asarray(states.cue)))
  assert 0.3 < fraction < 0.7


# ----------------------------------------------------------------------------
# Meta-Fetch.


def metafetch_reference_view(state, env):
  """float64 [V * V * (K + 2)]: the egocentric view computed with loops."""
  radius = env.view_size // 2
  view = np.zeros((env.view_size, env.view_size, env.num_objects + 2))
  agent = np.asarray(state.agent_position)
  positions = np.asarray(state.object_positions)
  collected = np.asarray(state.collected)
  for dr, dc in itertools.product(range(env.view_size), repeat=2):
    r, c = agent[0] + dr - radius, agent[1] + dc - radius
    if not (0 <= r < env.size and 0 <= c < env.size):
      view[dr, dc, 0] = 1.0
      continue
    here = [k for k in range(env.num_objects)
            if not collected[k] and tuple(positions[k]) == (r, c)]
    view[dr, dc, 2 + here[0] if here else 1] = 1.0
  return view.reshape(-1)


def metafetch_reference_transition(env, state, action):
  """NumPy re-implementation of one non-terminal Meta-Fetch transition.

  Returns (agent position, reward, progress, collected, round completed).
  """
  moves = {N: (-1, 0), E: (0, 1), S: (1, 0), W: (0, -1)}
  agent = np.asarray(state.agent_position) + moves[int(action)]
  moved = bool(np.all((agent >= 0) & (agent < env.size)))
  if not moved:
    agent = np.asarray(state.agent_position)
  progress = int(state.progress)
  collected = np.asarray(state.collected).copy()
  reward = 0.0
  round_done = False
  for k in range(env.num_objects):
    if (moved and not collected[k] and
        tuple(np.asarray(state.object_positions[k])) == tuple(agent)):
      if k == int(state.order[progress]):
        reward, collected[k], progress = 1.0, True, progress + 1
        if progress == env.num_objects:
          round_done, progress, collected[:] = True, 0, False
      else:
        reward, progress, collected[:] = -env.wrong_object_penalty, 0, False
  return agent, reward, progress, collected, round_done


def place(state, agent, objects, order):
  return state._replace(
      agent_position=jnp.asarray(agent, jnp.int32),
      object_positions=jnp.asarray(objects, jnp.int32),
      order=jnp.asarray(order, jnp.int32))


# Agent at (1, 1) with object k one step away in direction SCRIPT_DIRECTIONS[k].
SCRIPT_AGENT = (1, 1)
SCRIPT_OBJECTS = [(0, 1), (1, 2), (2, 1)]
SCRIPT_DIRECTIONS = [N, E, S]
BACK = {N: S, E: W, S: N, W: E}


def test_metafetch_fetching_in_order_rewards_and_respawns():
  env = METAFETCH
  state, _ = jitted_reset(env)(jax.random.PRNGKey(0))
  order = [2, 0, 1]
  state = place(state, SCRIPT_AGENT, SCRIPT_OBJECTS, order)
  script = []
  for k in order:
    script += [SCRIPT_DIRECTIONS[k], BACK[SCRIPT_DIRECTIONS[k]]]
  # Not the final step back: it could enter a respawned object.
  outcome = run_script(env, state, script[:-1])
  rewards = [float(ts.reward) for _, ts in outcome]
  assert rewards == [1.0, 0.0, 1.0, 0.0, 1.0]
  # After the 2nd fetch, objects 2 and 0 are gone and object 1 remains.
  np.testing.assert_array_equal(outcome[2][0].collected, [True, False, True])
  assert int(outcome[2][0].progress) == 2
  # The round completes on the 3rd fetch (step 5): objects respawn.
  respawned, _ = outcome[4]
  assert int(respawned.rounds_completed) == 1 and bool(env.success(respawned))
  assert int(respawned.progress) == 0
  np.testing.assert_array_equal(respawned.collected, False)
  np.testing.assert_array_equal(respawned.order, order)
  cells = {tuple(p) for p in np.asarray(respawned.object_positions)}
  assert len(cells) == env.num_objects
  assert tuple(np.asarray(respawned.agent_position)) not in cells
  assert all(int(ts.step_type) == api.StepType.MID for _, ts in outcome)


def test_metafetch_wrong_object_resets_the_round():
  env = METAFETCH
  state, _ = jitted_reset(env)(jax.random.PRNGKey(1))
  state = place(state, SCRIPT_AGENT, SCRIPT_OBJECTS, [0, 1, 2])
  # Fetch object 0 (north), come back, then touch object 2 (south) instead of 1.
  outcome = run_script(env, state, [N, S, S])
  assert float(outcome[0][1].reward) == 1.0
  wrong_state, wrong = outcome[2]
  assert float(wrong.reward) == -env.wrong_object_penalty
  assert int(wrong_state.progress) == 0
  np.testing.assert_array_equal(wrong_state.collected, False)
  np.testing.assert_array_equal(wrong_state.object_positions, SCRIPT_OBJECTS)
  assert int(wrong_state.rounds_completed) == 0
  # Standing on it and bumping nothing new touches nothing; going back north
  # twice re-enters (1, 1) then object 0, which is next again: +1.
  outcome = run_script(env, wrong_state, [N, N])
  assert [float(ts.reward) for _, ts in outcome] == [0.0, 1.0]


def test_metafetch_bumping_the_wall_on_an_object_touches_nothing():
  env = METAFETCH
  state, _ = jitted_reset(env)(jax.random.PRNGKey(2))
  state = place(state, (0, 0), [(0, 1), (1, 0), (3, 3)], [2, 1, 0])
  outcome = run_script(env, state, [E, N, N])
  assert [float(ts.reward) for _, ts in outcome] == [-0.5, 0.0, 0.0]


def test_metafetch_matches_numpy_reference_over_random_rollouts():
  env = METAFETCH
  checked_fetches = 0
  for seed in range(6):
    actions = random_actions(env, 100 + seed)
    states, time_steps = jitted_rollout(env)(jax.random.PRNGKey(seed), actions)
    for t in range(NUM_STEPS + 1):
      state = index(states, t)
      np.testing.assert_array_equal(
          np.asarray(time_steps.observation[t])[:-env.num_actions - 1],
          metafetch_reference_view(state, env))
      if t == NUM_STEPS or bool(state.is_last):
        continue
      agent, reward, progress, collected, round_done = (
          metafetch_reference_transition(env, state, actions[t]))
      nxt = index(states, t + 1)
      np.testing.assert_array_equal(nxt.agent_position, agent)
      np.testing.assert_allclose(float(time_steps.reward[t + 1]), reward)
      assert int(nxt.progress) == progress
      np.testing.assert_array_equal(nxt.collected, collected)
      assert int(nxt.rounds_completed) == int(state.rounds_completed) + round_done
      np.testing.assert_array_equal(nxt.order, state.order)
      if not round_done:
        np.testing.assert_array_equal(nxt.object_positions,
                                      state.object_positions)
      checked_fetches += reward != 0.0
  assert checked_fetches > 5  # The random rollouts did touch objects.


def test_metafetch_order_is_random_across_episodes():
  env = METAFETCH
  orders = []
  reset = jax.vmap(jitted_reset(env))
  for seed in range(10):
    states, _ = reset(jax.random.split(jax.random.PRNGKey(seed), 64))
    orders += [tuple(o) for o in np.asarray(states.order)]
    positions = np.asarray(states.object_positions)
    agents = np.asarray(states.agent_position)
    for p, a in zip(positions, agents):
      assert len({tuple(x) for x in p} | {tuple(a)}) == env.num_objects + 1
  counts = {perm: orders.count(perm) for perm in itertools.permutations(range(3))}
  # 640 draws over 6 permutations: about 107 each.
  assert sum(counts.values()) == len(orders)
  assert all(60 < c < 160 for c in counts.values()), counts


def test_metafetch_order_fixed_within_episode_and_redrawn_after():
  env = METAFETCH
  states, time_steps = jitted_rollout(env)(jax.random.PRNGKey(3),
                                           random_actions(env, 3, NUM_STEPS))
  orders = np.asarray(states.order)
  first = np.asarray(time_steps.first())
  episode = np.cumsum(first)
  per_episode = []
  for e in np.unique(episode):
    in_episode = orders[episode == e]
    np.testing.assert_array_equal(in_episode, in_episode[:1].repeat(
        len(in_episode), 0))
    per_episode.append(tuple(in_episode[0]))
  assert len(per_episode) >= 4


def test_metafetch_time_limit_truncates_with_discount_one():
  env = METAFETCH
  state, _ = jitted_reset(env)(jax.random.PRNGKey(4))
  state = place(state, (0, 0), [(3, 3), (3, 2), (2, 3)], [0, 1, 2])
  outcome = run_script(env, state, [N] * env.time_limit)
  assert all(int(ts.step_type) == api.StepType.MID for _, ts in outcome[:-1])
  final_state, final = outcome[-1]
  assert int(final.step_type) == api.StepType.LAST
  assert float(final.discount) == 1.0
  assert not bool(env.success(final_state))


# ----------------------------------------------------------------------------
# Added with the Meta-Fetch speed-up: jitted + vmapped against plain stepping
# over long rollouts, and the env's own random draws against jax.random.


@pytest.mark.parametrize("env", ALL_ENVS, ids=ENV_IDS)
def test_vmapped_jitted_steps_equal_unjitted_steps(env):
  batch, num_steps, checked = 8, 200, 5
  keys = jax.random.split(jax.random.PRNGKey(11), batch)
  actions = np.random.default_rng(11).integers(
      0, env.num_actions, (num_steps, batch)).astype(np.int32)

  @jax.jit
  def batched_rollout(keys, actions):
    states, time_steps = jax.vmap(env.reset)(keys)

    def body(states, actions):
      states, time_steps = jax.vmap(env.step)(states, actions)
      return states, (states, time_steps)

    return (states, time_steps), jax.lax.scan(body, states, actions)[1]

  first, rest = jax.device_get(batched_rollout(keys, actions))
  state, time_step = env.reset(keys[checked])  # Not jitted, not vmapped.
  assert_trees_equal((state, time_step), index(first, checked))
  for t in range(num_steps):
    state, time_step = env.step(state, jnp.int32(actions[t, checked]))
    assert_trees_equal((state, time_step), index(index(rest, t), checked))
  last = np.asarray(rest[1].step_type)[:, checked] == api.StepType.LAST
  assert last.sum() >= 3  # Several episodes, so several auto-resets.
  if env is METAFETCH:
    assert np.asarray(rest[0].rounds_completed).max() >= 1  # Respawns too.


def assert_uniform_counts(counts, where=None):
  """Asserts `counts` (of values drawn i.i.d.) look uniform over `where`.

  Every count within 5 standard errors of uniform, and a chi-square test at
  p > 1e-4 (Wilson-Hilferty approximation). Counts outside `where` must be 0.
  """
  import math  # pylint: disable=g-import-not-at-top
  counts = np.asarray(counts, np.float64).ravel()
  where = np.ones(counts.shape, bool) if where is None else np.ravel(where)
  np.testing.assert_array_equal(counts[~where], 0)
  counts = counts[where]
  total, p = counts.sum(), 1 / counts.size
  error = np.abs(counts - total * p) / np.sqrt(total * p * (1 - p))
  assert error.max() < 5, counts
  chi2, dof = ((counts - total * p)**2 / (total * p)).sum(), counts.size - 1
  z = ((chi2 / dof)**(1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
  assert 0.5 * math.erfc(z / math.sqrt(2)) > 1e-4, (chi2, dof, counts)


@pytest.mark.parametrize("size,num_objects", [(3, 2), (4, 3), (2, 3)])
def test_metafetch_random_draws_are_uniform(size, num_objects):
  # 6000 vmapped resets, then one end-of-round respawn of each (fixed seed).
  env = MetaFetch(size=size, num_objects=num_objects, view_size=3,
                  time_limit=5)
  cells, k, n = size * size, num_objects, 6000
  states, _ = jax.jit(jax.vmap(env.reset))(
      jax.random.split(jax.random.PRNGKey(14), n))
  agent = np.asarray(states.agent_position) @ [size, 1]
  objects = np.asarray(states.object_positions) @ [size, 1]  # [n, K]
  # Agent and objects at K + 1 distinct cells.
  occupied = np.concatenate([agent[:, None], objects], axis=1)
  assert all(len(set(row)) == k + 1 for row in occupied)
  # Each of agent, object j: uniform over the cells (every cell reached).
  for column in occupied.T:
    assert_uniform_counts(np.bincount(column, minlength=cells))
  # Pairs (agent, object 0) and (object 0, object last): uniform over the
  # ordered pairs of distinct cells (so independent but for distinctness).
  distinct = ~np.eye(cells, dtype=bool)
  for a, b in [(0, 1), (1, k)]:
    pairs = np.bincount(occupied[:, a] * cells + occupied[:, b],
                        minlength=cells**2)
    assert_uniform_counts(pairs, distinct)
  # The order: each of the K! permutations equally likely.
  permutations = list(itertools.permutations(range(k)))
  order = [permutations.index(tuple(o)) for o in np.asarray(states.order)]
  assert_uniform_counts(np.bincount(order, minlength=len(permutations)))

  # Respawns: the agent at (0, 1) steps south onto (1, 1), onto the last
  # object of the round (the others collected): new cells for all K.
  agent_cell = size + 1
  states = states._replace(
      agent_position=jnp.tile(jnp.int32([0, 1]), (n, 1)),
      object_positions=jnp.tile(jnp.int32([[1, 1]] * k), (n, 1, 1)),
      order=jnp.tile(jnp.arange(k, dtype=jnp.int32), (n, 1)),
      collected=jnp.tile(jnp.arange(k) < k - 1, (n, 1)),
      progress=jnp.full((n,), k - 1, jnp.int32))
  states, time_steps = jax.jit(jax.vmap(env.step))(
      states, jnp.full((n,), S, jnp.int32))
  np.testing.assert_array_equal(time_steps.reward, 1.0)
  np.testing.assert_array_equal(states.rounds_completed, 1)
  np.testing.assert_array_equal(np.asarray(states.agent_position) @ [size, 1],
                                agent_cell)
  np.testing.assert_array_equal(states.order,
                                np.tile(np.arange(k), (n, 1)))  # Kept.
  objects = np.asarray(states.object_positions) @ [size, 1]
  assert all(len(set(row) | {agent_cell}) == k + 1 for row in objects)
  # Each object uniform over the cells but the agent's.
  for column in objects.T:
    assert_uniform_counts(np.bincount(column, minlength=cells),
                          np.arange(cells) != agent_cell)
  if k > 1:
    pairs = np.bincount(objects[:, 0] * cells + objects[:, 1],
                        minlength=cells**2).reshape(cells, cells)
    free = np.arange(cells) != agent_cell
    assert_uniform_counts(pairs, distinct.reshape(cells, cells) &
                          free[:, None] & free[None, :])

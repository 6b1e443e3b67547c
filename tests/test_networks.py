"""Tests of ald_jax.networks: step/unroll parity, episode isolation, GTrXL
memory reach, gate initialisation, a float64 NumPy reference of one GTrXL
layer, shapes under jit/vmap and parameter counts."""
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ald_jax import networks

OBS, ACTIONS, ENCODER = 5, 3, 8
LSTM_HIDDEN = 16
LAYERS, HEADS, D_MODEL, MLP, MEMORY = 2, 2, 8, 16, 3


def _lstm(**overrides):
  kwargs = dict(observation_size=OBS, num_actions=ACTIONS,
                encoder_hidden=ENCODER, lstm_hidden=LSTM_HIDDEN)
  kwargs.update(overrides)
  return networks.make_lstm_model(**kwargs)


def _gtrxl(**overrides):
  kwargs = dict(observation_size=OBS, num_actions=ACTIONS,
                encoder_hidden=ENCODER, num_layers=LAYERS, num_heads=HEADS,
                d_model=D_MODEL, mlp_width=MLP, memory_len=MEMORY)
  kwargs.update(overrides)
  return networks.make_gtrxl_model(**kwargs)


MODELS = {"lstm": _lstm, "gtrxl": _gtrxl}


BATCH, LENGTH = 3, 5  # one segment; tests use two consecutive segments


@functools.lru_cache(maxsize=None)
def _jitted(name, **overrides):
  """(model, jitted init, params, jitted step, jitted unroll), compiled once."""
  model = MODELS[name](**overrides)
  init = jax.jit(model.init)
  return (model, init, init(jax.random.key(0)), jax.jit(model.step),
          jax.jit(model.unroll))


def _observations(seed):
  """float32 [2 * LENGTH, BATCH, OBS]: two segments."""
  return jax.random.normal(jax.random.key(seed), (2 * LENGTH, BATCH, OBS))


def _unroll_two_segments(unroll, params, initial_state, obs, start):
  """Unrolls obs [2T, B, O] as two segments carrying the state in between."""
  out1, state = unroll(params, initial_state, obs[:LENGTH], start[:LENGTH])
  out2, state = unroll(params, state, obs[LENGTH:], start[LENGTH:])
  return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out1, out2), state


def _assert_outputs_close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol,
                                                       atol=atol), a, b)


def _max_abs_diff(a, b):
  return max(float(jnp.max(jnp.abs(x - y)))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# Starts differ per env: env 0 starts mid-segment 1 and again in segment 2,
# env 1 only at t=0, env 2 every few steps, including at the segment boundary.
_STARTS = np.zeros((2 * LENGTH, BATCH), bool)
_STARTS[0, :] = True
_STARTS[[3, 7], 0] = True
_STARTS[[2, 5, 6, 9], 2] = True


@pytest.mark.parametrize("name", sorted(MODELS))
def test_steps_match_two_carried_unrolls(name):
  model, _, params, step, unroll = _jitted(name)
  obs, start = _observations(1), jnp.asarray(_STARTS)
  initial = model.initial_state(BATCH)
  stepped, step_state, state_after_segment1 = [], initial, None
  for t in range(2 * LENGTH):
    out, step_state = step(params, step_state, obs[t], start[t])
    stepped.append(out)
    if t == LENGTH - 1:
      state_after_segment1 = step_state
  stepped = jax.tree.map(lambda *xs: jnp.stack(xs), *stepped)

  unrolled, end_state = _unroll_two_segments(unroll, params, initial, obs,
                                             start)
  _assert_outputs_close(unrolled, stepped)
  _assert_outputs_close(end_state, step_state)
  # Segment 2 unrolled from the state reached by stepping also matches.
  out2, _ = unroll(params, state_after_segment1, obs[LENGTH:], start[LENGTH:])
  _assert_outputs_close(out2, jax.tree.map(lambda x: x[LENGTH:], stepped))


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("first_steps", [
    (3, None, 5),  # mid-segment 1 (then memory from before it is carried
                   # into segment 2), none, at the segment boundary
    (7, None, 6),  # mid-segment 2
])
def test_episode_start_cuts_dependence_on_the_past(name, first_steps):
  """Env b starts an episode at first_steps[b] (None: only at t=0)."""
  model, _, params, _, unroll = _jitted(name)
  obs = _observations(3)
  start = np.zeros((2 * LENGTH, BATCH), bool)
  start[0] = True
  perturbed = obs
  for env, first in enumerate(first_steps):
    if first is not None:
      start[first, env] = True
    perturbed = perturbed.at[:first or LENGTH, env].add(3.0)

  def run(observations):
    return _unroll_two_segments(unroll, params, model.initial_state(BATCH),
                                observations, jnp.asarray(start))[0]

  base, moved = run(obs), run(perturbed)
  for env, first in enumerate(first_steps):
    after = functools.partial(lambda x, first, env: x[first or LENGTH:, env],
                              first=first, env=env)
    if first is None:  # no start: the perturbation does change later outputs
      assert _max_abs_diff(after(base.value), after(moved.value)) > 1e-3
    else:
      _assert_outputs_close(jax.tree.map(after, base),
                            jax.tree.map(after, moved), rtol=0, atol=1e-6)


@pytest.mark.parametrize("num_layers,memory_len", [(1, 6), (2, 3)])
def test_gtrxl_reach_is_layers_times_memory_across_segments(num_layers,
                                                            memory_len):
  overrides = {}
  if (num_layers, memory_len) != (LAYERS, MEMORY):
    overrides = dict(num_layers=num_layers, memory_len=memory_len)
  model, _, params, _, unroll = _jitted("gtrxl", **overrides)
  obs = _observations(5)
  start = jnp.zeros((2 * LENGTH, BATCH), bool).at[0].set(True)
  reach = num_layers * memory_len
  last = 2 * LENGTH - 1
  oldest_seen, too_old = last - reach, last - reach - 1
  assert 0 <= too_old and oldest_seen < LENGTH  # both in segment 1

  def last_value(observations):
    outputs, _ = _unroll_two_segments(unroll, params,
                                      model.initial_state(BATCH),
                                      observations, start)
    return float(outputs.value[last, 0])

  base = last_value(obs)
  assert abs(last_value(obs.at[oldest_seen, 0].add(3.0)) - base) > 1e-4
  assert last_value(obs.at[too_old, 0].add(3.0)) == pytest.approx(base,
                                                                  abs=1e-6)
  assert last_value(obs.at[:too_old + 1, 0].add(3.0)) == pytest.approx(
      base, abs=1e-6)


# One small layer configuration shared by the layer-level tests (one compile).
_LAYER_BATCH, _LAYER_LENGTH, _LAYER_WIDTH, _LAYER_HEADS, _LAYER_MEMORY = (
    3, 5, 8, 2, 3)


@functools.lru_cache(maxsize=None)
def _layer_functions():
  """(jitted init, jitted apply) of a GTrXLLayer with b_g initialised to 2."""
  layer = networks.GTrXLLayer(_LAYER_HEADS, 2 * _LAYER_WIDTH, 2.0)
  return jax.jit(layer.init), jax.jit(layer.apply)


def _layer_inputs(seed, memory_valid, start):
  """rng and (x, memory keys, memory values, attend) of the shared layer."""
  keys = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(keys[0], (_LAYER_BATCH, _LAYER_LENGTH, _LAYER_WIDTH))
  memory_shape = (_LAYER_BATCH, _LAYER_MEMORY, _LAYER_HEADS,
                  _LAYER_WIDTH // _LAYER_HEADS)
  memory_keys = jax.random.normal(keys[1], memory_shape)
  memory_values = jax.random.normal(keys[2], memory_shape)
  attend = networks._segment_attention_mask(jnp.asarray(memory_valid),
                                            jnp.asarray(start))
  return keys[3], (x, memory_keys, memory_values, attend)


def _relative_change(gate_bias):
  """max over seeds of ||layer(x) - x|| / ||x|| at init, unit-normal x.

  The layer is initialised as usual, then both gates' b_g are set to
  `gate_bias` (b_g is the only parameter that gate_bias_init affects).
  """
  init, apply = _layer_functions()
  start = np.zeros((_LAYER_BATCH, _LAYER_LENGTH), bool)
  start[:, 0] = True
  no_memory = np.zeros((_LAYER_BATCH, _LAYER_MEMORY), bool)
  ratios = []
  for seed in range(4):
    rng, args = _layer_inputs(seed, no_memory, start)
    params = flax.traverse_util.flatten_dict(init(rng, *args))
    params = {path: (jnp.full_like(value, gate_bias)
                     if path[-1] == "gate_bias" else value)
              for path, value in params.items()}
    out = apply(flax.traverse_util.unflatten_dict(params), *args)[0]
    ratios.append(float(jnp.linalg.norm(out - args[0])
                        / jnp.linalg.norm(args[0])))
  return max(ratios)


def test_gate_bias_init_is_two():
  init, _ = _layer_functions()
  rng, args = _layer_inputs(0, np.zeros((_LAYER_BATCH, _LAYER_MEMORY), bool),
                            np.ones((_LAYER_BATCH, _LAYER_LENGTH), bool))
  params = init(rng, *args)["params"]
  for gate in ("attention_gate", "mlp_gate"):
    np.testing.assert_array_equal(params[gate]["gate_bias"], 2.0)


def test_gate_bias_two_starts_each_layer_near_identity():
  # Each gate moves x by z * (h - x) with z ~= sigmoid(-b_g); for b_g = 2
  # z ~= 0.12 and two gates per layer change unit-scale inputs by ~0.45.
  assert _relative_change(2.0) < 0.55


def test_gate_bias_zero_is_far_from_identity():
  # Same check with b_g = 0 (z ~= 0.5): the bound above would fail.
  assert _relative_change(0.0) > 0.7


def _np_layer_norm(x, scale, bias):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-6) * scale + bias


def _np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _np_gate(p, x, y):
  width = x.shape[-1]
  w = p["w_rzg"]["kernel"]
  u = p["u_rz"]["kernel"]
  reset = _np_sigmoid(y @ w[:, :width] + x @ u[:, :width])
  update = _np_sigmoid(y @ w[:, width:2 * width] + x @ u[:, width:]
                       - p["gate_bias"])
  candidate = np.tanh(y @ w[:, 2 * width:] + (reset * x) @ p["u_g"]["kernel"])
  return (1 - update) * x + update * candidate


def _np_layer(p, x, memory_keys, memory_values, memory_valid, start):
  """Float64 loop reference of one GTrXL layer for one batch row.

  x [T, D], memory_keys/values [M, H, Dh], memory_valid [M], start [T].
  """
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  length, width = x.shape
  memory_len, heads, head_dim = memory_keys.shape
  half = np.arange(width // 2)
  frequency = 10000.0 ** (-2.0 * half / width)
  encoding = lambda d: np.concatenate([np.sin(d * frequency),
                                       np.cos(d * frequency)])
  normed = _np_layer_norm(x, p["attention_norm"]["scale"],
                          p["attention_norm"]["bias"])
  project = lambda name: np.einsum("te,ehd->thd", normed, p[name]["kernel"])
  query = project("query")
  keys = np.concatenate([memory_keys, project("key")])
  values = np.concatenate([memory_values, project("value")])
  # Episode of each key: memory keys are in the episode current at t=0 if
  # valid; a segment step's episode changes at each start.
  key_episode = [0 if v else -1 for v in memory_valid]
  episode = 0
  for t in range(length):
    episode += int(start[t])
    key_episode.append(episode)
  attended = np.zeros((length, heads, head_dim))
  for i in range(length):
    query_position = memory_len + i
    for h in range(heads):
      scores, allowed = [], []
      for j in range(memory_len + length):
        distance = query_position - j
        ok = 0 <= distance <= memory_len and key_episode[j] == key_episode[
            query_position]
        allowed.append(ok)
        position_key = encoding(max(distance, 0)) @ p["position_kernel"][:, h]
        scores.append(((query[i, h] + p["content_bias"][h]) @ keys[j, h]
                       + (query[i, h] + p["position_bias"][h]) @ position_key)
                      / np.sqrt(head_dim))
      scores = np.where(allowed, scores, -np.inf)
      weights = np.exp(scores - scores.max())
      weights /= weights.sum()
      attended[i, h] = weights @ values[:, h]
  attention = (np.einsum("thd,hde->te", attended,
                         p["attention_out"]["kernel"])
               + p["attention_out"]["bias"])
  x = _np_gate(p["attention_gate"], x, np.maximum(attention, 0))
  hidden = np.maximum(_np_layer_norm(x, p["mlp_norm"]["scale"],
                                     p["mlp_norm"]["bias"])
                      @ p["mlp_hidden"]["kernel"] + p["mlp_hidden"]["bias"], 0)
  mlp = hidden @ p["mlp_out"]["kernel"] + p["mlp_out"]["bias"]
  return _np_gate(p["mlp_gate"], x, np.maximum(mlp, 0))


def test_gtrxl_layer_matches_float64_reference():
  memory_valid = np.array([[0, 1, 1], [1, 1, 1], [0, 0, 0]], bool)
  start = np.zeros((_LAYER_BATCH, _LAYER_LENGTH), bool)
  start[1, 2] = True
  start[2, [0, 3]] = True
  init, apply = _layer_functions()
  rng, args = _layer_inputs(7, memory_valid, start)
  params = dict(init(rng, *args)["params"])
  # Non-zero u, v so that both bias terms are exercised.
  params["content_bias"] = jnp.full_like(params["content_bias"], 0.3)
  params["position_bias"] = jnp.full_like(params["position_bias"], -0.2)
  out = apply({"params": params}, *args)[0]
  x, memory_keys, memory_values, _ = (np.asarray(a, np.float64) for a in args)
  for b in range(_LAYER_BATCH):
    expected = _np_layer(params, x[b], memory_keys[b], memory_values[b],
                         memory_valid[b], start[b])
    np.testing.assert_allclose(out[b], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_shapes_and_dtypes_under_jit_and_vmap_over_seeds(name):
  seeds = 2
  model, init, _, _, unroll = _jitted(name)
  params = jax.tree.map(lambda *xs: jnp.stack(xs),
                        *(init(jax.random.key(s)) for s in range(seeds)))
  state = jax.tree.map(lambda x: jnp.broadcast_to(x, (seeds,) + x.shape),
                       model.initial_state(BATCH))
  obs, start = _observations(9)[:LENGTH], jnp.asarray(_STARTS[:LENGTH])
  vmapped_step = jax.jit(jax.vmap(model.step, in_axes=(0, 0, None, None)))
  vmapped_unroll = jax.jit(jax.vmap(model.unroll, in_axes=(0, 0, None, None)))

  out, new_state = vmapped_step(params, state, obs[0], start[0])
  assert out.logits.shape == (seeds, BATCH, ACTIONS)
  assert out.value.shape == (seeds, BATCH)
  assert out.logits.dtype == out.value.dtype == jnp.float32
  shapes_and_dtypes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype),
                                                tree)
  assert shapes_and_dtypes(new_state) == shapes_and_dtypes(state)
  outs, _ = vmapped_unroll(params, state, obs, start)
  assert outs.logits.shape == (seeds, LENGTH, BATCH, ACTIONS)
  assert outs.value.shape == (seeds, LENGTH, BATCH)
  # vmap over seeds equals a loop over seeds.
  for s in range(seeds):
    single, _ = unroll(jax.tree.map(lambda x: x[s], params),
                       model.initial_state(BATCH), obs, start)
    _assert_outputs_close(jax.tree.map(lambda x: x[s], outs), single)
  # Every state leaf has the batch axis first.
  for leaf in jax.tree.leaves(model.initial_state(BATCH)):
    assert leaf.shape[0] == BATCH


def test_lstm_step_matches_float64_reference():
  _, _, params, step, _ = _jitted("lstm")
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  rng = np.random.default_rng(0)
  cell, hidden = rng.normal(size=(2, BATCH, LSTM_HIDDEN))
  obs = rng.normal(size=(BATCH, OBS))
  start = np.array([False, True, False])
  state = networks.LSTMState(jnp.asarray(cell, jnp.float32),
                             jnp.asarray(hidden, jnp.float32))
  out, state = step(params, state, jnp.asarray(obs, jnp.float32),
                    jnp.asarray(start))
  cell[start], hidden[start] = 0.0, 0.0
  features = np.maximum(obs @ p["encoder"]["dense"]["kernel"]
                        + p["encoder"]["dense"]["bias"], 0)
  gates = (features @ p["input_gates"]["kernel"]
           + hidden @ p["hidden_gates"]["kernel"] + p["hidden_gates"]["bias"])
  i, f, g, o = np.split(gates, 4, axis=-1)
  expected_cell = _np_sigmoid(f) * cell + _np_sigmoid(i) * np.tanh(g)
  expected_hidden = _np_sigmoid(o) * np.tanh(expected_cell)
  heads = p["heads"]
  np.testing.assert_allclose(state.cell, expected_cell, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(state.hidden, expected_hidden, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(
      out.logits, expected_hidden @ heads["policy"]["kernel"]
      + heads["policy"]["bias"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      out.value, expected_hidden @ heads["value"]["kernel"][:, 0]
      + heads["value"]["bias"][0], rtol=1e-5, atol=1e-5)


def _param_shapes(model):
  return jax.eval_shape(model.init, jax.random.key(0))


def test_lstm_param_count_by_hand():
  encoder = OBS * ENCODER + ENCODER
  lstm = 4 * (ENCODER * LSTM_HIDDEN + LSTM_HIDDEN * LSTM_HIDDEN + LSTM_HIDDEN)
  heads = LSTM_HIDDEN * ACTIONS + ACTIONS + LSTM_HIDDEN + 1
  assert networks.param_count(_param_shapes(_lstm())) == (
      encoder + lstm + heads)


def _gtrxl_count_by_hand(policy_head):
  d, f = D_MODEL, MLP
  gate = 3 * d * d + 2 * d * d + d * d + d  # W_{r,z,g}, U_{r,z}, U_g, b_g
  layer = (2 * (2 * d)              # two layer norms
           + 3 * d * d              # query, key, value
           + 2 * d                  # content and position biases u, v
           + d * d                  # position projection W_R
           + d * d + d              # attention output
           + d * f + f + f * d + d  # MLP
           + 2 * gate)
  policy = d * ACTIONS + ACTIONS if policy_head else 0
  return (OBS * ENCODER + ENCODER + ENCODER * d + d + LAYERS * layer + policy
          + d + 1)


@pytest.mark.parametrize("policy_head", [True, False])
def test_gtrxl_param_count_by_hand(policy_head):
  params = _param_shapes(_gtrxl(policy_head=policy_head))
  assert networks.param_count(params) == _gtrxl_count_by_hand(policy_head)


def test_value_only_gtrxl():
  model = _gtrxl(policy_head=False)
  params = _param_shapes(model)
  assert "policy" not in params["params"]["heads"]
  obs, start = _observations(10)[:LENGTH], jnp.asarray(_STARTS[:LENGTH])
  state = model.initial_state(BATCH)
  out, _ = jax.eval_shape(model.unroll, params, state, obs, start)
  assert out.logits is None
  assert out.value.shape == (LENGTH, BATCH) and out.value.dtype == jnp.float32
  step_out, _ = jax.eval_shape(model.step, params, state, obs[0], start[0])
  assert step_out.logits is None and step_out.value.shape == (BATCH,)


@pytest.mark.parametrize("factory,kwargs,name", [
    (_lstm, dict(lstm_hidden=0), "lstm_hidden"),
    (_lstm, dict(encoder_hidden=-1), "encoder_hidden"),
    (_gtrxl, dict(memory_len=0), "memory_len"),
    (_gtrxl, dict(d_model=9, num_heads=2), "d_model"),
    (_gtrxl, dict(d_model=9, num_heads=3), "d_model"),
])
def test_invalid_sizes_name_the_parameter(factory, kwargs, name):
  with pytest.raises(ValueError, match=name):
    factory(**kwargs)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_wrong_observation_size_is_rejected(name):
  model = MODELS[name]()
  with pytest.raises(ValueError, match="obs"):
    jax.eval_shape(model.step, _param_shapes(model), model.initial_state(2),
                   jnp.zeros((2, OBS + 1)), jnp.zeros((2,), bool))


# ----------------------------------------------------------------------------
# GTrXL acting state: ring buffers of M + 1 slots written in place by `step`.

RING_STEPS = 4 * MEMORY + 2  # the ring (M + 1 = 4 slots) wraps three times


def _ring_starts(batch):
  """bool [RING_STEPS, batch]: t=0, then per-env starts at different times,
  most after the ring has wrapped (env 2: consecutive starts and the last
  step)."""
  start = np.zeros((RING_STEPS, batch), bool)
  start[0] = True
  for env, times in enumerate([(5, 11), (), (2, 3, 9, 13)][:batch]):
    start[list(times), env] = True
  return jnp.asarray(start)


def _ring_observations(batch, seed=11):
  return jax.random.normal(jax.random.key(seed), (RING_STEPS, batch, OBS))


def _step_through(step, params, state, obs, start):
  """Steps obs [T, B, O] one by one: (outputs [T, B, ...], final state)."""
  outputs = []
  for t in range(obs.shape[0]):
    out, state = step(params, state, obs[t], start[t])
    outputs.append(out)
  return jax.tree.map(lambda *xs: jnp.stack(xs), *outputs), state


def _assert_states_equal(a, b):
  """Same ring layout: integer leaves equal, float leaves to tolerance."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.shape == y.shape and x.dtype == y.dtype
    if jnp.issubdtype(x.dtype, jnp.integer):
      np.testing.assert_array_equal(x, y)
    else:
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("segments", [(RING_STEPS,), (2, 7, 5)])
def test_gtrxl_ring_step_matches_unroll_beyond_memory(batch, segments):
  """Stepping 14 steps (ring of 4 slots) equals unrolling them in one segment
  or in carried segments longer and shorter than the memory, starts inside
  the ring included; the final states are the same arrays."""
  model, _, params, step, unroll = _jitted("gtrxl")
  obs, start = _ring_observations(batch), _ring_starts(batch)
  initial = model.initial_state(batch)
  stepped, step_state = _step_through(step, params, initial, obs, start)

  unrolled, state, begin = [], initial, 0
  for length in segments:
    out, state = unroll(params, state, obs[begin:begin + length],
                        start[begin:begin + length])
    unrolled.append(out)
    begin += length
  unrolled = jax.tree.map(lambda *xs: jnp.concatenate(xs), *unrolled)
  _assert_outputs_close(unrolled, stepped)
  _assert_states_equal(state, step_state)


@pytest.mark.parametrize("batch", [1, 3])
def test_gtrxl_states_move_between_step_and_unroll(batch):
  """Alternating step runs and unrolls, each from the other's final state
  (acting records a state, the learner re-unrolls from it, and back), gives
  the outputs of stepping throughout."""
  model, _, params, step, unroll = _jitted("gtrxl")
  obs, start = _ring_observations(batch, seed=12), _ring_starts(batch)
  initial = model.initial_state(batch)
  stepped, step_state = _step_through(step, params, initial, obs, start)

  outputs, state, begin = [], initial, 0
  for mode, length in [("step", 3), ("unroll", 5), ("step", 2),
                       ("unroll", 1), ("step", 3)]:
    run = (functools.partial(_step_through, step) if mode == "step"
           else unroll)
    out, state = run(params, state, obs[begin:begin + length],
                     start[begin:begin + length])
    outputs.append(out)
    begin += length
  assert begin == RING_STEPS
  _assert_outputs_close(
      jax.tree.map(lambda *xs: jnp.concatenate(xs), *outputs), stepped)
  _assert_states_equal(state, step_state)


def test_gtrxl_rows_gathered_from_different_times():
  """A state whose rows come from different times (so different ring slots,
  as a replay gathers them) steps and unrolls each row as its source would."""
  model, _, params, step, unroll = _jitted("gtrxl")
  obs, start = _ring_observations(BATCH, seed=13), _ring_starts(BATCH)
  initial = model.initial_state(BATCH)
  _, after_2 = _step_through(step, params, initial, obs[:2], start[:2])
  _, after_7 = _step_through(step, params, initial, obs[:7], start[:7])
  rows = [(after_2, 0), (after_7, 1), (after_7, 2)]
  gathered = jax.tree.map(lambda *xs: jnp.stack(xs),
                          *[jax.tree.map(lambda x, b=b: x[b], s)
                            for s, b in rows])
  assert len(set(np.asarray(gathered.next_slot).tolist())) > 1

  later_obs, later_start = _observations(14)[:7], jnp.asarray(_STARTS[:7])
  stepped, step_state = _step_through(step, params, gathered, later_obs,
                                      later_start)
  unrolled, unroll_state = unroll(params, gathered, later_obs, later_start)
  _assert_outputs_close(unrolled, stepped)
  _assert_states_equal(unroll_state, step_state)
  for b, (source, row) in enumerate(rows):
    alone, _ = unroll(params, source, later_obs, later_start)
    _assert_outputs_close(jax.tree.map(lambda x: x[:, b], stepped),
                          jax.tree.map(lambda x: x[:, row], alone))


def test_gtrxl_step_start_inside_the_ring_cuts_the_past():
  """Stepping: observations before an episode start that comes after the ring
  has wrapped do not change any later output; without a start they do."""
  model, _, params, step, _ = _jitted("gtrxl")
  obs = _ring_observations(2, seed=15)
  start = np.zeros((RING_STEPS, 2), bool)
  start[0] = True
  start[9, 0] = True
  perturbed = obs.at[:9].add(3.0)

  def run(observations):
    return _step_through(step, params, model.initial_state(2), observations,
                         jnp.asarray(start))[0]

  base, moved = run(obs), run(perturbed)
  _assert_outputs_close(jax.tree.map(lambda x: x[9:, 0], base),
                        jax.tree.map(lambda x: x[9:, 0], moved),
                        rtol=0, atol=1e-6)
  assert _max_abs_diff(base.value[9:, 1], moved.value[9:, 1]) > 1e-3


def test_gtrxl_ring_layout():
  """Slots, counters and contents follow the `GTrXLState` docstring: after k
  steps next_slot = k mod (M + 1), length counts the episode's steps up to M,
  and the ring read oldest-first equals the shifted K/V cache of the
  reference form."""
  model, _, params, step, _ = _jitted("gtrxl")
  batch = 3
  obs, start = _ring_observations(batch, seed=16), _ring_starts(batch)
  shift_init, shift_step = _reference_steps()["shift"]
  state, shift_state = model.initial_state(batch), shift_init(batch)
  since_start = np.zeros(batch, int)
  for t in range(RING_STEPS):
    _, state = step(params, state, obs[t], start[t])
    _, shift_state = shift_step(params, shift_state, obs[t], start[t])
    since_start = np.where(start[t], 1, since_start + 1)
    np.testing.assert_array_equal(state.next_slot, (t + 1) % (MEMORY + 1))
    np.testing.assert_array_equal(state.length,
                                  np.minimum(since_start, MEMORY))
  head_dim = D_MODEL // HEADS
  for leaf in jax.tree.leaves((state.keys, state.values)):
    assert leaf.shape == (batch, HEADS, MEMORY + 1, head_dim)
    assert leaf.dtype == jnp.float32
  assert state.next_slot.dtype == state.length.dtype == jnp.int32
  for layer in range(LAYERS):
    for ring, shifted in [(state.keys[layer], shift_state.keys[:, layer]),
                          (state.values[layer], shift_state.values[:, layer])]:
      oldest_first = networks._ring_to_chronological(ring, state.next_slot)
      np.testing.assert_allclose(oldest_first[:, 1:], shifted, rtol=1e-5,
                                 atol=1e-6)
  np.testing.assert_array_equal(
      networks._chronological_valid(state.length, MEMORY), shift_state.valid)


@functools.lru_cache(maxsize=None)
def _reference_steps():
  """{form: (initial_state, jitted step)} of the reference acting forms."""
  forms = networks._gtrxl_reference_steps(
      observation_size=OBS, num_actions=ACTIONS, encoder_hidden=ENCODER,
      num_layers=LAYERS, num_heads=HEADS, d_model=D_MODEL, mlp_width=MLP,
      memory_len=MEMORY)
  return {form: (init, jax.jit(form_step))
          for form, (init, form_step) in forms.items()}


@pytest.mark.parametrize("form", ["shift", "recompute"])
def test_gtrxl_reference_acting_forms_match_ring_step(form):
  """The benchmark's reference forms compute the same outputs as `step`."""
  model, _, params, step, _ = _jitted("gtrxl")
  obs, start = _ring_observations(BATCH, seed=17), _ring_starts(BATCH)
  ring, _ = _step_through(step, params, model.initial_state(BATCH), obs,
                          start)
  init, form_step = _reference_steps()[form]
  other, _ = _step_through(form_step, params, init(BATCH), obs, start)
  _assert_outputs_close(other, ring)


def test_gtrxl_position_score_orders_agree():
  """Both association orders of the position term give the same scores."""
  keys = jax.random.split(jax.random.key(18), 2)
  width, heads, distances = 16, 4, 7
  projected = networks._Projections(
      content_query=None,
      position_query=jax.random.normal(keys[0], (5, 3, heads, width // heads)),
      position_kernel=jax.random.normal(keys[1],
                                        (width, heads, width // heads)),
      keys=None, values=None)
  kernel_first = networks._scores_by_distance(projected, distances, True)
  query_first = networks._scores_by_distance(projected, distances, False)
  assert kernel_first.shape == (5, 3, heads, distances)
  np.testing.assert_allclose(kernel_first, query_first, rtol=1e-5, atol=1e-5)


def _ring_copies(compiled_text, ring_shape):
  shape = "f32[" + ",".join(map(str, ring_shape)) + "]"
  return [line for line in compiled_text.splitlines()
          if " copy(" in line and shape in line]


def test_gtrxl_step_updates_the_ring_in_place():
  """Compiled with the state donated, alone or as the carry of a scan, a step
  copies no ring buffer (the new slot is written before the ring is read)."""
  model, _, params, _, _ = _jitted("gtrxl")
  batch = 5  # a shape no other array of this model has
  ring_shape = (batch, HEADS, MEMORY + 1, D_MODEL // HEADS)
  state = model.initial_state(batch)
  obs, start = jnp.zeros((batch, OBS)), jnp.zeros((batch,), bool)
  donated = jax.jit(model.step, donate_argnums=1).lower(
      params, state, obs, start).compile().as_text()
  assert donated.count("scatter(") >= 2 * LAYERS
  assert not _ring_copies(donated, ring_shape)

  def rollout(params, state, observations):
    def body(state, o):
      out, state = model.step(params, state, o, start)
      return state, out.value
    return jax.lax.scan(body, state, observations)
  scanned = jax.jit(rollout, donate_argnums=1).lower(params, state, jnp.zeros(
      (4, batch, OBS))).compile().as_text()
  assert not _ring_copies(scanned, ring_shape)


def test_bench_acting_forms_table_runs_and_checks_agreement():
  """experiments/bench_networks.py's ring/shift/recompute table, tiny model."""
  from experiments import bench_networks  # pylint: disable=import-outside-toplevel
  gtrxl = dict(observation_size=OBS, num_actions=ACTIONS,
               encoder_hidden=ENCODER, num_layers=LAYERS, num_heads=HEADS,
               d_model=D_MODEL, mlp_width=MLP, memory_len=MEMORY)
  rows = bench_networks.acting_forms_table(
      ["ring", "shift", "recompute"], [2], rounds=2, gtrxl=gtrxl)
  assert rows[0] == ("| batch | ring (ms) | shift (ms) | recompute (ms) | "
                     "shift / ring | recompute / ring |")
  assert len(rows) == 3 and rows[2].startswith("| 2 | ")

"""Recurrent agent networks (LSTM actor, GTrXL learner) as pure functions.

Both models are built with `flax.linen` but exposed only as a `RecurrentModel`
of pure functions of explicit arrays (no hidden state):

    model = make_lstm_model(observation_size=10, num_actions=4,
                            encoder_hidden=64, lstm_hidden=128)
    params = model.init(jax.random.key(0))
    state = model.initial_state(batch_size)
    out, state = model.step(params, state, obs, start)     # obs [B, O]
    out, state = model.unroll(params, state, obs, start)   # obs [T, B, O]

`start[..., b] == True` marks the first observation of a new episode: the state
of env `b` is reset to the initial state *before* that observation is processed,
in both modes. `step` applied T times and one `unroll` of the same T steps give
the same outputs and the same final state (to float32 tolerance), so states
move freely between acting (`step`) and training (`unroll`). Every leaf of a
state has the batch axis first, so states can be gathered by env index and split
across devices.

Observation encoder (both models): Dense(encoder_hidden) -> ReLU. Heads: linear
policy logits [..., A] and a linear scalar value [...].

LSTM actor: encoder -> LSTM(H) (gates i, f, g, o; no peepholes) -> heads.
LSTM state: `LSTMState(cell [B, H], hidden [B, H])`, float32, zeros initially.

GTrXL (Parisotto et al. 2019, "Stabilizing Transformers for RL"): encoder ->
Dense(d_model) embedding -> L layers, each

    y = relu(MHA(LN(x), memory));   x = gate(x, y)
    z = relu(MLP(LN(x)));           x = gate(x, z)

with the GRU-type gate g(x, y) = (1 - z) * x + z * h, where
r = sigmoid(W_r y + U_r x), z = sigmoid(W_z y + U_z x - b_g),
h = tanh(W_g y + U_g (r * x)), and b_g initialised to 2 (each layer starts
close to the identity map). The MLP is Dense(mlp_width) -> ReLU ->
Dense(d_model).

Attention is Transformer-XL attention with relative positions: the score of a
query at time i for a key at time j is

    (q_i + u) . k_j  +  (q_i + v) . (W_R R_{i-j})

with sinusoidal encodings R, learned content bias u and position bias v per
head. Every query attends to itself and to at most the `memory_len` preceding
steps of its own episode (a sliding window: attention never crosses an episode
boundary, and a query always has at least itself to attend to, so no softmax row
is empty). The position term is evaluated as ((q_i + v) W_R^T) . R_{i-j}, so a
step costs O(heads * memory_len * d_model) per layer instead of projecting all
memory_len + 1 encodings (O(memory_len * d_model^2)).

GTrXL state (`GTrXLState`), a shifted buffer whose slot M-1 is the most recent
step (M = memory_len, L = num_layers, H = num_heads, Dh = d_model / H):

    keys:   float32 [B, L, M, H, Dh]  per-layer projected attention keys of the
                                     previous M steps (computed from LN(x) of
                                     that layer's input at those steps).
    values: float32 [B, L, M, H, Dh]  the matching projected values.
    valid:  bool    [B, M]           slot holds a step of the current episode.

Caching projected keys/values (rather than the layer inputs, as the original
Transformer-XL does) makes a `step` cost O(d_model^2) projections of the one new
step plus O(H * M * d_model) attention per layer; the buffer shift is an
O(M * d_model) copy. Consequence for training: at the start of an `unroll` the
cached memory was computed by earlier parameters (those that acted or ran the
previous segment) and is treated as a constant (stop-gradient), as in
Transformer-XL -- here the key/value projections of the memory are also those of
the earlier parameters, not only the layer inputs. Within the unrolled segment,
keys and values come from the current parameters and carry gradients.

Memory reach: layer l at time t attends to layer-l keys/values of times
t-M..t, which were computed from layer-l inputs at those times, which in turn
depend on times down to t-2M through layer l-1, and so on. The output at time t
therefore depends on the observations at times t-L*M..t (within its episode),
and on none older: the exact reach is L * memory_len steps.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional, Tuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PRNGKey = jax.Array
Params = Any  # a pytree of float32 arrays
State = Any   # a pytree of arrays, batch axis first

_MASKED_SCORE = -1e30  # added to the scores of keys a query may not attend to


class AgentOutput(NamedTuple):
  """Outputs of a model, for one step ([B]) or a segment ([T, B]).

  logits: float32 [..., A] policy logits; None for a value-only model.
  value:  float32 [...] state-value estimate.
  """
  logits: Optional[Array]
  value: Array


@dataclasses.dataclass(frozen=True)
class RecurrentModel:
  """A recurrent model as pure functions.

  init:          rng -> params.
  initial_state: batch_size -> state (every leaf [B, ...]).
  step:          (params, state, obs f32 [B, O], start bool [B])
                 -> (AgentOutput [B, ...], new state).
  unroll:        (params, state, obs f32 [T, B, O], start bool [T, B])
                 -> (AgentOutput [T, B, ...], state after the T steps).
  """
  init: Callable[[PRNGKey], Params]
  initial_state: Callable[[int], State]
  step: Callable[[Params, State, Array, Array], Tuple[AgentOutput, State]]
  unroll: Callable[[Params, State, Array, Array], Tuple[AgentOutput, State]]


def param_count(params: Params) -> int:
  """Total number of scalars in a params pytree (all leaves, all axes)."""
  return int(sum(np.prod(np.shape(leaf)) for leaf in jax.tree.leaves(params)))


def _require_positive(**sizes: int) -> None:
  for name, size in sizes.items():
    if not isinstance(size, (int, np.integer)) or size < 1:
      raise ValueError(f"{name}: must be a positive integer (got {size!r})")


def _check_step_inputs(obs: Array, start: Array, observation_size: int) -> None:
  chex.assert_rank(obs, 2)
  chex.assert_shape(start, (obs.shape[0],))
  chex.assert_type(start, bool)
  if obs.shape[-1] != observation_size:
    raise ValueError(f"obs: last axis must be observation_size="
                     f"{observation_size} (got shape {obs.shape})")


def _check_unroll_inputs(obs: Array, start: Array,
                         observation_size: int) -> None:
  chex.assert_rank(obs, 3)
  chex.assert_shape(start, obs.shape[:2])
  chex.assert_type(start, bool)
  if obs.shape[-1] != observation_size:
    raise ValueError(f"obs: last axis must be observation_size="
                     f"{observation_size} (got shape {obs.shape})")


class _Encoder(nn.Module):
  """Observation MLP: [..., O] -> relu(Dense) -> [..., hidden]."""
  hidden: int

  @nn.compact
  def __call__(self, obs: Array) -> Array:
    return nn.relu(nn.Dense(self.hidden, name="dense")(obs))


class _Heads(nn.Module):
  """Linear policy-logit and value heads on features [..., F]."""
  num_actions: int
  policy_head: bool = True

  @nn.compact
  def __call__(self, features: Array) -> AgentOutput:
    logits = (nn.Dense(self.num_actions, name="policy")(features)
              if self.policy_head else None)
    value = nn.Dense(1, name="value")(features)[..., 0]
    return AgentOutput(logits=logits, value=value)


# ----------------------------------------------------------------------------
# LSTM actor.


class LSTMState(NamedTuple):
  """LSTM carry: cell and hidden, float32 [B, lstm_hidden] each."""
  cell: Array
  hidden: Array


class _LSTMNet(nn.Module):
  """Encoder -> LSTM core -> heads; the methods are used one by one.

  The LSTM keeps each of its two kernels fused over the four gates (input,
  forget, cell, output), [E, 4H] and [H, 4H], rather than using
  `nn.OptimizedLSTMCell`, which concatenates its per-gate kernels on every call
  (a copy of all LSTM weights per step that dominates batch-1 acting latency).
  The input half of the gates has no recurrence, so `unroll` computes it for a
  whole segment at once outside the time loop.
  """
  num_actions: int
  encoder_hidden: int
  lstm_hidden: int

  def setup(self):
    self.encoder = _Encoder(self.encoder_hidden)
    self.input_gates = nn.Dense(4 * self.lstm_hidden, use_bias=False)
    self.hidden_gates = nn.Dense(4 * self.lstm_hidden,
                                 kernel_init=nn.initializers.orthogonal())
    self.heads = _Heads(self.num_actions)

  def __call__(self, obs: Array, carry: LSTMState) -> AgentOutput:
    """Touches every parameter once (used by `init`)."""
    carry, hidden = self.core(carry, self.encode(obs))
    return self.head(hidden)

  def encode(self, obs: Array) -> Array:
    """obs [..., O] -> input contribution to the gates [..., 4H]."""
    return self.input_gates(self.encoder(obs))

  def core(self, carry: LSTMState, input_gates: Array
           ) -> Tuple[LSTMState, Array]:
    """One LSTM step on [B, ...]: returns (new carry, hidden output [B, H])."""
    gates = input_gates + self.hidden_gates(carry.hidden)
    input_gate, forget_gate, candidate, output_gate = jnp.split(gates, 4, -1)
    cell = (nn.sigmoid(forget_gate) * carry.cell
            + nn.sigmoid(input_gate) * jnp.tanh(candidate))
    hidden = nn.sigmoid(output_gate) * jnp.tanh(cell)
    return LSTMState(cell, hidden), hidden

  def head(self, hidden: Array) -> AgentOutput:
    return self.heads(hidden)


def _reset_where(start: Array, state: State, initial: State) -> State:
  """Per batch row b: `initial` if start[b] else `state` (leaves [B, ...])."""
  def select(current, fresh):
    mask = start.reshape(start.shape + (1,) * (current.ndim - 1))
    return jnp.where(mask, fresh, current)
  return jax.tree.map(select, state, initial)


def make_lstm_model(observation_size: int, num_actions: int,
                    encoder_hidden: int, lstm_hidden: int) -> RecurrentModel:
  """The LSTM actor: MLP encoder -> LSTM(lstm_hidden) -> logits, value.

  Args:
    observation_size: O, size of the flat float32 observation.
    num_actions: A, number of discrete actions (logits [..., A]).
    encoder_hidden: width of the one hidden ReLU layer of the encoder.
    lstm_hidden: LSTM units H.

  Returns:
    A `RecurrentModel` whose state is `LSTMState(cell [B, H], hidden [B, H])`.

  Raises:
    ValueError: a size is not a positive integer.
  """
  _require_positive(observation_size=observation_size, num_actions=num_actions,
                    encoder_hidden=encoder_hidden, lstm_hidden=lstm_hidden)
  net = _LSTMNet(num_actions=num_actions, encoder_hidden=encoder_hidden,
                 lstm_hidden=lstm_hidden)

  def initial_state(batch_size: int) -> LSTMState:
    _require_positive(batch_size=batch_size)
    # Distinct buffers per leaf, so that a state can be donated to a jit.
    shape = (batch_size, lstm_hidden)
    return LSTMState(cell=jnp.zeros(shape, jnp.float32),
                     hidden=jnp.zeros(shape, jnp.float32))

  def init(rng: PRNGKey) -> Params:
    obs = jnp.zeros((1, observation_size), jnp.float32)
    return net.init(rng, obs, initial_state(1))

  def step(params, state, obs, start):
    _check_step_inputs(obs, start, observation_size)
    chex.assert_shape(state, (obs.shape[0], lstm_hidden))
    state = _reset_where(start, state, initial_state(obs.shape[0]))
    input_gates = net.apply(params, obs, method=_LSTMNet.encode)
    state, hidden = net.apply(params, state, input_gates, method=_LSTMNet.core)
    return net.apply(params, hidden, method=_LSTMNet.head), state

  def unroll(params, state, obs, start):
    _check_unroll_inputs(obs, start, observation_size)
    chex.assert_shape(state, (obs.shape[1], lstm_hidden))
    initial = initial_state(obs.shape[1])
    # The encoder, input gates and heads have no recurrence: run them on all
    # T*B steps at once; only the hidden-to-gates matmul is in the time loop.
    input_gates = net.apply(params, obs, method=_LSTMNet.encode)

    def core_step(carry, inputs):
      input_gates_t, start_t = inputs
      carry = _reset_where(start_t, carry, initial)
      return net.apply(params, carry, input_gates_t, method=_LSTMNet.core)

    state, hiddens = jax.lax.scan(core_step, state, (input_gates, start))
    return net.apply(params, hiddens, method=_LSTMNet.head), state

  return RecurrentModel(init=init, initial_state=initial_state, step=step,
                        unroll=unroll)


# ----------------------------------------------------------------------------
# GTrXL learner.


class GTrXLState(NamedTuple):
  """Per-layer attention memory (see the module docstring).

  keys:   float32 [B, L, M, H, Dh], slot M-1 is the most recent step.
  values: float32 [B, L, M, H, Dh].
  valid:  bool [B, M], slot holds a step of the current episode.
  """
  keys: Array
  values: Array
  valid: Array


def sinusoidal_encodings(num_positions: int, width: int) -> np.ndarray:
  """Transformer(-XL) sinusoidal encodings of distances 0..num_positions-1.

  Args:
    num_positions: number of distances P.
    width: encoding width D (even).

  Returns:
    float32 [P, D]: row d is [sin(d * f_k) for k] ++ [cos(d * f_k) for k] with
    f_k = 10000^(-2k / D), k = 0..D/2-1.
  """
  if width % 2:
    raise ValueError(f"width: must be even (got {width})")
  inverse_frequency = 1.0 / (10000.0 ** (np.arange(0, width, 2) / width))
  angles = np.arange(num_positions)[:, None] * inverse_frequency[None, :]
  return np.concatenate([np.sin(angles), np.cos(angles)], -1).astype(np.float32)


class GRUGate(nn.Module):
  """GRU-type gating layer g(x, y) of GTrXL, on [..., D] arrays.

  `bias_init` is b_g; z = sigmoid(W_z y + U_z x - b_g), so a positive b_g makes
  the gate start close to the identity map g(x, y) ~= x.
  """
  bias_init: float = 2.0

  @nn.compact
  def __call__(self, x: Array, y: Array) -> Array:
    width = x.shape[-1]
    # W_r, W_z, W_g applied to y in one matmul; U_r, U_z to x in another.
    y_r, y_z, y_g = jnp.split(
        nn.Dense(3 * width, use_bias=False, name="w_rzg")(y), 3, axis=-1)
    x_r, x_z = jnp.split(
        nn.Dense(2 * width, use_bias=False, name="u_rz")(x), 2, axis=-1)
    gate_bias = self.param("gate_bias",
                           nn.initializers.constant(self.bias_init), (width,))
    reset = nn.sigmoid(y_r + x_r)
    update = nn.sigmoid(y_z + x_z - gate_bias)
    candidate = jnp.tanh(y_g + nn.Dense(width, use_bias=False, name="u_g")(
        reset * x))
    return (1.0 - update) * x + update * candidate


class GTrXLLayer(nn.Module):
  """One gated Transformer-XL layer over a segment plus cached memory.

  Attributes:
    num_heads: H.
    mlp_width: hidden width of the position-wise MLP.
    gate_bias_init: b_g of both gates.
  """
  num_heads: int
  mlp_width: int
  gate_bias_init: float = 2.0

  @nn.compact
  def __call__(self, x: Array, memory_keys: Array, memory_values: Array,
               attend: Array) -> Tuple[Array, Array, Array]:
    """Runs the layer on a segment of T new steps.

    Query i (0-based within the segment) sits at absolute position M + i of the
    key sequence [memory (M), segment (T)] and may attend to keys at distances
    0..M from it; `attend` says which of those are in its episode.

    Args:
      x: float32 [B, T, D] layer inputs of the segment.
      memory_keys: float32 [B, M, H, Dh] cached keys of the M previous steps.
      memory_values: float32 [B, M, H, Dh] cached values.
      attend: bool [B, T, M + T], query i may attend to key j. Must be False
        outside the window 0 <= (M + i) - j <= M and True at j = M + i.

    Returns:
      (layer outputs float32 [B, T, D], keys and values of the segment float32
      [B, T, H, Dh] each, to be cached).
    """
    batch, length, width = x.shape
    memory_len = memory_keys.shape[1]
    head_dim = width // self.num_heads
    chex.assert_shape([memory_keys, memory_values],
                      (batch, memory_len, self.num_heads, head_dim))
    chex.assert_shape(attend, (batch, length, memory_len + length))
    heads = (self.num_heads, head_dim)

    normed = nn.LayerNorm(name="attention_norm")(x)
    query = nn.DenseGeneral(heads, use_bias=False, name="query")(normed)
    new_keys = nn.DenseGeneral(heads, use_bias=False, name="key")(normed)
    new_values = nn.DenseGeneral(heads, use_bias=False, name="value")(normed)
    content_bias = self.param("content_bias", nn.initializers.zeros, heads)
    position_bias = self.param("position_bias", nn.initializers.zeros, heads)
    # W_R: maps a D-wide encoding to per-head position keys, kernel [D, H, Dh].
    position_kernel = self.param(
        "position_kernel", nn.initializers.lecun_normal(), (width,) + heads)

    keys = jnp.concatenate([memory_keys, new_keys], axis=1)
    values = jnp.concatenate([memory_values, new_values], axis=1)
    content_scores = jnp.einsum("bthd,bshd->bhts", query + content_bias, keys)
    # ((q + v) W_R^T) . R_d for each distance d in 0..M, then placed per key.
    encodings = jnp.asarray(sinusoidal_encodings(memory_len + 1, width))
    query_in_encoding_space = jnp.einsum(
        "bthd,ehd->bthe", query + position_bias, position_kernel)
    scores_by_distance = jnp.einsum("bthe,ne->bhtn", query_in_encoding_space,
                                    encodings)
    distance = (memory_len + np.arange(length)[:, None]
                - np.arange(memory_len + length)[None, :])
    distance = np.clip(distance, 0, memory_len)  # outside: masked below
    position_scores = jnp.take_along_axis(
        scores_by_distance, jnp.asarray(distance)[None, None], axis=-1)
    scores = (content_scores + position_scores) / math.sqrt(head_dim)
    scores = jnp.where(attend[:, None], scores, _MASKED_SCORE)
    weights = jax.nn.softmax(scores, axis=-1)
    attended = jnp.einsum("bhts,bshd->bthd", weights, values)
    attention_out = nn.DenseGeneral(width, axis=(-2, -1), name="attention_out")(
        attended)
    x = GRUGate(self.gate_bias_init, name="attention_gate")(
        x, nn.relu(attention_out))

    mlp_in = nn.LayerNorm(name="mlp_norm")(x)
    mlp_hidden = nn.relu(nn.Dense(self.mlp_width, name="mlp_hidden")(mlp_in))
    mlp_out = nn.Dense(width, name="mlp_out")(mlp_hidden)
    x = GRUGate(self.gate_bias_init, name="mlp_gate")(x, nn.relu(mlp_out))
    return x, new_keys, new_values


class _GTrXLNet(nn.Module):
  """Encoder -> embedding -> L GTrXL layers -> heads on [B, T, ...] segments."""
  num_actions: int
  encoder_hidden: int
  num_layers: int
  num_heads: int
  d_model: int
  mlp_width: int
  policy_head: bool
  gate_bias_init: float

  @nn.compact
  def __call__(self, obs: Array, memory: GTrXLState, attend: Array
               ) -> Tuple[AgentOutput, Array, Array]:
    """Runs a segment.

    Args:
      obs: float32 [B, T, O].
      memory: the state before the segment (already reset where needed; only
        keys and values are read here).
      attend: bool [B, T, M + T], see `GTrXLLayer`.

    Returns:
      (outputs [B, T, ...], keys and values of the segment float32
      [B, L, T, H, Dh] each).
    """
    x = _Encoder(self.encoder_hidden, name="encoder")(obs)
    x = nn.Dense(self.d_model, name="embedding")(x)
    segment_keys, segment_values = [], []
    for layer in range(self.num_layers):
      x, keys, values = GTrXLLayer(
          self.num_heads, self.mlp_width, self.gate_bias_init,
          name=f"layer_{layer}")(x, memory.keys[:, layer],
                                 memory.values[:, layer], attend)
      segment_keys.append(keys)
      segment_values.append(values)
    outputs = _Heads(self.num_actions, self.policy_head, name="heads")(x)
    return (outputs, jnp.stack(segment_keys, axis=1),
            jnp.stack(segment_values, axis=1))


def _segment_attention_mask(memory_valid: Array, start: Array) -> Array:
  """Which keys each query of a segment may attend to.

  Args:
    memory_valid: bool [B, M], memory slot holds a step of the episode that is
      current at the start of the segment (before any start in it).
    start: bool [B, T], episode starts within the segment.

  Returns:
    bool [B, T, M + T]: query i may attend to key j of [memory, segment] iff j
    is within distance 0..M behind it and in the same episode. Always True at
    j = M + i (a step attends to itself).
  """
  memory_len = memory_valid.shape[1]
  length = start.shape[1]
  # Episode index of each segment step: number of starts up to and including it.
  # Memory steps belong to episode 0 if still valid, else to no episode (-1).
  segment_episode = jnp.cumsum(start.astype(jnp.int32), axis=1)
  memory_episode = jnp.where(memory_valid, 0, -1)
  key_episode = jnp.concatenate([memory_episode, segment_episode], axis=1)
  same_episode = segment_episode[:, :, None] == key_episode[:, None, :]
  distance = (memory_len + np.arange(length)[:, None]
              - np.arange(memory_len + length)[None, :])
  in_window = (distance >= 0) & (distance <= memory_len)
  return same_episode & jnp.asarray(in_window)[None]


def make_gtrxl_model(observation_size: int, num_actions: int,
                     encoder_hidden: int, num_layers: int, num_heads: int,
                     d_model: int, mlp_width: int, memory_len: int,
                     policy_head: bool = True, *,
                     gate_bias_init: float = 2.0) -> RecurrentModel:
  """The GTrXL learner (see the module docstring for layers and state).

  Args:
    observation_size: O, size of the flat float32 observation.
    num_actions: A, number of discrete actions (logits [..., A]).
    encoder_hidden: width of the one hidden ReLU layer of the encoder.
    num_layers: L gated Transformer-XL layers.
    num_heads: H attention heads; must divide d_model.
    d_model: D, model width (even, for the sinusoidal encodings).
    mlp_width: hidden width of each layer's position-wise MLP.
    memory_len: M, cached steps per layer; the output depends on the last
      L * M observations of the episode (the exact reach).
    policy_head: False gives a value-only critic (logits None, no policy
      parameters).
    gate_bias_init: initial b_g of every GRU gate (2 in GTrXL).

  Returns:
    A `RecurrentModel` whose state is a `GTrXLState`.

  Raises:
    ValueError: a size is not a positive integer, d_model is odd or not
      divisible by num_heads.
  """
  _require_positive(observation_size=observation_size, num_actions=num_actions,
                    encoder_hidden=encoder_hidden, num_layers=num_layers,
                    num_heads=num_heads, d_model=d_model, mlp_width=mlp_width,
                    memory_len=memory_len)
  if d_model % num_heads:
    raise ValueError(f"d_model: must be divisible by num_heads={num_heads} "
                     f"(got {d_model})")
  if d_model % 2:
    raise ValueError(f"d_model: must be even (got {d_model})")
  head_dim = d_model // num_heads
  net = _GTrXLNet(num_actions=num_actions, encoder_hidden=encoder_hidden,
                  num_layers=num_layers, num_heads=num_heads, d_model=d_model,
                  mlp_width=mlp_width, policy_head=policy_head,
                  gate_bias_init=float(gate_bias_init))
  memory_shape = (num_layers, memory_len, num_heads, head_dim)

  def initial_state(batch_size: int) -> GTrXLState:
    _require_positive(batch_size=batch_size)
    # Distinct buffers per leaf, so that a state can be donated to a jit.
    shape = (batch_size,) + memory_shape
    return GTrXLState(keys=jnp.zeros(shape, jnp.float32),
                      values=jnp.zeros(shape, jnp.float32),
                      valid=jnp.zeros((batch_size, memory_len), bool))

  def init(rng: PRNGKey) -> Params:
    obs = jnp.zeros((1, 1, observation_size), jnp.float32)
    attend = jnp.ones((1, 1, memory_len + 1), bool)
    return net.init(rng, obs, initial_state(1), attend)

  def check_state(state: GTrXLState, batch_size: int) -> None:
    chex.assert_shape([state.keys, state.values], (batch_size,) + memory_shape)
    chex.assert_shape(state.valid, (batch_size, memory_len))

  def run_segment(params, state, obs, start):
    """obs [B, T, O], start [B, T] -> (outputs [B, T, ...], new state)."""
    length = obs.shape[1]
    memory = GTrXLState(jax.lax.stop_gradient(state.keys),
                        jax.lax.stop_gradient(state.values), state.valid)
    attend = _segment_attention_mask(memory.valid, start)
    outputs, keys, values = net.apply(params, obs, memory, attend)
    # Validity w.r.t. the episode current after the segment; keep the last M.
    episode_at_end = attend[:, -1, :]
    all_keys = jnp.concatenate([memory.keys, keys], axis=2)
    all_values = jnp.concatenate([memory.values, values], axis=2)
    new_state = GTrXLState(keys=all_keys[:, :, length:],
                           values=all_values[:, :, length:],
                           valid=episode_at_end[:, length:])
    return outputs, new_state

  def step(params, state, obs, start):
    _check_step_inputs(obs, start, observation_size)
    check_state(state, obs.shape[0])
    outputs, state = run_segment(params, state, obs[:, None], start[:, None])
    return jax.tree.map(lambda x: x[:, 0], outputs), state

  def unroll(params, state, obs, start):
    _check_unroll_inputs(obs, start, observation_size)
    check_state(state, obs.shape[1])
    outputs, state = run_segment(params, state, jnp.swapaxes(obs, 0, 1),
                                 jnp.swapaxes(start, 0, 1))
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), outputs), state

  return RecurrentModel(init=init, initial_state=initial_state, step=step,
                        unroll=unroll)

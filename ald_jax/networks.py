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
is empty). The position term is evaluated as ((q_i + v) W_R^T) . R_{i-j} (or,
when acting at a batch of more than a few dozen, as (q_i + v) . (W_R R_{i-j})
with W_R R^T formed once per step, whichever costs fewer multiply-adds), never
by projecting memory_len + 1 encodings per query (O(memory_len * d_model^2)).

GTrXL state (`GTrXLState`): per layer, ring buffers of the projected keys and
values (computed from LN(x) of that layer's input) of the last M steps, with
S = M + 1 slots (M = memory_len, L = num_layers, H = num_heads,
Dh = d_model / H):

    keys:      L x float32 [B, H, S, Dh]  slot s holds the step
                                          ((next_slot - 1 - s) mod S) + 1
                                          steps before the next one (S: out
                                          of reach, the slot it will write).
    values:    L x float32 [B, H, S, Dh]  the matching values.
    next_slot: int32 [B]                  the slot the next step writes.
    length:    int32 [B]                  steps of the current episode in the
                                          memory, 0..M.

`step` writes the new key/value into `next_slot` (a scatter of H * Dh numbers
per env, in place when the state is donated to its jit or carried by a scan),
then attends over the whole ring, with the distance of every slot computed from
`next_slot` and its episode membership from `length`; the extra slot is the
one written, so writing never evicts a step the query still sees (writing
before reading is what lets XLA update the buffer in place; a read of the old
buffer after the write would force a copy of it). Heads lead the slot axis so
that both attention products read the ring where it lies, with no transpose.
A step thus costs O(d_model^2) projections of the one new step plus
O(H * M * Dh) attention per layer, and copies no memory. `unroll` reads the
rings oldest first, runs the segment, and writes the last S steps back in the
layout that the same steps of `step` leave (same `next_slot`, same arrays), so
states move freely between the modes and across gathered env rows (each row has
its own `next_slot`).

Caching projected keys/values (rather than the layer inputs, as the original
Transformer-XL does) saves re-projecting the memory every step. Consequence for
training: at the start of an `unroll` the cached memory was computed by earlier
parameters (those that acted or ran the previous segment) and is treated as a
constant (stop-gradient), as in Transformer-XL -- here the key/value
projections of the memory are also those of the earlier parameters, not only
the layer inputs. Within the unrolled segment, keys and values come from the
current parameters and carry gradients.

Memory reach: layer l at time t attends to layer-l keys/values of times
t-M..t, which were computed from layer-l inputs at those times, which in turn
depend on times down to t-2M through layer l-1, and so on. The output at time t
therefore depends on the observations at times t-L*M..t (within its episode),
and on none older: the exact reach is L * memory_len steps.
"""
from __future__ import annotations

import dataclasses
import math
from typing import (Any, Callable, Dict, List, NamedTuple, Optional, Sequence,
                    Tuple)

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
  """Per-layer attention memory of the last M steps, as ring buffers.

  Each ring has S = M + 1 slots: the M steps a next step may attend to, and
  the slot it will write before attending (see `GTrXLLayer.step`).

  keys:      tuple of L float32 [B, H, S, Dh], layer l's projected keys. Slot
             s holds the step ((next_slot - 1 - s) mod S) + 1 steps before the
             next one (1 at next_slot - 1; S, out of reach, at next_slot).
  values:    tuple of L float32 [B, H, S, Dh], the matching values.
  next_slot: int32 [B] in [0, S), the slot the next step writes.
  length:    int32 [B] in [0, M], how many of the most recent memory steps are
             in the current episode (0: nothing to attend to but itself).
  """
  keys: Tuple[Array, ...]
  values: Tuple[Array, ...]
  next_slot: Array
  length: Array


def _ring_distances(slot: Array, ring_size: int) -> Array:
  """int32 [B, S]: steps from the step in `slot` [B] back to each slot's step.

  0 at `slot` itself, S - 1 = M at slot + 1 (mod S), the oldest.
  """
  distance = slot[:, None] - jnp.arange(ring_size, dtype=jnp.int32)[None]
  # A select, not jnp.mod: jax2onnx cannot export a remainder over a
  # symbolic batch.
  return jnp.where(distance < 0, distance + ring_size, distance)


def _ring_next(slot: Array, ring_size: int) -> Array:
  """The slot after `slot` int32 [B] (mod S, without a remainder op)."""
  return jnp.where(slot + 1 == ring_size, 0, slot + 1).astype(jnp.int32)


def _ring_write(ring: Array, slot: Array, new: Array) -> Array:
  """ring [B, H, S, Dh] with ring[b, :, slot[b]] = new[b] ([B, H, Dh]).

  A scatter of B * H * Dh elements: in place when the ring is donated (or a
  loop carry) and nothing reads the old ring after it, so a step does not copy
  the cache.
  """
  # An iota, not jnp.arange(B): jax2onnx exports it over a symbolic batch.
  rows = jax.lax.broadcasted_iota(jnp.int32, slot.shape, 0)
  return ring.at[rows, :, slot].set(new, indices_are_sorted=True,
                                    unique_indices=True)


def _ring_to_chronological(ring: Array, next_slot: Array) -> Array:
  """ring [B, H, S, Dh] -> [B, S, H, Dh], oldest first (row j: S - j back)."""
  ring_size = ring.shape[2]
  slots = jnp.mod(next_slot[:, None] + jnp.arange(ring_size)[None], ring_size)
  return jnp.swapaxes(
      jnp.take_along_axis(ring, slots[:, None, :, None], axis=2), 1, 2)


def _chronological_to_ring(memory: Array, next_slot: Array) -> Array:
  """Inverse of `_ring_to_chronological`: [B, S, H, Dh] -> [B, H, S, Dh]."""
  ring_size = memory.shape[1]
  rows = jnp.mod(jnp.arange(ring_size)[None] - next_slot[:, None], ring_size)
  return jnp.take_along_axis(jnp.swapaxes(memory, 1, 2),
                             rows[:, None, :, None], axis=2)


def _chronological_valid(length: Array, memory_len: int) -> Array:
  """bool [B, M]: row j (M - j steps back) is in the current episode."""
  return jnp.arange(memory_len)[None] >= memory_len - length[:, None]


def _length_after(length: Array, start: Array, memory_len: int) -> Array:
  """`GTrXLState.length` after a segment with starts bool [B, T]: int32 [B]."""
  steps = start.shape[1]
  last_start = jnp.max(jnp.where(start, jnp.arange(steps), -1), axis=1)
  since_start = jnp.where(last_start >= 0, steps - last_start, length + steps)
  return jnp.minimum(since_start, memory_len).astype(jnp.int32)


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



class _Projections(NamedTuple):
  """Per-head projections of one layer's inputs, [...] = [B, T] or [B].

  content_query:   float32 [..., H, Dh], q + u.
  position_query:  float32 [..., H, Dh], q + v.
  position_kernel: float32 [D, H, Dh], W_R (the layer's parameter).
  keys, values:    float32 [..., H, Dh] of the new steps.
  """
  content_query: Array
  position_query: Array
  position_kernel: Array
  keys: Array
  values: Array


def _scores_by_distance(projected: _Projections, num_distances: int,
                        kernel_first: Optional[bool] = None) -> Array:
  """Position terms (q + v) . (W_R R_d) for d = 0..N-1: float32 [..., H, N].

  Two association orders of one product: ((q + v) W_R^T) R^T costs
  Q * D * (D + H * N) multiply-adds for Q queries, (W_R R^T) first costs
  D * N * (D + Q). `kernel_first=None` takes the cheaper (the kernel first
  from a few dozen queries on, e.g. acting at batch 256).
  """
  kernel = projected.position_kernel
  width, heads, _ = kernel.shape
  encodings = jnp.asarray(sinusoidal_encodings(num_distances, width))
  if kernel_first is None:
    queries = math.prod(projected.position_query.shape[:-2])
    # A symbolic batch (ONNX export) has no size to compare: query first.
    kernel_first = isinstance(queries, int) and (
        width * num_distances * (width + queries)
        < queries * width * (width + heads * num_distances))
  if kernel_first:
    kernel_by_distance = jnp.einsum("ehd,ne->hdn", kernel, encodings)
    return jnp.einsum("...hd,hdn->...hn", projected.position_query,
                      kernel_by_distance)
  query_in_encoding_space = jnp.einsum("...hd,ehd->...he",
                                       projected.position_query, kernel)
  return jnp.einsum("...he,ne->...hn", query_in_encoding_space, encodings)


def _segment_attention(projected: _Projections, memory_keys: Array,
                       memory_values: Array, attend: Array) -> Array:
  """Attention of a segment's T queries over [memory (M), segment (T)].

  Args:
    projected: projections of the segment, [B, T, ...].
    memory_keys, memory_values: float32 [B, M, H, Dh], oldest first.
    attend: bool [B, T, M + T], see `GTrXLLayer.__call__`.

  Returns:
    float32 [B, T, H, Dh].
  """
  length = projected.keys.shape[1]
  memory_len, head_dim = memory_keys.shape[1], memory_keys.shape[-1]
  keys = jnp.concatenate([memory_keys, projected.keys], axis=1)
  values = jnp.concatenate([memory_values, projected.values], axis=1)
  content_scores = jnp.einsum("bthd,bshd->bhts", projected.content_query, keys)
  # ((q + v) W_R^T) . R_d for each distance d in 0..M, then placed per key.
  # (Training keeps this order of the product; acting picks it by cost.)
  scores_by_distance = jnp.swapaxes(
      _scores_by_distance(projected, memory_len + 1, kernel_first=False), 1, 2)
  distance = (memory_len + np.arange(length)[:, None]
              - np.arange(memory_len + length)[None, :])
  distance = np.clip(distance, 0, memory_len)  # outside: masked below
  position_scores = jnp.take_along_axis(
      scores_by_distance, jnp.asarray(distance)[None, None], axis=-1)
  scores = (content_scores + position_scores) / math.sqrt(head_dim)
  scores = jnp.where(attend[:, None], scores, _MASKED_SCORE)
  weights = jax.nn.softmax(scores, axis=-1)
  return jnp.einsum("bhts,bshd->bthd", weights, values)


def _ring_attention(projected: _Projections, ring_keys: Array,
                    ring_values: Array, distance: Array,
                    attend: Array) -> Array:
  """Attention of one step's query over its ring (which already holds it).

  The ring is read where it lies ([B, H, S, Dh]: heads lead, so both einsums
  are batched matrix-vector products with no transpose of the cache).

  Args:
    projected: projections of the step, [B, ...].
    ring_keys, ring_values: float32 [B, H, S, Dh].
    distance: int32 [B, S], steps from the query back to each slot (0..M).
    attend: bool [B, S], the query may attend to the slot.

  Returns:
    float32 [B, H, Dh].
  """
  ring_size, head_dim = ring_keys.shape[2], ring_keys.shape[-1]
  scores_by_distance = _scores_by_distance(projected, ring_size)  # [B, H, S]
  content_scores = jnp.einsum("bhd,bhsd->bhs", projected.content_query,
                              ring_keys)
  position_scores = jnp.take_along_axis(scores_by_distance, distance[:, None],
                                        axis=-1)
  scores = (content_scores + position_scores) / math.sqrt(head_dim)
  scores = jnp.where(attend[:, None], scores, _MASKED_SCORE)
  weights = jax.nn.softmax(scores, axis=-1)
  return jnp.einsum("bhs,bhsd->bhd", weights, ring_values)


class GTrXLLayer(nn.Module):
  """One gated Transformer-XL layer, over a segment or one acting step.

  `__call__` runs a segment against a chronological memory (training);
  `step` runs one step against ring buffers (acting); `recompute_step`
  (reference, benchmarks/tests) re-projects the memory's keys and values from
  cached layer inputs. All share the parameters created by `block`.

  Attributes:
    num_heads: H.
    mlp_width: hidden width of the position-wise MLP.
    gate_bias_init: b_g of both gates.
  """
  num_heads: int
  mlp_width: int
  gate_bias_init: float = 2.0

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
    chex.assert_shape([memory_keys, memory_values],
                      (batch, memory_len, self.num_heads,
                       width // self.num_heads))
    chex.assert_shape(attend, (batch, length, memory_len + length))
    x, keys, values, _ = self.block(x, lambda projected, project: (
        _segment_attention(projected, memory_keys, memory_values, attend),
        None))
    return x, keys, values

  def step(self, x: Array, ring_keys: Array, ring_values: Array,
           slot: Array, distance: Array, attend: Array
           ) -> Tuple[Array, Array, Array]:
    """Runs the layer on one step against its ring memory.

    The step's key and value are written to the ring *before* attending over
    all of it: XLA updates a buffer in place only if nothing reads its old
    contents afterwards (a read of the old ring forces a copy of it). Hence S
    = M + 1 slots: writing must not evict a step the query still sees.

    Args:
      x: float32 [B, D] layer inputs.
      ring_keys, ring_values: float32 [B, H, S, Dh] (see `GTrXLState`).
      slot: int32 [B], the slot this step writes (`GTrXLState.next_slot`).
      distance: int32 [B, S], steps from this step back to each slot (0..M).
      attend: bool [B, S], slot is in this step's episode.

    Returns:
      (layer outputs float32 [B, D], updated ring keys and values
      [B, H, S, Dh]).
    """
    batch, width = x.shape
    ring_size = ring_keys.shape[2]
    chex.assert_shape([ring_keys, ring_values],
                      (batch, self.num_heads, ring_size,
                       width // self.num_heads))
    chex.assert_shape([distance, attend], (batch, ring_size))
    chex.assert_shape(slot, (batch,))

    def attention(projected, project):
      del project
      projected = projected._replace(**{  # [B, 1, ...] -> [B, ...]
          name: getattr(projected, name)[:, 0] for name in (
              "content_query", "position_query", "keys", "values")})
      rings = (_ring_write(ring_keys, slot, projected.keys),
               _ring_write(ring_values, slot, projected.values))
      attended = _ring_attention(projected, *rings, distance, attend)
      return attended[:, None], rings
    # A segment of one step ([B, 1, D]): the layers see the input shapes of
    # `unroll`, which jax2onnx's flax plugins convert with a symbolic batch.
    x, _, _, (keys, values) = self.block(x[:, None], attention)
    return x[:, 0], keys, values

  def recompute_step(self, x: Array, memory_inputs: Array,
                     attend: Array) -> Array:
    """Reference step: memory keys/values re-projected from layer inputs.

    Args:
      x: float32 [B, D] layer inputs.
      memory_inputs: float32 [B, M, D] this layer's inputs at the M previous
        steps, oldest first.
      attend: bool [B, 1, M + 1], see `__call__`.

    Returns:
      float32 [B, D] layer outputs.
    """
    def attention(projected, project):
      memory_keys, memory_values = project(memory_inputs)
      return _segment_attention(projected, memory_keys, memory_values,
                                attend), None
    return self.block(x[:, None], attention)[0][:, 0]

  @nn.compact
  def block(self, x: Array, attention: Callable[..., Tuple[Array, Any]]
            ) -> Tuple[Array, Array, Array, Any]:
    """The layer around an attention function.

    Args:
      x: float32 [..., D] layer inputs.
      attention: (projections of x, project) -> (attended float32
        [..., H, Dh], aux), where project(inputs [..., D]) gives the keys and
        values of other layer inputs.

    Returns:
      (layer outputs [..., D], keys and values of x [..., H, Dh], aux).
    """
    width = x.shape[-1]
    heads = (self.num_heads, width // self.num_heads)
    attention_norm = nn.LayerNorm(name="attention_norm")
    key_projection = nn.DenseGeneral(heads, use_bias=False, name="key")
    value_projection = nn.DenseGeneral(heads, use_bias=False, name="value")

    def project(inputs):
      normed = attention_norm(inputs)
      return key_projection(normed), value_projection(normed)

    normed = attention_norm(x)
    query = nn.DenseGeneral(heads, use_bias=False, name="query")(normed)
    keys, values = key_projection(normed), value_projection(normed)
    content_bias = self.param("content_bias", nn.initializers.zeros, heads)
    position_bias = self.param("position_bias", nn.initializers.zeros, heads)
    # W_R: maps a D-wide encoding to per-head position keys, kernel [D, H, Dh].
    position_kernel = self.param(
        "position_kernel", nn.initializers.lecun_normal(), (width,) + heads)
    projected = _Projections(
        content_query=query + content_bias,
        position_query=query + position_bias,
        position_kernel=position_kernel, keys=keys, values=values)
    attended, aux = attention(projected, project)
    attention_out = nn.DenseGeneral(width, axis=(-2, -1), name="attention_out")(
        attended)
    x = GRUGate(self.gate_bias_init, name="attention_gate")(
        x, nn.relu(attention_out))

    mlp_in = nn.LayerNorm(name="mlp_norm")(x)
    mlp_hidden = nn.relu(nn.Dense(self.mlp_width, name="mlp_hidden")(mlp_in))
    mlp_out = nn.Dense(width, name="mlp_out")(mlp_hidden)
    x = GRUGate(self.gate_bias_init, name="mlp_gate")(x, nn.relu(mlp_out))
    return x, keys, values, aux


class _GTrXLNet(nn.Module):
  """Encoder -> embedding -> L GTrXL layers -> heads; one method per mode."""
  num_actions: int
  encoder_hidden: int
  num_layers: int
  num_heads: int
  d_model: int
  mlp_width: int
  policy_head: bool
  gate_bias_init: float

  def setup(self):
    self.encoder = _Encoder(self.encoder_hidden)
    self.embedding = nn.Dense(self.d_model)
    self.layers = [GTrXLLayer(self.num_heads, self.mlp_width,
                              self.gate_bias_init, name=f"layer_{layer}")
                   for layer in range(self.num_layers)]
    self.heads = _Heads(self.num_actions, self.policy_head)

  def __call__(self, obs: Array, memory_keys: Sequence[Array],
               memory_values: Sequence[Array], attend: Array
               ) -> Tuple[AgentOutput, List[Array], List[Array]]:
    """Runs a segment.

    Args:
      obs: float32 [B, T, O].
      memory_keys, memory_values: L arrays float32 [B, M, H, Dh], oldest first.
      attend: bool [B, T, M + T], see `GTrXLLayer.__call__`.

    Returns:
      (outputs [B, T, ...], L keys and L values of the segment, float32
      [B, T, H, Dh] each).
    """
    x = self.embedding(self.encoder(obs))
    segment_keys, segment_values = [], []
    for layer, keys, values in zip(self.layers, memory_keys, memory_values):
      x, keys, values = layer(x, keys, values, attend)
      segment_keys.append(keys)
      segment_values.append(values)
    return self.heads(x), segment_keys, segment_values

  def step(self, obs: Array, ring_keys: Sequence[Array],
           ring_values: Sequence[Array], slot: Array, distance: Array,
           attend: Array) -> Tuple[AgentOutput, List[Array], List[Array]]:
    """One step: obs float32 [B, O], rings as in `GTrXLState`, slot [B],
    distance and attend [B, S] (see `GTrXLLayer.step`) -> (outputs [B, ...],
    L updated key rings and L value rings)."""
    x = self.embedding(self.encoder(obs))
    new_keys, new_values = [], []
    for layer, keys, values in zip(self.layers, ring_keys, ring_values):
      x, keys, values = layer.step(x, keys, values, slot, distance, attend)
      new_keys.append(keys)
      new_values.append(values)
    return self.heads(x), new_keys, new_values

  def recompute_step(self, obs: Array, memory_inputs: Array, attend: Array
                     ) -> Tuple[AgentOutput, Array]:
    """Reference step: obs [B, O], memory_inputs float32 [B, L, M, D] (oldest
    first), attend bool [B, 1, M + 1] -> (outputs [B, ...], this step's layer
    inputs float32 [B, L, D])."""
    x = self.embedding(self.encoder(obs))
    inputs = []
    for index, layer in enumerate(self.layers):
      inputs.append(x)
      x = layer.recompute_step(x, memory_inputs[:, index], attend)
    return self.heads(x), jnp.stack(inputs, axis=1)


def _segment_attention_mask(memory_valid: Array, start: Array) -> Array:
  """Which keys each query of a segment may attend to.

  Args:
    memory_valid: bool [B, M], memory row (oldest first) holds a step of the
      episode that is current at the start of the segment (before any start
      in it).
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


def _gtrxl_net(observation_size: int, num_actions: int, encoder_hidden: int,
               num_layers: int, num_heads: int, d_model: int, mlp_width: int,
               memory_len: int, policy_head: bool, gate_bias_init: float
               ) -> _GTrXLNet:
  """Validates the GTrXL sizes (ValueError naming the size) and builds it."""
  _require_positive(observation_size=observation_size, num_actions=num_actions,
                    encoder_hidden=encoder_hidden, num_layers=num_layers,
                    num_heads=num_heads, d_model=d_model, mlp_width=mlp_width,
                    memory_len=memory_len)
  if d_model % num_heads:
    raise ValueError(f"d_model: must be divisible by num_heads={num_heads} "
                     f"(got {d_model})")
  if d_model % 2:
    raise ValueError(f"d_model: must be even (got {d_model})")
  return _GTrXLNet(num_actions=num_actions, encoder_hidden=encoder_hidden,
                   num_layers=num_layers, num_heads=num_heads, d_model=d_model,
                   mlp_width=mlp_width, policy_head=policy_head,
                   gate_bias_init=float(gate_bias_init))


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
    A `RecurrentModel` whose state is a `GTrXLState`. Its `step` writes the
    state's ring buffers in place when the state is donated to the jit that
    calls it (`jax.jit(model.step, donate_argnums=1)`) or carried by a loop.

  Raises:
    ValueError: a size is not a positive integer, d_model is odd or not
      divisible by num_heads.
  """
  net = _gtrxl_net(observation_size, num_actions, encoder_hidden, num_layers,
                   num_heads, d_model, mlp_width, memory_len, policy_head,
                   gate_bias_init)
  ring_size = memory_len + 1
  ring_shape = (num_heads, ring_size, d_model // num_heads)

  def initial_state(batch_size: int) -> GTrXLState:
    _require_positive(batch_size=batch_size)
    # Distinct buffers per leaf, so that a state can be donated to a jit.
    def zeros():
      return jnp.zeros((batch_size,) + ring_shape, jnp.float32)
    return GTrXLState(keys=tuple(zeros() for _ in range(num_layers)),
                      values=tuple(zeros() for _ in range(num_layers)),
                      next_slot=jnp.zeros((batch_size,), jnp.int32),
                      length=jnp.zeros((batch_size,), jnp.int32))

  def init(rng: PRNGKey) -> Params:
    obs = jnp.zeros((1, 1, observation_size), jnp.float32)
    memory = [jnp.zeros((1, memory_len, num_heads, d_model // num_heads),
                        jnp.float32)] * num_layers
    attend = jnp.ones((1, 1, memory_len + 1), bool)
    return net.init(rng, obs, memory, memory, attend)

  def check_state(state: GTrXLState, batch_size: int) -> None:
    if len(state.keys) != num_layers or len(state.values) != num_layers:
      raise ValueError(f"state: keys and values must hold num_layers="
                       f"{num_layers} rings (got {len(state.keys)}, "
                       f"{len(state.values)})")
    chex.assert_shape(list(state.keys) + list(state.values),
                      (batch_size,) + ring_shape)
    chex.assert_shape([state.next_slot, state.length], (batch_size,))
    chex.assert_type([state.next_slot, state.length], jnp.int32)

  def step(params, state, obs, start):
    _check_step_inputs(obs, start, observation_size)
    check_state(state, obs.shape[0])
    length = jnp.where(start, 0, state.length)  # the episode reset
    distance = _ring_distances(state.next_slot, ring_size)
    attend = distance <= length[:, None]
    outputs, keys, values = net.apply(
        params, obs, state.keys, state.values, state.next_slot, distance,
        attend, method=_GTrXLNet.step)
    new_state = GTrXLState(
        keys=tuple(keys), values=tuple(values),
        next_slot=_ring_next(state.next_slot, ring_size),
        length=jnp.minimum(length + 1, memory_len).astype(jnp.int32))
    return outputs, new_state

  def run_segment(params, state, obs, start):
    """obs [B, T, O], start [B, T] -> (outputs [B, T, ...], new state)."""
    length = obs.shape[1]
    unroll_ring = lambda ring: jax.lax.stop_gradient(  # noqa: E731
        _ring_to_chronological(ring, state.next_slot))
    # Row 0 of each unrolled ring is the out-of-reach slot: carried, not seen.
    rings_keys = [unroll_ring(ring) for ring in state.keys]
    rings_values = [unroll_ring(ring) for ring in state.values]
    attend = _segment_attention_mask(
        _chronological_valid(state.length, memory_len), start)
    outputs, keys, values = net.apply(
        params, obs, [ring[:, 1:] for ring in rings_keys],
        [ring[:, 1:] for ring in rings_values], attend)
    # The same ring layout as `length` calls of `step` would leave.
    next_slot = jnp.mod(state.next_slot + length, ring_size).astype(jnp.int32)

    def keep_last(ring, segment):
      recent = jnp.concatenate([ring, segment], axis=1)[:, length:]
      return _chronological_to_ring(recent, next_slot)

    new_state = GTrXLState(
        keys=tuple(map(keep_last, rings_keys, keys)),
        values=tuple(map(keep_last, rings_values, values)),
        next_slot=next_slot,
        length=_length_after(state.length, start, memory_len))
    return outputs, new_state

  def unroll(params, state, obs, start):
    _check_unroll_inputs(obs, start, observation_size)
    check_state(state, obs.shape[1])
    outputs, state = run_segment(params, state, jnp.swapaxes(obs, 0, 1),
                                 jnp.swapaxes(start, 0, 1))
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), outputs), state

  return RecurrentModel(init=init, initial_state=initial_state, step=step,
                        unroll=unroll)


# ----------------------------------------------------------------------------
# Reference acting steps of the GTrXL (benchmarks and tests only): the same
# network and parameters as `make_gtrxl_model`, other memory layouts.


class _ShiftState(NamedTuple):
  """Shifted memory, oldest first (the acting state before the ring buffer).

  keys:   float32 [B, L, M, H, Dh]; row M-1 is the most recent step.
  values: float32 [B, L, M, H, Dh].
  valid:  bool [B, M], row holds a step of the current episode.
  """
  keys: Array
  values: Array
  valid: Array


class _InputCacheState(NamedTuple):
  """Cached layer inputs, oldest first (Transformer-XL's original memory).

  inputs: float32 [B, L, M, D]; row M-1 is the most recent step.
  valid:  bool [B, M], row holds a step of the current episode.
  """
  inputs: Array
  valid: Array


def _gtrxl_reference_steps(observation_size: int, num_actions: int,
                           encoder_hidden: int, num_layers: int,
                           num_heads: int, d_model: int, mlp_width: int,
                           memory_len: int, policy_head: bool = True, *,
                           gate_bias_init: float = 2.0
                           ) -> Dict[str, Tuple[Callable, Callable]]:
  """Other acting forms, for the benchmark and for tests.

  Arguments as `make_gtrxl_model`, whose params they take.

  Returns:
    {form: (initial_state(batch_size), step(params, state, obs [B, O],
    start [B]) -> (outputs [B, ...], state))} for
    'shift': K/V cache in `_ShiftState`, shifted by concatenate + slice every
      step (the form this module used before the ring buffer);
    'recompute': layer inputs in `_InputCacheState`, shifted, with every
      memory step's keys and values re-projected each step (O(M * D^2) per
      layer and step).
  """
  net = _gtrxl_net(observation_size, num_actions, encoder_hidden, num_layers,
                   num_heads, d_model, mlp_width, memory_len, policy_head,
                   gate_bias_init)
  head_dim = d_model // num_heads

  def shift_initial_state(batch_size: int) -> _ShiftState:
    shape = (batch_size, num_layers, memory_len, num_heads, head_dim)
    return _ShiftState(keys=jnp.zeros(shape, jnp.float32),
                       values=jnp.zeros(shape, jnp.float32),
                       valid=jnp.zeros((batch_size, memory_len), bool))

  def shift_step(params, state, obs, start):
    _check_step_inputs(obs, start, observation_size)
    attend = _segment_attention_mask(state.valid, start[:, None])
    layers = range(num_layers)
    outputs, keys, values = net.apply(
        params, obs[:, None], [state.keys[:, l] for l in layers],
        [state.values[:, l] for l in layers], attend)
    shift = lambda memory, new: jnp.concatenate(  # noqa: E731
        [memory, jnp.stack(new, axis=1)], axis=2)[:, :, 1:]
    return (jax.tree.map(lambda x: x[:, 0], outputs),
            _ShiftState(keys=shift(state.keys, keys),
                        values=shift(state.values, values),
                        valid=attend[:, -1, 1:]))

  def recompute_initial_state(batch_size: int) -> _InputCacheState:
    shape = (batch_size, num_layers, memory_len, d_model)
    return _InputCacheState(inputs=jnp.zeros(shape, jnp.float32),
                            valid=jnp.zeros((batch_size, memory_len), bool))

  def recompute_step(params, state, obs, start):
    _check_step_inputs(obs, start, observation_size)
    attend = _segment_attention_mask(state.valid, start[:, None])
    outputs, inputs = net.apply(params, obs, state.inputs, attend,
                                method=_GTrXLNet.recompute_step)
    inputs = jnp.concatenate([state.inputs, inputs[:, :, None]], axis=2)
    return outputs, _InputCacheState(inputs=inputs[:, :, 1:],
                                     valid=attend[:, -1, 1:])

  return {"shift": (shift_initial_state, shift_step),
          "recompute": (recompute_initial_state, recompute_step)}

"""Running an exported actor with onnxruntime: numpy + onnxruntime only.

This module imports no JAX (nor anything else of ald_jax): it can be copied
alone onto a robot or an actor machine that has only `numpy` and
`onnxruntime` installed. `python experiments/export.py --logdir=runs/X`
writes the directory it reads:

    policy.onnx   one acting step of the trained acting model (jax2onnx):
                  inputs  observation f32 [B, O], start bool [B], state leaves
                  outputs logits f32 [B, A], value f32 [B], new state leaves
                  (B is a symbolic batch dimension: any batch works; models
                  that cannot be exported so get one policy_b<B>.onnx per
                  fixed batch size instead)
    policy.json   metadata: sizes, state leaves, the env and the full training
                  config, the params version (training iteration) and the
                  sha256 of each .onnx file (checked at load)

Use:

    policy = ActorPolicy.load("runs/X/export", greedy=True)
    policy.reset(batch_size=1)
    action, logits = policy.step(obs, start)      # obs f32 [1, O], start [1]

The recurrent state lives inside the policy object. `start[b]` marks the
first observation of a new episode in row b: the model resets that row's
state before processing it (exactly as in training). The first step after
`reset` treats every row as an episode start.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnxruntime as ort

POLICY_ONNX = "policy.onnx"
METADATA_JSON = "policy.json"
FORMAT = "ald_jax.actor_policy/1"
BATCH_DIM = "batch"  # the symbolic batch dimension's name in policy.onnx

# onnxruntime logs at WARNING every unused initialiser it drops; keep quiet.
_ORT_LOG_ERRORS_ONLY = 3


def file_sha256(path: str) -> str:
  """Hex sha256 of a file's bytes."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def make_session(model: Any, *, batch_size: Optional[int] = None,
                 threads: int = 1) -> ort.InferenceSession:
  """An onnxruntime CPU session for a model (a path or serialised bytes).

  Args:
    model: path of an .onnx file, or the bytes of a serialised ModelProto.
    batch_size: fixes the symbolic batch dimension (`BATCH_DIM`) to this
      size, so that onnxruntime folds the shape computations (a few us per
      step at batch 1); None keeps it dynamic.
    threads: onnxruntime intra-op threads (1: no thread-pool hand-off, the
      lowest latency for small models).
  """
  options = ort.SessionOptions()
  options.intra_op_num_threads = threads
  options.inter_op_num_threads = 1
  options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
  options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
  options.log_severity_level = _ORT_LOG_ERRORS_ONLY
  if batch_size is not None:
    options.add_free_dimension_override_by_name(BATCH_DIM, int(batch_size))
  return ort.InferenceSession(model, options,
                              providers=["CPUExecutionProvider"])


def _one_line(text: Any) -> str:
  return " ".join(str(text).split())


def read_metadata(directory: str) -> Dict[str, Any]:
  """policy.json of an export directory, checked for the fields it must have.

  Raises:
    ValueError: '<path>: <reason>' (missing, unreadable or incomplete).
  """
  path = os.path.join(directory, METADATA_JSON)
  if not os.path.isdir(directory):
    raise ValueError(f"{directory}: no such export directory")
  if not os.path.isfile(path):
    raise ValueError(f"{path}: missing (not an exported policy directory; "
                     f"export one with experiments/export.py)")
  try:
    with open(path) as f:
      metadata = json.load(f)
  except (OSError, ValueError) as err:
    raise ValueError(f"{path}: unreadable ({_one_line(err)})") from None
  if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
    found = metadata.get("format") if isinstance(metadata, dict) else None
    raise ValueError(f"{path}: format {found!r}, expected {FORMAT!r}")
  for key in ("models", "observation_size", "num_actions", "inputs",
              "outputs", "state"):
    if key not in metadata:
      raise ValueError(f"{path}: field {key!r} missing")
  models = metadata["models"]
  if (not isinstance(models, list) or not models or not all(
      isinstance(m, dict) and {"file", "batch_size", "sha256"} <= m.keys()
      for m in models)):
    raise ValueError(f"{path}: field 'models' must list "
                     f"{{file, batch_size, sha256}} entries")
  return metadata


class ActorPolicy:
  """An exported acting model stepped with onnxruntime, state inside.

  Attributes:
    observation_size: O, the length of one observation row.
    num_actions: A, the number of discrete actions.
    batch_size: B of the current `reset` (rows per `step`).
    greedy: argmax actions if True, else sampled from softmax(logits).
    metadata: the parsed policy.json (env, config, params_version, ...).
    last_value: float32 [B], the value estimates of the last `step`.
  """

  def __init__(self, directory: str, metadata: Dict[str, Any], *,
               greedy: bool = True, seed: Optional[int] = None,
               threads: int = 1):
    """Use `ActorPolicy.load(directory)`; this trusts its arguments."""
    self.metadata = metadata
    self.observation_size = int(metadata["observation_size"])
    self.num_actions = int(metadata["num_actions"])
    self.params_version = metadata.get("params_version")
    self.greedy = bool(greedy)
    self._threads = int(threads)
    self._rng = np.random.default_rng(seed)
    self._state_specs: List[Dict[str, Any]] = list(metadata["state"])
    self._input_names = metadata["inputs"]
    self._output_names = [metadata["outputs"]["logits"],
                          metadata["outputs"]["value"]] + [
                              spec["output"] for spec in self._state_specs]
    # batch size (None: any) -> model file.
    self._files = {entry["batch_size"]: os.path.join(directory, entry["file"])
                   for entry in metadata["models"]}
    self._sessions: Dict[int, ort.InferenceSession] = {}
    self.last_value: Optional[np.ndarray] = None
    self.reset(1 if self.batch_sizes is None or 1 in self.batch_sizes
               else self.batch_sizes[0])

  @property
  def batch_sizes(self) -> Optional[Tuple[int, ...]]:
    """The batch sizes `reset` accepts; None: any."""
    if None in self._files:
      return None
    return tuple(sorted(self._files))

  # ---------------------------------------------------------------- loading
  @classmethod
  def load(cls, directory: str, *, greedy: bool = True,
           seed: Optional[int] = None, threads: int = 1,
           verify_checksum: bool = True) -> "ActorPolicy":
    """Loads an export directory (see the module docstring).

    Args:
      directory: what experiments/export.py wrote (policy.onnx, policy.json).
      greedy: argmax actions (True) or sampled from softmax(logits) (False).
      seed: seed of the sampling generator (sampled mode).
      threads: onnxruntime intra-op threads.
      verify_checksum: compare each .onnx file with its sha256 in policy.json.

    Raises:
      ValueError: one line naming the file and the problem (missing,
        corrupted, checksum mismatch, not loadable by onnxruntime, inputs or
        outputs not those the metadata describes).
    """
    if not isinstance(threads, int) or threads < 1:
      raise ValueError(f"threads: must be a positive integer (got {threads!r})")
    metadata = read_metadata(directory)
    for entry in metadata["models"]:
      path = os.path.join(directory, entry["file"])
      if not os.path.isfile(path):
        raise ValueError(f"{path}: missing")
      if verify_checksum:
        actual = file_sha256(path)
        if actual != entry["sha256"]:
          raise ValueError(
              f"{path}: sha256 {actual[:16]}... differs from "
              f"{str(entry['sha256'])[:16]}... in {METADATA_JSON}: the file is "
              f"corrupted or was modified; export it again")
    return cls(directory, metadata, greedy=greedy, seed=seed, threads=threads)

  def _session(self, batch_size: int) -> ort.InferenceSession:
    """The (cached) session for a batch size, its batch dimension fixed."""
    session = self._sessions.get(batch_size)
    if session is not None:
      return session
    path = self._files.get(None, self._files.get(batch_size))
    if path is None:
      raise ValueError(f"batch_size: this export has fixed batch sizes "
                       f"{list(self.batch_sizes)} (got {batch_size}); export "
                       f"again with --batch_sizes")
    try:
      session = make_session(path, batch_size=batch_size,
                             threads=self._threads)
    except Exception as err:  # onnxruntime raises its own exception types
      raise ValueError(f"{path}: onnxruntime cannot load it "
                       f"({_one_line(err)[:300]})") from None
    self._check_signature(session, path)
    self._sessions[batch_size] = session
    return session

  def _check_signature(self, session: ort.InferenceSession, path: str) -> None:
    """The session's inputs and outputs are those policy.json describes."""
    expected = ([self._input_names["observation"], self._input_names["start"]]
                + [spec["input"] for spec in self._state_specs])
    got = [node.name for node in session.get_inputs()]
    got_out = [node.name for node in session.get_outputs()]
    if sorted(got) != sorted(expected) or sorted(got_out) != sorted(
        self._output_names):
      raise ValueError(f"{path}: inputs {got} / outputs {got_out} are not "
                       f"those of {METADATA_JSON} ({expected} / "
                       f"{self._output_names})")
    shapes = {node.name: node.shape for node in session.get_inputs()}
    observation_shape = shapes[self._input_names["observation"]]
    if list(observation_shape[1:]) != [self.observation_size]:
      raise ValueError(f"{path}: observation input has shape "
                       f"{observation_shape}, {METADATA_JSON} says "
                       f"observation_size={self.observation_size}")

  # ----------------------------------------------------------------- acting
  def reset(self, batch_size: int = 1) -> None:
    """Starts `batch_size` fresh episodes: the next step resets every row."""
    if (not isinstance(batch_size, (int, np.integer)) or isinstance(
        batch_size, bool) or batch_size < 1):
      raise ValueError(f"batch_size: must be a positive integer "
                       f"(got {batch_size!r})")
    self.batch_size = int(batch_size)
    self._session_now = self._session(self.batch_size)
    # Any value works: the first step's start flags are forced to True, and
    # the model resets a starting row to its own initial state.
    self._state = [np.zeros((self.batch_size,) + tuple(spec["shape"]),
                            np.dtype(spec["dtype"]))
                   for spec in self._state_specs]
    self._force_start = True
    self.last_value = None

  @property
  def state(self) -> Dict[str, np.ndarray]:
    """A copy of the recurrent state leaves, by name ([B, ...] each)."""
    return {spec["name"]: leaf.copy()
            for spec, leaf in zip(self._state_specs, self._state)}

  def step(self, observation: Any, start: Any = None
           ) -> Tuple[np.ndarray, np.ndarray]:
    """One acting step of every row.

    Args:
      observation: float32 [B, O] (B = `batch_size` of the last `reset`).
      start: [B] episode-start flags (bool, or 0/1 integers or floats); None
        means no row starts an episode (except on the first step after
        `reset`).

    Returns:
      (action int64 [B], logits float32 [B, A]); greedy: argmax of the
      logits; sampled: drawn from softmax(logits) with the policy's generator.

    Raises:
      ValueError: one line naming the argument, for a wrong shape or dtype or
        non-finite observations.
    """
    observation = self._check_observation(observation)
    start = self._check_start(start)
    if self._force_start:
      start = np.ones_like(start)
    feeds = {self._input_names["observation"]: observation,
             self._input_names["start"]: start}
    for spec, leaf in zip(self._state_specs, self._state):
      feeds[spec["input"]] = leaf
    logits, value, *state = self._session_now.run(self._output_names, feeds)
    self._state = state
    self._force_start = False
    self.last_value = value
    return self.select(logits), logits

  def select(self, logits: np.ndarray) -> np.ndarray:
    """Actions int64 [B] from logits [B, A] (argmax, or Gumbel-max sample)."""
    if self.greedy:
      return np.argmax(logits, axis=-1)
    return np.argmax(logits + self._rng.gumbel(size=logits.shape), axis=-1)

  def _check_observation(self, observation: Any) -> np.ndarray:
    if not isinstance(observation, np.ndarray):
      observation = np.asarray(observation, np.float32)
    expected = (self.batch_size, self.observation_size)
    if observation.dtype != np.float32:
      raise ValueError(f"observation: dtype must be float32 (got "
                       f"{observation.dtype}); convert with "
                       f"np.asarray(obs, np.float32)")
    if observation.shape != expected:
      hint = (f"; call reset({observation.shape[0]}) for another batch"
              if observation.ndim == 2
              and observation.shape[1] == self.observation_size else "")
      raise ValueError(f"observation: shape must be (batch_size, "
                       f"observation_size) = {expected} (got "
                       f"{observation.shape}){hint}")
    if not np.isfinite(observation).all():
      raise ValueError("observation: contains NaN or infinite values")
    return observation

  def _check_start(self, start: Any) -> np.ndarray:
    if start is None:
      return np.zeros((self.batch_size,), bool)
    start = np.asarray(start)
    if start.shape != (self.batch_size,):
      raise ValueError(f"start: shape must be (batch_size,) = "
                       f"({self.batch_size},) (got {start.shape})")
    if start.dtype == bool:
      return start
    if start.dtype.kind not in "iuf" or not np.isin(start, (0, 1)).all():
      raise ValueError(f"start: must be bool, or 0/1 integers or floats "
                       f"(got dtype {start.dtype})")
    return start.astype(bool)


def load(directory: str, **kwargs: Any) -> ActorPolicy:
  """Same as `ActorPolicy.load(directory, **kwargs)`."""
  return ActorPolicy.load(directory, **kwargs)


__all__: Sequence[str] = ("ActorPolicy", "load", "read_metadata",
                          "make_session", "file_sha256", "POLICY_ONNX",
                          "METADATA_JSON", "FORMAT", "BATCH_DIM")

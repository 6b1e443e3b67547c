"""The training configuration: one frozen dataclass, validated in one place.

`experiments/run.py` builds one absl flag per field (same name, the field's
`help` metadata as help text), so every knob is documented once, here.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Tuple

# The one list of agents lives with their roles (ald_jax/agents.py).
from ald_jax.agents import AGENTS  # pylint: disable=g-import-not-at-top
RL_LOSSES = ("vmpo", "ppo")
DISTILL_TARGETS = ("recompute", "stored")
BUILTIN_ENVS = ("recall", "imaze", "metafetch")
LATENCY_RUNTIMES = ("jax", "onnx")
RUNTIMES = ("sync", "distributed")
ACTOR_INFERENCE = ("batched", "per_env")


def _field(default, help: str, **kw):  # pylint: disable=redefined-builtin
  return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass(frozen=True)
class Config:
  """All settings of one training run. Units: env steps are per single env."""
  # What to train.
  env: str = _field("recall", "Built-in env name (recall|imaze|metafetch) or "
                    "'package.module:factory' returning an envs.api.Environment.")
  env_args: str = _field("", "Comma-separated key=value constructor arguments "
                         "of the env, e.g. 'corridor_length=8,step_penalty=0.01'.")
  agent: str = _field("ald", "lstm: LSTM trained with RL; gtrxl: GTrXL trained "
                      "with RL and acting; asym: LSTM policy + GTrXL critic; "
                      "ald: LSTM actor distilled from a GTrXL learner.")
  rl_loss: str = _field("vmpo", "RL loss of the learner: vmpo or ppo.")
  seed: int = _field(0, "Random seed (params, envs, sampling).")

  # Batch and budget.
  num_envs: int = _field(32, "Parallel envs in total (split across devices).")
  unroll_length: int = _field(20, "Time steps T per collected segment.")
  total_env_steps: int = _field(200_000, "Training budget in env steps "
                                "(num_envs * unroll_length per iteration).")
  num_devices: int = _field(0, "Local devices to use (0: all).")

  # Models.
  encoder_hidden: int = _field(64, "Width of the 1-hidden-layer MLP observation "
                               "encoder of both models.")
  lstm_hidden: int = _field(64, "LSTM units of the actor.")
  gtrxl_layers: int = _field(2, "GTrXL layers.")
  gtrxl_heads: int = _field(2, "GTrXL attention heads.")
  gtrxl_d_model: int = _field(64, "GTrXL model width (divisible by heads).")
  gtrxl_mlp_width: int = _field(128, "GTrXL position-wise MLP width.")
  gtrxl_memory_len: int = _field(32, "GTrXL cached steps of memory per layer.")

  # Returns.
  discount: float = _field(0.99, "Discount gamma in [0, 1].")
  td_lambda: float = _field(0.95, "Lambda of the lambda-returns / GAE in [0, 1].")

  # Optimisation.
  learner_learning_rate: float = _field(3e-4, "Adam step size of the RL-trained "
                                        "model(s).")
  actor_learning_rate: float = _field(1e-3, "Adam step size of the ald actor's "
                                      "distillation.")
  max_grad_norm: float = _field(1.0, "Global gradient-norm clip (0: off).")
  value_cost: float = _field(0.5, "Weight of the value loss in the RL loss.")

  # V-MPO.
  vmpo_eps_eta: float = _field(0.1, "V-MPO temperature constraint epsilon_eta.")
  vmpo_eps_alpha: float = _field(0.01, "V-MPO KL trust-region epsilon_alpha.")
  vmpo_init_eta: float = _field(1.0, "Initial V-MPO temperature eta (> 0).")
  vmpo_init_alpha: float = _field(5.0, "Initial V-MPO KL multiplier alpha (> 0).")
  vmpo_dual_learning_rate: float = _field(1e-2, "Adam step size of the V-MPO "
                                          "dual variables (log eta, log alpha).")
  vmpo_top_k_fraction: float = _field(0.5, "Fraction of steps kept by advantage.")
  target_update_period: int = _field(10, "Learner steps between refreshes of "
                                     "the V-MPO target policy.")

  # PPO.
  ppo_clip_epsilon: float = _field(0.2, "PPO ratio clip epsilon.")
  ppo_entropy_cost: float = _field(0.01, "PPO entropy bonus weight.")
  rl_steps_per_iteration: int = _field(1, "Gradient steps of the RL loss on "
                                       "each collected batch (PPO epochs).")

  # Actor-learner distillation.
  alpha_reg: float = _field(0.1, "Weight of KL(sg[pi_actor] || pi_learner) in "
                            "the learner loss (ald only).")
  alpha_pi: float = _field(1.0, "Weight of KL(sg[pi_learner] || pi_actor) in the "
                           "actor distillation loss.")
  alpha_v: float = _field(1.0, "Weight of 0.5*(sg[V_learner]-V_actor)^2 in the "
                          "actor distillation loss.")
  distill_steps_per_rl_step: int = _field(2, "Actor distillation minibatch "
                                          "steps per learner update (K >= 1).")
  replay_segments: int = _field(4, "Recent segments kept on device for "
                                "distillation (>= 1; 1: current segment only).")
  distill_batch_envs: int = _field(0, "Segments (env rows) per distillation "
                                   "minibatch (0: num_envs of one segment).")
  distill_targets: str = _field("recompute", "Learner targets of the "
                                "distillation: 'recompute' (a forward pass of "
                                "the current learner per minibatch) or 'stored' "
                                "(the learner's outputs from its RL step, kept "
                                "in the replay: no extra forward pass, targets "
                                "up to replay_segments iterations old).")
  importance_weight_clip: float = _field(0.0, "Clip of pi_learner/pi_actor "
                                         "weights on the RL loss (0: off).")

  # Running.
  logdir: str = _field("runs/default", "Where CSV/TensorBoard metrics and "
                       "checkpoints go.")
  log_every_seconds: float = _field(5.0, "Seconds between progress lines.")
  checkpoint_every_iterations: int = _field(200, "Iterations between "
                                            "checkpoints (0: only at the end).")
  resume: bool = _field(False, "Continue from the latest checkpoint in logdir.")
  eval_episodes: int = _field(64, "Greedy evaluation episodes at the end.")
  actor_latency_budget_us: float = _field(
      0.0, "Budget of one acting step, in microseconds, at the batch one "
      "device acts on (num_envs / devices); measured before training (median "
      "of 500 calls after warm-up) and the run refused if over it (0: off).")
  actor_latency_runtime: str = _field(
      "jax", "Which measured step the budget applies to: jax (the jitted "
      "step training acts with) or onnx (the exported step "
      "experiments/export.py deploys, run by onnxruntime).")
  compilation_cache_dir: str = _field(
      "", "JAX's persistent compilation cache: a second identical run loads "
      "its compiled programs instead of compiling again ('': "
      "$XDG_CACHE_HOME or ~/.cache /ald_jax/jax_compilation_cache; 'none': "
      "off).")

  # ------------------------------------------------------------------------
  # Distributed runtime (ald_jax/distributed.py; docs/distributed.md).
  # Ignored by --runtime=sync. With --runtime=distributed, num_envs is the
  # learner's batch (env rows per RL step) and the actors own
  # num_actors * envs_per_actor env streams.
  runtime: str = _field("sync", "sync: act, learn and distill in one jitted "
                        "program; distributed: actor, learner and distiller "
                        "processes running concurrently on Ray.")
  ray_address: str = _field("", "Ray cluster to join ('auto' or host:port); "
                            "empty: start a local Ray instance.")
  ray_num_cpus: int = _field(0, "CPUs of the local Ray instance (0: "
                             "min(CPU count, 4)).")
  num_actors: int = _field(2, "Actor processes (distributed).")
  envs_per_actor: int = _field(16, "Env streams of each actor process "
                               "(distributed).")
  actor_inference: str = _field("batched", "How an actor steps its acting "
                                "model: batched (all its env streams in one "
                                "call) or per_env (one call per env stream at "
                                "batch 1, the cost of that many one-env actor "
                                "processes).")
  num_distillers: int = _field(1, "Distiller processes (distributed, ald).")
  max_policy_lag: int = _field(4, "Learner versions a segment's behaviour "
                               "params may be behind when the learner "
                               "consumes it; older segments are dropped "
                               "(distributed).")
  segment_queue_size: int = _field(2, "Segments buffered at the learner, "
                                   "split over the actors (at least one "
                                   "each); an actor waits when its share is "
                                   "full (distributed).")
  distill_error_buffer: int = _field(0, "Slack, in distill steps, of the "
                                     "enforced distill_steps_per_rl_step "
                                     "ratio (0: 2 * distill_steps_per_rl_step"
                                     "; >= distill_steps_per_rl_step).")
  actor_max_restarts: int = _field(3, "Restarts of each actor process after "
                                   "it dies (distributed).")
  dm_env_append_action_reward: bool = _field(True, "With a Python "
                                             "dm_env.Environment: append the "
                                             "one-hot previous action and the "
                                             "previous reward to its "
                                             "observations.")

  @property
  def env_steps_per_iteration(self) -> int:
    return self.num_envs * self.unroll_length

  @property
  def uses_learner(self) -> bool:
    """Whether a GTrXL is part of the agent."""
    return self.agent != "lstm"

  def validate(self) -> "Config":
    """Raises ValueError('<field>: <reason>') on the first invalid field."""
    def need(ok: bool, name: str, reason: str):
      if not ok:
        raise ValueError(f"{name}: {reason} (got {getattr(self, name)!r})")

    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if isinstance(value, float):
        need(math.isfinite(value), field.name, "must be a finite number")
    need(self.actor_latency_runtime in LATENCY_RUNTIMES,
         "actor_latency_runtime", f"must be one of {', '.join(LATENCY_RUNTIMES)}")
    need(self.agent in AGENTS, "agent", f"must be one of {', '.join(AGENTS)}")
    need(self.rl_loss in RL_LOSSES, "rl_loss",
         f"must be one of {', '.join(RL_LOSSES)}")
    need(self.runtime in RUNTIMES, "runtime",
         f"must be one of {', '.join(RUNTIMES)}")
    need(self.distill_targets in DISTILL_TARGETS, "distill_targets",
         f"must be one of {', '.join(DISTILL_TARGETS)}")
    need(self.env in BUILTIN_ENVS or ":" in self.env, "env",
         f"must be one of {', '.join(BUILTIN_ENVS)} or 'package.module:factory'")
    parse_env_args(self.env_args)  # raises with the field named
    for name in ("num_envs", "unroll_length", "total_env_steps", "encoder_hidden",
                 "lstm_hidden", "gtrxl_layers", "gtrxl_heads", "gtrxl_d_model",
                 "gtrxl_mlp_width", "gtrxl_memory_len", "target_update_period",
                 "rl_steps_per_iteration", "distill_steps_per_rl_step",
                 "replay_segments", "eval_episodes"):
      need(getattr(self, name) >= 1, name, "must be >= 1")
    for name in ("num_devices", "distill_batch_envs", "checkpoint_every_iterations",
                 "importance_weight_clip", "max_grad_norm", "value_cost",
                 "ppo_entropy_cost", "alpha_reg", "alpha_pi", "alpha_v",
                 "actor_latency_budget_us"):
      need(getattr(self, name) >= 0, name, "must be >= 0")
    need(self.gtrxl_d_model % self.gtrxl_heads == 0, "gtrxl_d_model",
         f"must be divisible by gtrxl_heads={self.gtrxl_heads}")
    for name in ("discount", "td_lambda", "vmpo_top_k_fraction"):
      need(0.0 <= getattr(self, name) <= 1.0, name, "must be in [0, 1]")
    need(self.vmpo_top_k_fraction > 0, "vmpo_top_k_fraction", "must be > 0")
    for name in ("learner_learning_rate", "actor_learning_rate",
                 "vmpo_dual_learning_rate", "vmpo_eps_eta", "vmpo_eps_alpha",
                 "vmpo_init_eta", "vmpo_init_alpha", "ppo_clip_epsilon",
                 "log_every_seconds"):
      need(getattr(self, name) > 0, name, "must be > 0")
    need(self.total_env_steps >= self.env_steps_per_iteration, "total_env_steps",
         f"must be >= num_envs * unroll_length = {self.env_steps_per_iteration}")
    need(self.distill_batch_envs <= self.num_envs * self.replay_segments,
         "distill_batch_envs",
         f"must be <= num_envs * replay_segments = "
         f"{self.num_envs * self.replay_segments}")
    if self.runtime == "distributed":
      self._validate_distributed(need)
    return self

  def _validate_distributed(self, need) -> None:
    """The distributed runtime's fields (see their help)."""
    need(self.actor_inference in ACTOR_INFERENCE, "actor_inference",
         f"must be one of {', '.join(ACTOR_INFERENCE)}")
    for name in ("num_actors", "envs_per_actor", "num_distillers",
                 "segment_queue_size"):
      need(getattr(self, name) >= 1, name, "must be >= 1")
    for name in ("max_policy_lag", "actor_max_restarts", "ray_num_cpus",
                 "distill_error_buffer"):
      need(getattr(self, name) >= 0, name, "must be >= 0")
    need(self.num_envs % self.envs_per_actor == 0, "num_envs",
         f"with --runtime=distributed, the learner batch must be whole actor "
         f"segments: a multiple of envs_per_actor={self.envs_per_actor}")
    need(self.num_envs <= self.num_actors * self.envs_per_actor, "num_envs",
         f"with --runtime=distributed, the learner batch needs distinct env "
         f"streams: at most num_actors * envs_per_actor = "
         f"{self.num_actors * self.envs_per_actor}")
    need(self.distill_error_buffer == 0 or
         self.distill_error_buffer >= self.distill_steps_per_rl_step,
         "distill_error_buffer",
         f"must be 0 or >= distill_steps_per_rl_step="
         f"{self.distill_steps_per_rl_step}")


def parse_env_args(text: str) -> Dict[str, Any]:
  """Parses 'a=1,b=0.5,c=true,d=name' into {'a': 1, 'b': 0.5, 'c': True, ...}."""
  out: Dict[str, Any] = {}
  for item in filter(None, (s.strip() for s in text.split(","))):
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
      raise ValueError(f"env_args: expected key=value, got {item!r}")
    out[key.strip()] = _parse_scalar(raw.strip())
  return out


def _parse_scalar(raw: str) -> Any:
  if raw.lower() in ("true", "false"):
    return raw.lower() == "true"
  for cast in (int, float):
    try:
      return cast(raw)
    except ValueError:
      pass
  return raw


def field_help() -> Tuple[Tuple[str, Any, str], ...]:
  """(name, default, help) of every Config field, in declaration order."""
  return tuple((f.name, f.default, f.metadata["help"])
               for f in dataclasses.fields(Config))

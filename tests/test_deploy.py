"""Exporting a trained run's actor to ONNX and running it without JAX.

One tiny ald run on Recall is trained (experiments/run.py) and exported
(experiments/export.py) once per module; the tests then check the export
against the JAX step on real episodes, against the run's eval.json, in a
process where JAX cannot be imported, and on bad inputs.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("jax2onnx")
pytest.importorskip("onnxruntime")

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax

from ald_jax import deploy
from ald_jax import export
from ald_jax import networks
# pylint: enable=g-import-not-at-top,wrong-import-position

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_PY = os.path.join(REPO_ROOT, "experiments", "run.py")
EXPORT_PY = os.path.join(REPO_ROOT, "experiments", "export.py")
TINY_RUN = [
    "--env=recall", "--env_args=num_cues=2,delay=2", "--agent=ald",
    "--num_envs=8", "--unroll_length=10", "--total_env_steps=800",
    "--encoder_hidden=16", "--lstm_hidden=16", "--gtrxl_layers=1",
    "--gtrxl_heads=1", "--gtrxl_d_model=16", "--gtrxl_mlp_width=16",
    "--gtrxl_memory_len=4", "--eval_episodes=16", "--log_every_seconds=60",
]


def _run(args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable] + args, capture_output=True,
                        text=True, timeout=timeout, env=env, cwd=REPO_ROOT,
                        check=False)


# One worker runs this module under pytest-xdist, so that the trained run
# below (a module fixture) is trained once, not once per worker.
pytestmark = pytest.mark.xdist_group("deploy_trained_run")


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
  """A trained tiny ald run (config.json, checkpoints/, eval.json)."""
  path = tmp_path_factory.mktemp("deploy") / "run"
  result = _run([RUN_PY, f"--logdir={path}"] + TINY_RUN)
  assert result.returncode == 0, result.stderr[-3000:]
  return str(path)


@pytest.fixture(scope="module")
def exported(logdir):
  """(export directory, stdout of experiments/export.py)."""
  out = os.path.join(logdir, "exported")
  result = _run([EXPORT_PY, f"--logdir={logdir}", f"--out={out}",
                 "--nolatency"])
  assert result.returncode == 0, result.stderr[-3000:]
  return out, result.stdout


@pytest.fixture(scope="module")
def run(logdir):
  return export.load_acting_params(logdir)


# ------------------------------------------------------------ the export ---


def test_export_writes_model_and_metadata(logdir, exported, run):
  out, stdout = exported
  metadata = deploy.read_metadata(out)
  assert metadata["format"] == deploy.FORMAT
  assert [m["batch_size"] for m in metadata["models"]] == [None]  # any batch
  model_path = os.path.join(out, metadata["models"][0]["file"])
  assert metadata["models"][0]["sha256"] == deploy.file_sha256(model_path)
  with open(os.path.join(logdir, "config.json")) as f:
    config = json.load(f)
  assert metadata["config"] == {k: config[k] for k in metadata["config"]}
  assert metadata["env"] == "recall"
  assert metadata["env_args"] == "num_cues=2,delay=2"
  assert metadata["agent"] == "ald" and metadata["acting_model"] == "LSTM-16"
  assert metadata["observation_size"] == run.env.observation_size == 6
  assert metadata["num_actions"] == run.env.num_actions == 2
  assert [(s["name"], s["shape"], s["dtype"]) for s in metadata["state"]] == [
      ("cell", [16], "float32"), ("hidden", [16], "float32")]
  checkpoints = sorted(int(d) for d in os.listdir(
      os.path.join(logdir, "checkpoints")) if d.isdigit())
  assert metadata["params_version"] == run.version == checkpoints[-1] == 10
  # The CLI checked parity and replayed eval.json before keeping the files.
  assert metadata["parity"]["steps"] == 500
  assert metadata["parity"]["greedy_action_mismatches"] == 0
  assert "greedy actions identical" in stdout
  assert "(DIFFERENT)" not in stdout


def test_parity_with_the_jax_step_over_500_steps(exported, run):
  policy = deploy.ActorPolicy.load(exported[0], greedy=True)
  result = export.parity_check(run, policy, steps=500, batch_size=8, seed=3)
  assert result["episode_starts"] > 100  # Recall episodes last 4 steps
  assert result["max_abs_logits_error"] <= 1e-5, result
  assert result["max_abs_value_error"] <= 1e-5, result
  assert result["greedy_action_mismatches"] == 0, result


def test_parity_check_detects_different_params(exported, run):
  policy = deploy.ActorPolicy.load(exported[0], greedy=True)
  other = run._replace(params=jax.tree.map(lambda x: x * 1.01, run.params))
  result = export.parity_check(other, policy, steps=20, batch_size=4, seed=0)
  assert result["max_abs_logits_error"] > 1e-5


def test_exported_greedy_eval_matches_eval_json(logdir, exported, run):
  with open(os.path.join(logdir, "eval.json")) as f:
    saved = json.load(f)
  policy = deploy.ActorPolicy.load(exported[0], greedy=True)
  result = export.evaluate_policy(
      policy, run.env, seed=run.config.seed + export.EVAL_SEED_OFFSET,
      num_episodes=run.config.eval_episodes)
  assert result["eval_episodes"] == saved["eval_episodes"] == 16
  assert result["eval_success_rate"] == saved["eval_success_rate"]
  assert result["eval_return"] == pytest.approx(saved["eval_return"],
                                                abs=1e-6)


def test_chunked_eval_equals_one_batch(exported, run):
  """Fixed-batch exports play the episodes in chunks: same results."""
  policy = deploy.ActorPolicy.load(exported[0], greedy=True)
  whole = export.evaluate_policy(policy, run.env, seed=5, num_episodes=12)
  policy._files = {5: policy._files[None]}  # as if exported for batch 5 only
  policy._sessions = {}
  assert policy.batch_sizes == (5,)
  assert export.evaluate_policy(policy, run.env, seed=5,
                                num_episodes=12) == whole


# -------------------------------------------------------------- no JAX ---

_NO_JAX_SCRIPT = r"""
import importlib.abc, json, sys
class BlockJax(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in ("jax", "jaxlib", "flax", "chex", "optax"):
      raise ImportError(f"{name} is not installed on this robot")
    return None
sys.meta_path.insert(0, BlockJax())
try:
  import jax
  raise SystemExit("jax was importable")
except ImportError:
  pass
import numpy as np
from ald_jax.deploy import ActorPolicy
policy = ActorPolicy.load(sys.argv[1])
policy.reset(2)
obs = np.zeros((2, policy.observation_size), np.float32)
actions = []
for t in range(12):
  action, logits = policy.step(obs, start=np.array([t % 4 == 0, False]))
  actions.append(action.tolist())
sampler = ActorPolicy.load(sys.argv[1], greedy=False, seed=0)
sampler.reset(1)
sampled, _ = sampler.step(np.zeros((1, sampler.observation_size), np.float32))
print(json.dumps({"actions": actions, "logits_shape": list(logits.shape),
                  "sampled": sampled.tolist(),
                  "jax_loaded": any(m.split(".")[0] == "jax"
                                    for m in sys.modules)}))
"""


def test_policy_loads_and_steps_where_jax_cannot_be_imported(exported):
  result = _run(["-c", _NO_JAX_SCRIPT, exported[0]], timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["jax_loaded"] is False
  assert report["logits_shape"] == [2, 2]
  assert len(report["actions"]) == 12
  assert all(a in (0, 1) for row in report["actions"] for a in row)
  assert report["sampled"][0] in (0, 1)


# ------------------------------------------------------ policy behaviour ---


def test_state_is_reset_on_start_and_after_reset(exported):
  policy = deploy.ActorPolicy.load(exported[0])
  policy.reset(2)
  rng = np.random.default_rng(0)
  first = rng.standard_normal((2, policy.observation_size)).astype(np.float32)
  _, logits_first = policy.step(first, [False, False])  # forced starts
  for _ in range(3):
    policy.step(rng.standard_normal(first.shape).astype(np.float32))
  _, logits_again = policy.step(first, np.array([True, False]))
  np.testing.assert_allclose(logits_again[0], logits_first[0], atol=1e-6)
  assert not np.allclose(logits_again[1], logits_first[1], atol=1e-6)
  assert set(policy.state) == {"cell", "hidden"}
  assert policy.state["cell"].shape == (2, 16)
  assert policy.last_value.shape == (2,)


def test_sampled_actions_follow_the_softmax(exported):
  policy = deploy.ActorPolicy.load(exported[0], greedy=False, seed=1)
  logits = np.tile(np.log(np.array([[0.2, 0.8]], np.float32)), (20000, 1))
  frequency = np.mean(policy.select(logits) == 1)
  assert frequency == pytest.approx(0.8, abs=0.02)
  again = deploy.ActorPolicy.load(exported[0], greedy=False, seed=1)
  np.testing.assert_array_equal(again.select(logits[:50]),
                                deploy.ActorPolicy.load(
                                    exported[0], greedy=False,
                                    seed=1).select(logits[:50]))
  greedy = deploy.ActorPolicy.load(exported[0], greedy=True)
  assert (greedy.select(logits) == 1).all()


# ------------------------------------------------------------ bad input ---


def _one_line(err) -> str:
  text = str(err.value)
  assert "\n" not in text, text
  return text


@pytest.mark.parametrize("observation, start, words", [
    (np.zeros((1, 5), np.float32), None, ["observation", "(1, 6)", "(1, 5)"]),
    (np.zeros((1, 6), np.float64), None, ["observation", "float32",
                                          "float64"]),
    (np.zeros((1, 6), np.int32), None, ["observation", "float32", "int32"]),
    (np.zeros((3, 6), np.float32), None, ["observation", "reset(3)"]),
    (np.zeros((6,), np.float32), None, ["observation", "(1, 6)"]),
    (np.full((1, 6), np.nan, np.float32), None, ["observation", "NaN"]),
    (np.zeros((1, 6), np.float32), np.array([True, False]), ["start",
                                                             "(1,)"]),
    (np.zeros((1, 6), np.float32), np.array([0.5]), ["start", "bool"]),
])
def test_bad_step_inputs_raise_one_line(exported, observation, start, words):
  policy = deploy.ActorPolicy.load(exported[0])
  policy.reset(1)
  with pytest.raises(ValueError) as err:
    policy.step(observation, start)
  message = _one_line(err)
  for word in words:
    assert word in message, message


def test_start_flags_accept_0_1_numbers(exported):
  policy = deploy.ActorPolicy.load(exported[0])
  policy.reset(2)
  action, _ = policy.step(np.zeros((2, 6), np.float32), np.array([1.0, 0.0]))
  assert action.shape == (2,)
  with pytest.raises(ValueError):
    policy.reset(0)


def test_corrupted_onnx_file_is_refused(exported, tmp_path):
  copy = tmp_path / "export"
  shutil.copytree(exported[0], copy)
  model = copy / deploy.POLICY_ONNX
  data = bytearray(model.read_bytes())
  data[len(data) // 2:len(data) // 2 + 64] = b"\xff" * 64
  model.write_bytes(bytes(data))
  with pytest.raises(ValueError) as err:
    deploy.ActorPolicy.load(str(copy))
  assert "sha256" in _one_line(err) and "corrupted" in _one_line(err)
  model.write_bytes(b"not an onnx model")
  with pytest.raises(ValueError) as err:
    deploy.ActorPolicy.load(str(copy), verify_checksum=False)
  assert "onnxruntime cannot load it" in _one_line(err)


def test_missing_or_foreign_metadata_is_refused(exported, tmp_path):
  with pytest.raises(ValueError) as err:
    deploy.ActorPolicy.load(str(tmp_path / "nowhere"))
  assert "no such export directory" in _one_line(err)
  with pytest.raises(ValueError) as err:
    deploy.ActorPolicy.load(str(tmp_path))
  assert deploy.METADATA_JSON in _one_line(err)
  (tmp_path / deploy.METADATA_JSON).write_text('{"format": "other/9"}')
  with pytest.raises(ValueError) as err:
    deploy.ActorPolicy.load(str(tmp_path))
  assert "format" in _one_line(err)


def _assert_cli_error(result, *words):
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr[-2000:]
  assert lines[0].startswith("export.py: error: "), lines[0]
  for word in words:
    assert word in lines[0], lines[0]


def test_export_cli_errors_are_one_line(logdir, tmp_path):
  _assert_cli_error(_run([EXPORT_PY, f"--logdir={tmp_path / 'none'}"]),
                    "--logdir", "does not exist")
  _assert_cli_error(_run([EXPORT_PY]), "--logdir", "required")
  _assert_cli_error(_run([EXPORT_PY, f"--logdir={tmp_path}"]), "--logdir",
                    "config.json")
  no_checkpoint = tmp_path / "untrained"
  no_checkpoint.mkdir()
  shutil.copy(os.path.join(logdir, "config.json"), no_checkpoint)
  _assert_cli_error(_run([EXPORT_PY, f"--logdir={no_checkpoint}"]),
                    "--logdir", "no checkpoint")
  assert not (no_checkpoint / "checkpoints").exists()  # nothing created
  _assert_cli_error(_run([EXPORT_PY, f"--logdir={logdir}",
                          "--batch_sizes=1,x"]), "--batch_sizes")


# ------------------------------------------------ models without a run ---


def _step_both(model, params, protos, batch, steps=30, seed=0):
  """Max |logits|, |value| difference between JAX and onnxruntime steps."""
  observation_size = params["params"]["encoder"]["dense"]["kernel"].shape[0]
  proto = protos.get(None, protos.get(batch))
  session = deploy.make_session(proto.SerializeToString(), batch_size=batch)
  signature = export.step_signature(model)
  names = [signature.observation, signature.start] + [
      s["input"] for s in signature.state]
  step = jax.jit(model.step)
  state = model.initial_state(batch)
  leaves = [np.asarray(x) for x in jax.tree.leaves(state)]
  rng = np.random.default_rng(seed)
  error = 0.0
  for t in range(steps):
    obs = rng.standard_normal((batch, observation_size)).astype(np.float32)
    start = (rng.random(batch) < 0.15) | (t == 0)
    output, state = step(params, state, obs, start)
    logits, value, *leaves = session.run(None, dict(zip(
        names, [obs, start] + leaves)))
    error = max(error, np.abs(logits - output.logits).max(),
                np.abs(value - output.value).max())
  return error


def test_lstm_step_exports_with_a_symbolic_batch():
  model = networks.make_lstm_model(7, 3, 16, 24)
  params = model.init(jax.random.key(0))
  protos, _, note = export.convert_step(model, params, 7)
  assert list(protos) == [None] and note == ""
  for batch in (1, 5):
    assert _step_both(model, params, protos, batch) <= 1e-5


def test_gtrxl_acting_step_exports():
  """The gtrxl agent's acting model: a symbolic batch if jax2onnx can, else
  fixed batch sizes; either way the steps agree."""
  model = networks.make_gtrxl_model(7, 3, 16, num_layers=2, num_heads=2,
                                    d_model=16, mlp_width=32, memory_len=4)
  params = model.init(jax.random.key(0))
  protos, _, note = export.convert_step(model, params, 7,
                                        fallback_batch_sizes=(1, 3))
  assert list(protos) in ([None], [1, 3]), (list(protos), note)
  for batch in (1, 3):
    # 30 steps with memory 4: the ring buffer wraps and episodes restart.
    assert _step_both(model, params, protos, batch) <= 1e-5

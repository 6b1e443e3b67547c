"""ald_jax.latency: step-latency measurement and the latency-budget check."""
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ald_jax import config as config_lib
from ald_jax import latency
from ald_jax import networks
from envs import registry

needs_onnx = pytest.mark.skipif(not latency.onnx_available(),
                                reason="jax2onnx/onnxruntime not installed")


@pytest.fixture(scope="module")
def lstm():
  model = networks.make_lstm_model(6, 3, 16, 32)
  return model, model.init(jax.random.key(0))


def _assert_positive_finite(stats):
  for key in ("median_us", "mean_us", "p10_us", "p90_us", "min_us"):
    assert math.isfinite(stats[key]) and stats[key] > 0, stats
  assert stats["min_us"] <= stats["median_us"] <= stats["p90_us"]


@pytest.mark.parametrize("runtime", [
    "jax", pytest.param("onnx", marks=needs_onnx)])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_step_and_floor_latency_are_positive_and_finite(lstm, runtime,
                                                        batch_size):
  model, params = lstm
  step = latency.measure_step_latency_us(model, params, batch_size,
                                         runtime=runtime, calls=30, warmup=3)
  _assert_positive_finite(step)
  assert step["runtime"] == runtime and step["batch_size"] == batch_size
  assert step["calls"] == 30 and step["warmup"] == 3
  floor = latency.measure_floor_latency_us(model, params, batch_size,
                                           runtime=runtime, calls=30,
                                           warmup=3)
  _assert_positive_finite(floor)


def test_time_calls_counts_the_calls():
  calls = []
  stats = latency.time_calls_us(lambda: calls.append(1), calls=7, warmup=2)
  assert len(calls) == 9 and stats["calls"] == 7
  _assert_positive_finite(stats)


@needs_onnx
def test_onnx_floor_model_returns_its_inputs(lstm):
  from ald_jax import deploy  # pylint: disable=g-import-not-at-top
  from ald_jax import export  # pylint: disable=g-import-not-at-top
  model, _ = lstm
  signature = export.step_signature(model)
  session = deploy.make_session(
      latency.identity_model_bytes(signature, 6), batch_size=2)
  feeds = {"observation": np.ones((2, 6), np.float32),
           "start": np.array([True, False]),
           "state_cell": np.full((2, 32), 2.0, np.float32),
           "state_hidden": np.full((2, 32), 3.0, np.float32)}
  outputs = session.run(None, feeds)
  for value, name in zip(outputs, feeds):
    np.testing.assert_array_equal(value, feeds[name])


def test_budget_over_raises_the_one_line_message():
  with pytest.raises(ValueError) as err:
    latency.check_latency_budget(123.45, 100, batch_size=16)
  assert str(err.value) == (
      "actor_latency_budget_us: acting step takes 123.5 us at batch 16 (jax), "
      "over the budget of 100 us")
  with pytest.raises(ValueError, match=r"\(onnx\), over the budget of 50 us"):
    latency.check_latency_budget(60.0, 50, batch_size=1, runtime="onnx")


def test_budget_under_or_off_passes():
  latency.check_latency_budget(99.9, 100, batch_size=1)
  latency.check_latency_budget(100.0, 100, batch_size=1)  # at the budget
  latency.check_latency_budget(1e9, 0, batch_size=1)      # 0: off


def test_budget_rejects_a_meaningless_measurement():
  for bad in (0.0, -1.0, math.nan, math.inf):
    with pytest.raises(ValueError, match="measured_us"):
      latency.check_latency_budget(bad, 100, batch_size=1)


@pytest.mark.parametrize("kwargs, name", [
    ({"runtime": "tpu"}, "runtime"), ({"calls": 0}, "calls"),
    ({"warmup": -1}, "warmup")])
def test_bad_measurement_arguments(lstm, kwargs, name):
  model, params = lstm
  with pytest.raises(ValueError, match=name):
    latency.measure_step_latency_us(model, params, 1, **kwargs)
  with pytest.raises(ValueError, match="batch_size"):
    latency.measure_step_latency_us(model, params, 0)


def test_acting_latency_of_a_config():
  config = config_lib.Config(env="recall", agent="ald", num_envs=4,
                             lstm_hidden=16, encoder_hidden=16)
  env = registry.make("recall")
  report = latency.measure_acting_latency(config, env, calls=20, warmup=2)
  assert report["acting_model"] == "actor" and report["model"] == "LSTM-16"
  assert report["batch_size"] == max(4 // jax.local_device_count(), 1)
  _assert_positive_finite(report["jax"])
  if latency.onnx_available():
    _assert_positive_finite(report["onnx"])
  gtrxl = latency.measure_acting_latency(
      config_lib.Config(env="recall", agent="gtrxl", gtrxl_layers=1,
                        gtrxl_d_model=16, gtrxl_heads=2, gtrxl_mlp_width=16,
                        gtrxl_memory_len=4),
      env, batch_size=1, runtimes=("jax",), calls=20, warmup=2)
  assert gtrxl["acting_model"] == "learner" and "onnx" not in gtrxl
  _assert_positive_finite(gtrxl["jax"])


# ------------------------------------------------- experiments/fit_budget.py

FIT_BUDGET = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "experiments", "fit_budget.py")


def _fit_budget(*args):
  return subprocess.run([sys.executable, FIT_BUDGET, *args],
                        capture_output=True, text=True, timeout=300,
                        check=False, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_fit_budget_prints_the_table_and_the_largest_fit():
  runtimes = "jax,onnx" if latency.onnx_available() else "jax"
  result = _fit_budget("--budget_us=1e6", "--lstm_widths=8,16",
                       "--gtrxl_layers=1", "--gtrxl_widths=8",
                       "--gtrxl_memory=2", f"--runtimes={runtimes}",
                       "--calls=10", "--warmup=2")
  assert result.returncode == 0, result.stderr[-2000:]
  for name in ("| LSTM-8 |", "| LSTM-16 |", "| GTrXL-L1-D8-M2 |"):
    assert name in result.stdout, result.stdout
  assert ("largest LSTM within 1e+06 us at batch 1, jitted JAX: LSTM-16"
          in result.stdout), result.stdout
  tight = _fit_budget("--budget_us=0.001", "--lstm_widths=8",
                      "--gtrxl_layers=", "--runtimes=jax", "--calls=5",
                      "--warmup=1")
  assert tight.returncode == 0, tight.stderr[-2000:]
  assert "jitted JAX: none of the candidates" in tight.stdout
  assert "GTrXL" not in tight.stdout


@pytest.mark.parametrize("args, flag", [
    ([], "--budget_us"), (["--budget_us=-5"], "--budget_us"),
    (["--budget_us=100", "--runtimes=tpu"], "--runtimes"),
    (["--budget_us=100", "--lstm_widths=a"], "--lstm_widths"),
    (["--budget_us=100", "--gtrxl_widths=30"], "--gtrxl_widths"),
])
def test_fit_budget_bad_flags_are_one_line(args, flag):
  result = _fit_budget(*args)
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("fit_budget.py: error: "), (
      result.stderr)
  assert flag in lines[0]


# ------------------------------------------- --actor_latency_budget_us ---

_RUN_FLAGS = ["--agent=lstm", "--env=recall", "--num_envs=4",
              "--unroll_length=4", "--total_env_steps=64", "--lstm_hidden=8",
              "--encoder_hidden=8", "--eval_episodes=2"]


def _run_py(tmp_path, *flags):
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.run(
      [sys.executable, os.path.join(repo, "experiments", "run.py"),
       f"--logdir={tmp_path / 'run'}"] + _RUN_FLAGS + list(flags),
      capture_output=True, text=True, timeout=300, cwd=repo, check=False,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_run_over_the_latency_budget_stops_before_training(tmp_path):
  result = _run_py(tmp_path, "--actor_latency_budget_us=0.5")
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in result.stderr
  assert lines[0].startswith("run.py: error: --actor_latency_budget_us: "
                             "acting step takes "), lines[0]
  assert "over the budget of 0.5 us" in lines[0]
  assert not (tmp_path / "run").exists()


def test_run_within_a_generous_budget_trains_and_records_it(tmp_path):
  import json
  result = _run_py(tmp_path, "--actor_latency_budget_us=1000000",
                   "--actor_latency_runtime=onnx")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "budget 1e+06 us (onnx)" in result.stdout
  with open(tmp_path / "run" / "actor_latency.json") as f:
    report = json.load(f)
  assert report["batch_size"] == 4
  for runtime in ("jax", "onnx"):
    assert 0 < report[runtime]["median_us"] < 1e6, report

"""What a run guarantees after bad input, NaN, a crash, corruption or a rival.

Subprocess tests of experiments/run.py (exit codes and one-line errors) and
in-process tests of the logdir lock, the verified resume and the metrics
record. The promises are listed in docs/reliability.md.
"""
import csv
import dataclasses
import glob
import importlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ald_jax import checkpointing
from ald_jax import logdir_lock
from ald_jax.config import Config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_PY = os.path.join(REPO, "experiments", "run.py")
TINY_FLAGS = [
    "--agent=ald", "--env=recall", "--env_args=delay=2", "--num_envs=8",
    "--unroll_length=8", "--encoder_hidden=16", "--lstm_hidden=16",
    "--gtrxl_layers=1", "--gtrxl_heads=2", "--gtrxl_d_model=16",
    "--gtrxl_mlp_width=16", "--gtrxl_memory_len=4", "--replay_segments=2",
    "--eval_episodes=8"]


def _run(args, timeout=300, **kw):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, RUN_PY] + list(args),
                        capture_output=True, text=True, timeout=timeout,
                        env=env, cwd=REPO, check=False, **kw)


def _assert_one_line_error(result, code, *needles):
  assert result.returncode == code, (result.returncode, result.stderr[-3000:])
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr[-3000:]
  assert lines[0].startswith("run.py: error: "), lines[0]
  for needle in needles:
    assert needle in lines[0], lines[0]
  assert "Traceback" not in result.stderr + result.stdout
  return lines[0]


# ------------------------------------------------------------ bad inputs ---


@pytest.fixture(scope="module")
def not_a_directory(tmp_path_factory):
  path = tmp_path_factory.mktemp("file") / "plain_file"
  path.write_text("x")
  return str(path)


BAD_INPUTS = [
    # (flags, text the one line must contain)
    (["--env=tests.fault_envs:returns_none"], "--env: "),
    (["--env=tests.fault_envs:not_an_env"], "is not an environment"),
    (["--env=tests.fault_envs:no_success"], "missing success"),
    (["--env=imaze", "--env_args=corridor_length=2.5"], "--env_args: "),
    (["--env=tests.fault_envs:wrong_observation_size"], "observation"),
    (["--env=tests.fault_envs:int_observations"], "int32"),
    (["--env=tests.fault_envs:half_rewards"], "float16"),
    (["--learner_learning_rate=inf"], "--learner_learning_rate: "),
    (["--vmpo_eps_eta=nan"], "--vmpo_eps_eta: "),
    (["--num_envs=100000000", "--unroll_length=100",
      "--total_env_steps=20000000000"], "--num_envs: "),
    (["--gtrxl_d_model=65536", "--gtrxl_heads=1"], "GiB"),
    (["--flagfile=/no/such/file.cfg"], "--flagfile: no such file"),
]


@pytest.mark.parametrize("args,needle", BAD_INPUTS,
                         ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_creates_nothing(tmp_path, args,
                                                         needle):
  logdir = tmp_path / "run"
  result = _run([f"--logdir={logdir}"] + args, timeout=120)
  _assert_one_line_error(result, 2, needle)
  assert not logdir.exists()


def test_unwritable_logdir_is_one_line(not_a_directory):
  result = _run([f"--logdir={not_a_directory}/run"], timeout=120)
  _assert_one_line_error(result, 2, "--logdir: ", "not a directory")


def test_only_check_args_validates(tmp_path):
  logdir = tmp_path / "run"
  bad = _run([f"--logdir={logdir}", "--only_check_args", "--num_envs=-1"])
  _assert_one_line_error(bad, 2, "--num_envs")
  good = _run([f"--logdir={logdir}", "--only_check_args"])
  assert good.returncode == 0, good.stderr
  assert not logdir.exists()


# ------------------------------------------------------------- NaN guard ---


def test_nan_from_the_env_stops_with_exit_3_and_keeps_good_checkpoints(
    tmp_path):
  logdir = str(tmp_path / "run")
  # Rewards turn NaN at env step 51: inside iteration 7 (8 steps each).
  result = _run([f"--logdir={logdir}", "--env=tests.fault_envs:nan_after",
                 "--env_args=steps=50", "--total_env_steps=1280",
                 "--checkpoint_every_iterations=2"]
                + [f for f in TINY_FLAGS if not f.startswith("--env")])
  line = _assert_one_line_error(result, 3, "non-finite", "iteration 7",
                                "env rewards/observations")
  assert "up to iteration 6" in line
  assert not os.path.exists(os.path.join(logdir, "eval.json"))
  directory = os.path.join(logdir, "checkpoints")
  with checkpointing.Checkpointer(directory) as ckpt:
    steps = ckpt.all_steps()
    assert steps == [2, 4, 6], steps
    for step in steps:  # verified and finite, or this raises
      tree = ckpt.restore(step, require_finite=True)
      assert int(np.ravel(tree["iteration"])[0]) == step


def test_nonfinite_flag_of_the_trainer_names_the_quantity():
  training = importlib.import_module("ald_jax.training")
  config = Config(agent="ald", env="recall", env_args="delay=2", num_envs=8,
                  unroll_length=8, encoder_hidden=16, lstm_hidden=16,
                  gtrxl_layers=1, gtrxl_heads=2, gtrxl_d_model=16,
                  gtrxl_mlp_width=16, gtrxl_memory_len=4, replay_segments=2,
                  total_env_steps=10**6)
  from envs import registry
  trainer = training.make_trainer(config, registry.make("recall", delay=2))
  state = trainer.init()
  state, metrics = trainer.train_iteration(state)
  assert int(metrics["nonfinite"]) == 0
  host = trainer.to_host(state)
  policy = host.params["learner"]["params"]["heads"]["policy"]
  policy["kernel"] = np.full_like(policy["kernel"], np.nan)
  state, metrics = trainer.train_iteration(trainer.from_host(host))
  names = training.describe_nonfinite(int(metrics["nonfinite"]))
  assert "RL loss" in names and "RL-trained params" in names, names
  assert "env rewards/observations" not in names
  # A step so large that the learner blows up within one iteration: its
  # params stay finite (1e30-sized), what it feeds the distillation is not.
  huge = training.make_trainer(
      dataclasses.replace(config, learner_learning_rate=1e30),
      registry.make("recall", delay=2))
  _, metrics = huge.train_iteration(huge.init())
  names = training.describe_nonfinite(int(metrics["nonfinite"]))
  assert "distillation loss" in names, names


# ------------------------------------------------------------ logdir lock ---


_HOLD_LOCK = """
import sys, time
sys.path.insert(0, {repo!r})
from ald_jax import logdir_lock
with logdir_lock.LogdirLock({logdir!r}):
  print("LOCKED", flush=True)
  time.sleep(60)
"""


def test_lock_is_exclusive_while_held_and_taken_over_when_stale(tmp_path):
  logdir = str(tmp_path / "run")
  holder = subprocess.Popen(
      [sys.executable, "-c", _HOLD_LOCK.format(repo=REPO, logdir=logdir)],
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "LOCKED"
    with pytest.raises(logdir_lock.LogdirBusyError,
                       match=f"in use by another run \\(pid {holder.pid} "):
      logdir_lock.LogdirLock(logdir).acquire()
  finally:
    os.kill(holder.pid, signal.SIGKILL)  # dies holding it: a stale lock
    holder.wait()
  with open(os.path.join(logdir, logdir_lock.LOCK_FILE)) as f:
    assert json.load(f)["pid"] == holder.pid  # the dead owner's record
  with logdir_lock.LogdirLock(logdir) as lock:
    assert lock.note and f"pid {holder.pid}" in lock.note
  with logdir_lock.LogdirLock(logdir) as lock:  # released cleanly: no note
    assert lock.note is None


def test_second_run_in_a_logdir_stops_and_the_first_is_intact(tmp_path):
  logdir = str(tmp_path / "run")
  first = subprocess.Popen(
      [sys.executable, RUN_PY, f"--logdir={logdir}", "--total_env_steps=40000",
       "--checkpoint_every_iterations=0", "--log_every_seconds=0.5"]
      + TINY_FLAGS, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  try:
    lock_path = os.path.join(logdir, logdir_lock.LOCK_FILE)
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(logdir, "metrics.csv")):
      assert first.poll() is None and time.time() < deadline, first.stderr
      time.sleep(0.2)
    with open(lock_path) as f:
      assert json.load(f)["pid"] == first.pid
    second = _run([f"--logdir={logdir}", "--seed=7"] + TINY_FLAGS)
    _assert_one_line_error(second, 2, "--logdir: ", "in use by another run",
                           f"pid {first.pid}")
    out, err = first.communicate(timeout=300)
  finally:
    if first.poll() is None:
      os.kill(first.pid, signal.SIGKILL)
  assert first.returncode == 0, err[-3000:]
  with open(os.path.join(logdir, "config.json")) as f:
    assert json.load(f)["seed"] == 0
  rows = _csv_rows(logdir)
  assert rows and all(len(row) == len(rows[0]) and None not in row
                      for row in rows)
  assert int(rows[-1]["env_steps"]) >= 40000
  assert os.path.exists(os.path.join(logdir, "eval.json"))


def _csv_rows(logdir):
  with open(os.path.join(logdir, "metrics.csv"), newline="") as f:
    return list(csv.DictReader(f))


# ------------------------------------------------------ verified resume ---


@pytest.fixture(scope="module")
def tiny():
  """A tiny ald trainer and config, shared (compiled once)."""
  training = importlib.import_module("ald_jax.training")
  from envs import registry
  config = Config(agent="ald", env="recall", env_args="delay=2", num_envs=8,
                  unroll_length=8, encoder_hidden=16, lstm_hidden=16,
                  gtrxl_layers=1, gtrxl_heads=2, gtrxl_d_model=16,
                  gtrxl_mlp_width=16, gtrxl_memory_len=4, replay_segments=2,
                  checkpoint_every_iterations=2, log_every_seconds=1e9,
                  eval_episodes=8)
  env = registry.make("recall", delay=2)
  return config, env, training.make_trainer(config, env)


def _train(tiny, logdir, iterations, resume=False):
  config, env, trainer = tiny
  run = importlib.import_module("experiments.run")
  config = dataclasses.replace(
      config, logdir=logdir, resume=resume,
      total_env_steps=iterations * config.env_steps_per_iteration)
  out = io.StringIO()
  state, _ = run.train(config, env, trainer=trainer, stream=out)
  return trainer.to_host(state), out.getvalue()


def _flip_bytes(directory, step):
  for root, _, names in os.walk(os.path.join(directory, str(step))):
    for name in names:
      if os.path.basename(root) == "d":
        with open(os.path.join(root, name), "r+b") as f:
          data = bytearray(f.read())
          for i in range(0, len(data), 5):
            data[i] ^= 0xFF
          f.seek(0)
          f.write(data)


def test_corrupt_latest_checkpoint_falls_back_and_equals_resuming_from_it(
    tiny, tmp_path):
  straight, _ = _train(tiny, str(tmp_path / "straight"), 8)
  logdir = str(tmp_path / "split")
  _train(tiny, logdir, 6)  # checkpoints 2, 4, 6
  _flip_bytes(os.path.join(logdir, "checkpoints"), 6)
  resumed, out = _train(tiny, logdir, 8, resume=True)
  warnings = [l for l in out.splitlines() if l.startswith("warning:")]
  assert len(warnings) == 1 and "checkpoint 6" in warnings[0], out
  assert "iterations 4->8" in out
  # Resuming from 4 and training to 8 is the uninterrupted run (deterministic).
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  # Rows: the first iteration's, checkpoints 2 and 4 kept; the 6 written
  # before the fallback dropped; then the resumed run's first line, 6, 8.
  rows = _csv_rows(logdir)
  assert [int(r["iteration"]) for r in rows] == [1, 2, 4, 5, 6, 8]


def test_failed_resume_writes_nothing(tiny, tmp_path):
  logdir = str(tmp_path / "run")
  _train(tiny, logdir, 2)
  config_path = os.path.join(logdir, "config.json")
  with open(config_path) as f:
    saved = f.read()
  flags = [f"--logdir={logdir}", "--resume", "--total_env_steps=640",
           "--checkpoint_every_iterations=2", "--log_every_seconds=1e9"] + [
               f for f in TINY_FLAGS if f != "--eval_episodes=8"] + [
                   "--eval_episodes=8"]
  # Another config than the saved one.
  bad = _run(flags + ["--lstm_hidden=8"])
  _assert_one_line_error(bad, 2, "--lstm_hidden: differs")
  with open(config_path) as f:
    assert f.read() == saved
  # config.json gone and another agent: the checkpoint's structure differs.
  os.remove(config_path)
  bad = _run([f for f in flags if f != "--agent=ald"] + ["--agent=lstm"])
  _assert_one_line_error(bad, 2, "--resume: ", "another structure")
  assert not os.path.exists(config_path)
  assert not os.path.exists(os.path.join(logdir, "eval.json"))
  with checkpointing.Checkpointer(os.path.join(logdir, "checkpoints")) as ckpt:
    assert ckpt.all_steps() == [2]


def test_resume_on_another_device_count_is_one_line(tiny, tmp_path):
  config, _, trainer = tiny
  logdir = str(tmp_path / "run")
  run = importlib.import_module("experiments.run")
  # What a 2-device run would have saved: every leaf with 2 device rows.
  host = trainer.to_host(trainer.init())
  two = jax.tree.map(lambda x: np.concatenate([x, x]), host)
  run.write_config_json(dataclasses.replace(config, logdir=logdir))
  with checkpointing.Checkpointer(os.path.join(logdir, "checkpoints")) as ckpt:
    ckpt.save(3, two)
  bad = _run([f"--logdir={logdir}", "--resume", "--total_env_steps=640",
              "--checkpoint_every_iterations=2", "--log_every_seconds=1e9"]
             + TINY_FLAGS)
  _assert_one_line_error(bad, 2, "--num_devices: ", "2 device(s)")


# ----------------------------------------------------- metrics after kill ---


def _wait_for_rows(logdir, process, count, timeout=240):
  deadline = time.time() + timeout
  while True:
    assert process.poll() is None, "finished before it could be killed"
    assert time.time() < deadline
    try:
      if len(_csv_rows(logdir)) >= count:
        return
    except (OSError, KeyError):
      pass
    time.sleep(0.05)


def test_kill_9_and_resume_leaves_each_iteration_once_in_metrics(tmp_path):
  flags = ["--total_env_steps=25600", "--checkpoint_every_iterations=50",
           "--log_every_seconds=0.000001", "--eval_episodes=8"] + [
               f for f in TINY_FLAGS if f != "--eval_episodes=8"]
  straight = str(tmp_path / "straight")
  result = _run([f"--logdir={straight}"] + flags)
  assert result.returncode == 0, result.stderr[-3000:]
  logdir = str(tmp_path / "killed")
  process = subprocess.Popen(
      [sys.executable, RUN_PY, f"--logdir={logdir}"] + flags,
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  try:
    _wait_for_rows(logdir, process, 260)  # past checkpoints 50..250
  finally:
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
  result = _run([f"--logdir={logdir}", "--resume"] + flags)
  assert result.returncode == 0, result.stderr[-3000:]
  want, got = _csv_rows(straight), _csv_rows(logdir)
  iterations = [int(r["iteration"]) for r in got]
  assert iterations == list(range(1, 401)), (iterations[:3], len(iterations))
  assert [r["episodes"] for r in got] == [r["episodes"] for r in want]
  assert sum(float(r["episodes"]) for r in got) == sum(
      float(r["episodes"]) for r in want)


# ------------------------------------------------------------ recompiles ---


def _weak_trainer_run(tmp_path, env):
  training = importlib.import_module("ald_jax.training")
  run = importlib.import_module("experiments.run")
  config = Config(agent="lstm", env="tests.fault_envs:weak_state",
                  num_envs=4, unroll_length=4, encoder_hidden=8,
                  lstm_hidden=8, total_env_steps=4 * 4 * 3,
                  checkpoint_every_iterations=0, log_every_seconds=1e9,
                  logdir=str(tmp_path))
  out = io.StringIO()
  run.train(config, env, trainer=training.make_trainer(config, env),
            stream=out)
  return out.getvalue()


def test_weak_typed_env_state_compiles_once(tmp_path):
  run = importlib.import_module("experiments.run")
  fault_envs = importlib.import_module("tests.fault_envs")
  config = Config(env="tests.fault_envs:weak_state")
  env = run.build_env(config)  # wraps it in StrongTypes
  out = _weak_trainer_run(tmp_path / "wrapped", env)
  assert "compiled again" not in out, out
  # Without the wrapper the iteration's input types change after one step:
  # the loop notices and names the leaf.
  out = _weak_trainer_run(tmp_path / "raw", fault_envs.weak_state())
  line = [l for l in out.splitlines() if "compiled again" in l]
  assert len(line) == 1 and "at iteration 2" in line[0], out
  assert "env_state" in line[0] and "(weak)" in line[0], line


def test_env_overridden_on_a_flagfile_names_where_env_args_came_from(
    tmp_path):
  logdir = tmp_path / "run"
  result = _run(["--flagfile=experiments/configs/imaze_ald.cfg",
                 "--env=recall", f"--logdir={logdir}"], timeout=120)
  _assert_one_line_error(result, 2, "--env_args: ", "comes from the flagfile",
                         "corridor_length=4")
  assert not logdir.exists()
  # Giving --env_args for the new env is the fix.
  result = _run(["--flagfile=experiments/configs/imaze_ald.cfg",
                 "--env=recall", "--env_args=delay=3", f"--logdir={logdir}",
                 "--only_check_args"], timeout=120)
  assert result.returncode == 0, result.stderr


def test_env_demo_takes_env_args():
  demo = os.path.join(REPO, "experiments", "env_demo.py")
  result = subprocess.run(
      [sys.executable, demo, "--env=imaze", "--env_args=corridor_length=2",
       "--steps=1"], capture_output=True, text=True, timeout=120, cwd=REPO,
      check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  maze = result.stdout.split("\n\n")[0].splitlines()[1:]
  assert len(maze) == 6  # top wall, top row, corridor of 2, bottom row, wall
  bad = subprocess.run(
      [sys.executable, demo, "--env=imaze", "--env_args=corridor_lenth=2"],
      capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
  assert bad.returncode != 0 and "corridor_lenth" in bad.stderr


# --------------------------------------------------- the distributed runtime ---


def test_run_py_distributed_writes_the_same_logdir_and_leaves_no_ray(
    tmp_path):
  logdir = tmp_path / "run"
  result = _run([f"--logdir={logdir}", "--runtime=distributed",
                 "--agent=lstm", "--env=recall", "--env_args=delay=2",
                 "--num_envs=8", "--num_actors=1", "--envs_per_actor=8",
                 "--unroll_length=8", "--encoder_hidden=16",
                 "--lstm_hidden=16", "--total_env_steps=640",
                 "--checkpoint_every_iterations=4", "--eval_episodes=8",
                 "--ray_num_cpus=2"], timeout=400)
  assert result.returncode == 0, result.stderr[-3000:]
  for name in ("config.json", "metrics.csv", "eval.json", "checkpoints",
               logdir_lock.LOCK_FILE):
    assert (logdir / name).exists(), name
  assert glob.glob(str(logdir / "events.out.tfevents.*"))
  with checkpointing.Checkpointer(str(logdir / "checkpoints")) as ckpt:
    step = ckpt.latest_step()
    tree = ckpt.restore(step, require_finite=True)  # verified
  assert int(np.asarray(tree["counters"]["env_steps"])) >= 640
  with open(logdir / "eval.json") as f:
    assert json.load(f)["eval_episodes"] == 8

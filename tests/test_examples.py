"""The scripts under docs/examples run end to end and print their metrics."""
import math
import os
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_example(name: str) -> str:
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
  result = subprocess.run(
      [sys.executable, str(REPO / "docs" / "examples" / name)], env=env,
      cwd=str(REPO), capture_output=True, text=True, timeout=180)
  assert result.returncode == 0, result.stdout + result.stderr
  return result.stdout


def test_compose_losses_example():
  out = run_example("compose_losses.py")
  learner = re.search(r"^learner: .*$", out, re.M)
  actor = re.search(r"^actor: .*$", out, re.M)
  assert learner and actor, out
  for line, key in [(learner.group(0), "policy_loss"),
                    (learner.group(0), "kl_target"),
                    (actor.group(0), "kl_learner_actor")]:
    match = re.search(rf"\b{key}=(\S+)", line)
    assert match, (key, line)
    assert math.isfinite(float(match.group(1))), line
  assert re.search(r"after one step: eta=\S+ alpha=\S+", out), out

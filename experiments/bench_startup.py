"""Start-up time of the README's main command, cold and warm.

Runs `experiments/run.py --flagfile=experiments/configs/imaze_ald.cfg` (a
short budget, a fresh logdir each time) as a subprocess and measures the wall
time from launch to the first progress line (`[  ...s] it 1 ...`, printed
right after the first, compiling, iteration). 'cold': an empty compilation
cache directory; 'warm': the same directory again, so every compiled program
comes from JAX's persistent cache. Also times `import` of the libraries alone
(the floor). Medians over `--repeats`; prints a Markdown table.

    python experiments/bench_startup.py [--repeats=3] [--flagfile=...]
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from experiments import bench_utils  # pylint: disable=g-import-not-at-top

_REPEATS = flags.DEFINE_integer("repeats", 3, "Runs of each case (median).")
_FLAGFILE = flags.DEFINE_string(
    "flagfile_to_time", "experiments/configs/imaze_ald.cfg",
    "The run.py flagfile whose start-up is measured.")
_IMPORTS = ("import jax, flax, optax, orbax.checkpoint, tensorboardX; "
            "import ald_jax.training")


def _time_to_first_line(logdir: str, cache_dir: str) -> float:
  start = time.monotonic()
  process = subprocess.Popen(
      [sys.executable, os.path.join(REPO, "experiments", "run.py"),
       f"--flagfile={_FLAGFILE.value}", f"--logdir={logdir}",
       "--total_env_steps=20000", f"--compilation_cache_dir={cache_dir}"],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  try:
    for line in process.stdout:
      if line.startswith("[") and " it " in line:
        return time.monotonic() - start
    raise RuntimeError(f"run.py exited ({process.wait()}) before a progress "
                       f"line")
  finally:
    process.kill()
    process.wait()


def _time_imports() -> float:
  start = time.monotonic()
  subprocess.run([sys.executable, "-c", _IMPORTS], cwd=REPO, check=True)
  return time.monotonic() - start


def main(argv):
  del argv
  cold, warm, imports = [], [], []
  with tempfile.TemporaryDirectory() as tmp:
    for repeat in range(_REPEATS.value):
      cache = os.path.join(tmp, f"cache{repeat}")
      cold.append(_time_to_first_line(os.path.join(tmp, f"c{repeat}"), cache))
      warm.append(_time_to_first_line(os.path.join(tmp, f"w{repeat}"), cache))
      imports.append(_time_imports())
  print(bench_utils.machine_description())
  print(f"\n`run.py --flagfile={_FLAGFILE.value}`, launch to the first "
        f"progress line, median of {_REPEATS.value}\n")
  print("| case | seconds | runs |")
  print("|---|---:|---|")
  for name, values in (("imports only (floor)", imports),
                       ("cold (empty compilation cache)", cold),
                       ("warm (compilation cache filled)", warm)):
    print(f"| {name} | {statistics.median(values):.1f} | "
          f"{', '.join(f'{v:.1f}' for v in values)} |")
  print(f"\nwarm / cold = {statistics.median(warm) / statistics.median(cold):.2f}")


if __name__ == "__main__":
  app.run(main)

"""What the benchmark scripts share: a description of the machine they ran on."""
import os
import platform

import jax


def machine_description() -> str:
  """One line: CPU model, core count, JAX version and backend devices."""
  cpu = platform.processor() or "unknown CPU"
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
  return (f"CPU: {cpu}; {os.cpu_count()} cores; jax {jax.__version__}; "
          f"backend {jax.default_backend()} ({devices})")

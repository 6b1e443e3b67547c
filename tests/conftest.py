"""Test-wide settings, applied before any test imports JAX."""
import os

# XLA sizes its CPU thread pool from the core count; on 2-core machines, programs
# with cross-device collectives can deadlock unless it is told there are more.
os.environ.setdefault("NPROC", "4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

"""Pure-JAX memory environments and dm_env adapters."""
from envs.api import Environment
from envs.api import StepType
from envs.api import TimeStep
from envs.imaze import IMaze
from envs.metafetch import MetaFetch
from envs.recall import Recall
from envs.registry import make

__all__ = [
    "Environment", "StepType", "TimeStep", "IMaze", "MetaFetch", "Recall",
    "make"
]

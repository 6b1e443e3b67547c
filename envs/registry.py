"""Environments by name: `make("imaze", corridor_length=8)`."""
from __future__ import annotations

import importlib
from typing import Any, Callable, Dict

from envs import api
from envs.imaze import IMaze
from envs.metafetch import MetaFetch
from envs.recall import Recall

_BUILTIN: Dict[str, Callable[..., api.Environment]] = {
    "recall": Recall,
    "imaze": IMaze,
    "metafetch": MetaFetch,
}


def make(name: str, **kwargs: Any) -> api.Environment:
  """Builds an environment.

  Args:
    name: one of "recall", "imaze", "metafetch", or "package.module:factory"
      naming any callable that returns an environment following `envs.api`
      (e.g. a user's own environment class).
    **kwargs: constructor arguments (validated by the environment).
  Returns:
    The environment.
  Raises:
    ValueError: for an unknown name, a module that cannot be imported or a
      missing factory.
  """
  if name in _BUILTIN:
    return _BUILTIN[name](**kwargs)
  if ":" in name:
    module_name, _, factory_name = name.partition(":")
    if not module_name or not factory_name:
      raise ValueError(
          f"name must look like 'package.module:factory', got {name!r}")
    try:
      module = importlib.import_module(module_name)
    except ImportError as e:
      raise ValueError(f"name {name!r}: cannot import module "
                       f"{module_name!r} ({e})") from e
    factory = getattr(module, factory_name, None)
    if not callable(factory):
      raise ValueError(f"name {name!r}: module {module_name!r} has no "
                       f"callable {factory_name!r}")
    return factory(**kwargs)
  raise ValueError(f"name must be one of {sorted(_BUILTIN)} or "
                   f"'package.module:factory', got {name!r}")

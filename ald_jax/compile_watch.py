"""Compilation: JAX's persistent cache, and telling a recompile apart.

* `enable_persistent_cache(directory)` turns on JAX's on-disk compilation
  cache, so that a second identical run loads its compiled programs instead
  of compiling them again (the training iteration takes tens of seconds to
  compile on a small CPU).
* `CompileEvents` counts JAX's tracing, compilation and cache-hit events
  (through `jax.monitoring`), so that a loop can notice that a call it
  expected to be cached compiled again.
* `input_signature(tree)` and `signature_change(old, new)` say why: which
  leaf changed shape, dtype or weak type between two calls.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Dict, List, Optional, Tuple

import jax
import numpy as np

# Keep the cache from growing without bound (bytes; JAX evicts LRU entries).
CACHE_MAX_BYTES = 2 * 2**30

_TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_CACHE_REQUEST_EVENT = "/jax/compilation_cache/compile_requests_use_cache"


def resolve_cache_dir(setting: str) -> Optional[str]:
  """The cache directory for a `--compilation_cache_dir` value ('none': off).

  An empty setting means the default, under $XDG_CACHE_HOME (or ~/.cache).
  """
  if setting.strip().lower() == "none":
    return None
  if not setting.strip():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "ald_jax", "jax_compilation_cache")
  return os.path.abspath(os.path.expanduser(setting))


def enable_persistent_cache(directory: str) -> None:
  """Caches every compiled program under `directory` (created if needed)."""
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  # The defaults skip programs that compile in under a second; on a loaded
  # 2-core machine those add up too.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)


class CompileEvents:
  """Process-wide counts of traces, backend compiles and cache hits.

  Listeners are registered once per process; `counts()` is a snapshot.
  """
  _lock = threading.Lock()
  _counts = {"traces": 0, "compiles": 0, "cache_requests": 0,
             "cache_hits": 0, "compile_seconds": 0.0}
  _registered = False

  @classmethod
  def install(cls) -> "type[CompileEvents]":
    with cls._lock:
      if not cls._registered:
        jax.monitoring.register_event_duration_secs_listener(cls._on_duration)
        jax.monitoring.register_event_listener(cls._on_event)
        cls._registered = True
    return cls

  @classmethod
  def _on_duration(cls, event: str, seconds: float, **_) -> None:
    with cls._lock:
      if event == _TRACE_EVENT:
        cls._counts["traces"] += 1
      elif event == _COMPILE_EVENT:
        cls._counts["compiles"] += 1
        cls._counts["compile_seconds"] += seconds

  @classmethod
  def _on_event(cls, event: str, **_) -> None:
    key = {_CACHE_HIT_EVENT: "cache_hits",
           _CACHE_REQUEST_EVENT: "cache_requests"}.get(event)
    if key:
      with cls._lock:
        cls._counts[key] += 1

  @classmethod
  def counts(cls) -> Dict[str, float]:
    with cls._lock:
      return dict(cls._counts)


Signature = List[Tuple[str, Tuple[int, ...], str, bool]]


def input_signature(tree: Any) -> Signature:
  """(leaf path, shape, dtype, weak_type) of every array leaf of `tree`."""
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out.append((jax.tree_util.keystr(path), tuple(np.shape(leaf)),
                str(getattr(leaf, "dtype", type(leaf).__name__)),
                bool(getattr(leaf, "weak_type", False))))
  return out


def _describe(entry) -> str:
  _, shape, dtype, weak = entry
  return f"{dtype}{list(shape)}{' (weak)' if weak else ''}"


def signature_change(old: Signature, new: Signature, limit: int = 3) -> str:
  """What differs between two input signatures, in a few words."""
  if [e[0] for e in old] != [e[0] for e in new]:
    return "the structure of the input changed"
  changes = [f"{n[0]}: {_describe(o)} -> {_describe(n)}"
             for o, n in zip(old, new) if o != n]
  if not changes:
    return "same input types (a new static argument or a cleared cache)"
  more = f" and {len(changes) - limit} more" if len(changes) > limit else ""
  return "; ".join(changes[:limit]) + more

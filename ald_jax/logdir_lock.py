"""One owner per logdir: an advisory lock file held for a run's lifetime.

    with LogdirLock(logdir) as lock:    # raises LogdirBusyError if held
      ...                               # lock.note: a stale lock taken over

The lock is `logdir/.lock`, holding the owner's pid, host and start time, and
locked with `fcntl.flock`, which the kernel releases when the owner dies (even
by `kill -9`): a lock file left by a dead process is stale and is taken over,
with a note naming the dead owner. Advisory: it protects against another
ald_jax run, not against other programs writing into the directory. On
network file systems without flock support it degrades to the pid check.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from typing import Optional

LOCK_FILE = ".lock"


class LogdirBusyError(ValueError):
  """Another live run holds the logdir."""


def _describe(owner: dict) -> str:
  started = owner.get("started")
  when = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
          if isinstance(started, (int, float)) else "?")
  return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, since {when}"


def _read_owner(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


class LogdirLock:
  """Exclusive ownership of a logdir (creates the directory).

  Attributes:
    path: the lock file.
    note: set when a stale lock of a dead run was taken over, else None.
  """

  def __init__(self, logdir: str):
    self.path = os.path.join(logdir, LOCK_FILE)
    self.note: Optional[str] = None
    self._fd: Optional[int] = None

  def acquire(self) -> "LogdirLock":
    """Takes the lock.

    Raises:
      LogdirBusyError: a live process holds it (message names it).
      OSError: the logdir cannot be created or written.
    """
    os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
      os.close(fd)
      if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise LogdirBusyError(
            f"logdir: {os.path.dirname(self.path)} is in use by another run "
            f"({_describe(_read_owner(self.path))}); wait for it to finish "
            f"or choose another --logdir") from err
      raise
    previous = _read_owner(self.path)
    if previous.get("pid") and previous.get("pid") != os.getpid():
      self.note = (f"took over the stale lock of a run that is gone "
                   f"({_describe(previous)})")
    owner = {"pid": os.getpid(), "host": socket.gethostname(),
             "started": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(owner).encode(), 0)
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self) -> None:
    """Releases the lock. The (emptied) file stays: removing it would let a
    process that opened it just before take a lock on a deleted file."""
    if self._fd is None:
      return
    os.ftruncate(self._fd, 0)
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  def __enter__(self) -> "LogdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()

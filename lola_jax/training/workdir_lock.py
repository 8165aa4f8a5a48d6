"""One training run per workdir: an exclusive lock file naming its holder.

`<workdir>/train.lock` is held with `fcntl.flock` for the whole run and holds JSON
{'host', 'pid', 'started'} of the holder. flock is released by the kernel when the holding
process dies, however it dies, so a lock file left behind by a crashed run is stale by
construction: the next run acquires it at once and says whose it was. A second live run fails at
once with `WorkdirLockedError` naming the holder's host and pid. On release the file is removed;
an acquirer checks after locking that the path still names the file it locked (else another run
removed and recreated it in between) and retries.

Multi-host: process 0 alone holds the lock (the workdir is shared); every process learns the
outcome, so all of them fail together instead of the others waiting in a collective.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

LOCK_NAME = "train.lock"


class WorkdirLockedError(RuntimeError):
  """Another live run holds the workdir."""


def _read_holder(path: str) -> dict:
  try:
    with open(path) as f:
      holder = json.load(f)
    return holder if isinstance(holder, dict) else {}
  except (OSError, ValueError):
    return {}


def _describe(holder: dict) -> str:
  if not holder:
    return "an unknown process (the lock file is empty or unreadable)"
  return (
    f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
    f"(started {holder.get('started', '?')})"
  )


class WorkdirLock:
  """Context manager: holds `<workdir>/train.lock` (process 0 only) or raises at once."""

  def __init__(self, workdir: str):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
    self._fd: int | None = None

  def _try_acquire(self) -> str | None:
    """Lock the file; None on success, else a description of the holder."""
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    for _ in range(10):
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        os.close(fd)
        return _describe(_read_holder(self.path))
      try:
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if not same:  # released and removed by its holder between our open and flock
        os.close(fd)
        continue
      previous = _read_holder(self.path)
      if previous:
        print(
          f"Taking over the lock {self.path} left by {_describe(previous)}, which is no longer "
          "running",
          flush=True,
        )
      holder = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
      }
      os.ftruncate(fd, 0)
      os.pwrite(fd, json.dumps(holder).encode(), 0)
      os.fsync(fd)
      self._fd = fd
      return None
    return "runs that keep creating and removing it"

  def __enter__(self) -> WorkdirLock:
    holder = self._try_acquire() if jax.process_index() == 0 else None
    ok = holder is None
    if jax.process_count() > 1:
      ok = bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))
    if not ok:
      where = holder if holder is not None else "another run (seen by process 0)"
      raise WorkdirLockedError(
        f"workdir {os.path.dirname(self.path)} is in use by {where}: one run per workdir. Wait "
        f"for it to finish or stop it, or choose another workdir (lock file {self.path})"
      )
    return self

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      try:
        os.unlink(self.path)
      except FileNotFoundError:
        pass
      os.close(self._fd)
      self._fd = None

"""One writer per workdir (DESIGN.md §10): a lock file naming the holder's process id and host.

`<workdir>/lock` holds `{"pid", "host", "started", "argv"}` of the process that trains there. It is
taken with an exclusive `flock` on the file (released by the kernel when the holder dies, so a
lock left by a killed process is taken over at once); where `flock` is not supported (some network
file systems) the recorded pid is checked instead: a dead pid on this host is a stale lock and is
taken over, a holder on another host is refused (remove the file if that run is gone). A
multi-host run holds one lock, on process 0 (the others agree through dualjax.distributed).
The file is removed on release.
"""

import errno
import fcntl
import json
import os
import pathlib
import socket
import sys
import time
from typing import Any

LOCK_FILE = "lock"


class LockError(RuntimeError):
  """The workdir is in use by another run, or cannot be written (one line)."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """An exclusive lock on a workdir; `acquire()` raises LockError naming the holder."""

  def __init__(self, workdir: str | os.PathLike):
    self.workdir = pathlib.Path(workdir)
    self.path = self.workdir / LOCK_FILE
    self._fd: int | None = None
    self.taken_over: dict[str, Any] = {}  # the record of a dead holder whose lock we took

  def holder(self) -> dict[str, Any]:
    """The recorded holder ({} if none or unreadable)."""
    try:
      rec = json.loads(self.path.read_text())
      return rec if isinstance(rec, dict) else {}
    except (OSError, ValueError):
      return {}

  def _refuse(self, rec: dict[str, Any]) -> LockError:
    since = rec.get("started")
    when = f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" if since else ""
    return LockError(f"workdir {self.workdir} is in use by process {rec.get('pid', '?')} on host "
                     f"{rec.get('host', '?')}{when} ({self.path}); one run per workdir")

  def acquire(self) -> "WorkdirLock":
    for _ in range(10):  # retries only while another process removes or replaces the file
      try:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      except OSError as e:
        raise LockError(f"workdir {self.workdir} is not writable ({e.strerror})") from None
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        supported = True
      except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
          os.close(fd)
          raise self._refuse(self.holder()) from None
        supported = False  # e.g. ENOLCK/EOPNOTSUPP: fall back to the recorded pid
      try:
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if not same:  # the holder released (removed) it between our open and flock: retry
        os.close(fd)
        continue
      if not supported:
        rec = self.holder()
        if rec and rec.get("pid") != os.getpid():
          if rec.get("host") != socket.gethostname() or _pid_alive(int(rec.get("pid", -1))):
            os.close(fd)
            raise self._refuse(rec)
      rec = self.holder()
      self.taken_over = rec if rec.get("pid") not in (None, os.getpid()) else {}
      self._fd = fd
      self._write()
      return self
    raise LockError(f"workdir {self.workdir}: could not take {self.path} (it keeps changing)")

  def _write(self) -> None:
    rec = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
           "argv": sys.argv}
    data = (json.dumps(rec) + "\n").encode()
    try:
      os.ftruncate(self._fd, 0)
      os.pwrite(self._fd, data, 0)
    except OSError as e:
      self.release()
      raise LockError(f"workdir {self.workdir} is not writable ({e.strerror})") from None

  def release(self) -> None:
    """Removes the file and unlocks (idempotent)."""
    if self._fd is None:
      return
    try:
      os.unlink(self.path)
    except OSError:
      pass
    os.close(self._fd)
    self._fd = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()

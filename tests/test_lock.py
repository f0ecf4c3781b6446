"""The workdir lock: a second holder is refused naming the first (pid, host); a lock left by a
killed process is taken over; the pid fallback where flock is unsupported."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from dualjax import lock as lock_lib

HOLD = """
import sys, time
from dualjax import lock
l = lock.WorkdirLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""


def _holder(workdir):
  env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], stdout=subprocess.PIPE,
                          text=True, env=env)
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_second_holder_is_refused_then_takes_over_after_a_kill(tmp_path):
  proc = _holder(tmp_path)
  try:
    with pytest.raises(lock_lib.LockError) as e:
      lock_lib.WorkdirLock(tmp_path).acquire()
    msg = str(e.value)
    assert f"in use by process {proc.pid} on host {socket.gethostname()}" in msg
    assert len(msg.splitlines()) == 1
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  # The killed holder's file is still there; its flock died with it: taken over.
  assert json.loads((tmp_path / "lock").read_text())["pid"] == proc.pid
  lk = lock_lib.WorkdirLock(tmp_path).acquire()
  assert lk.taken_over["pid"] == proc.pid
  assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()
  lk.release()
  assert not (tmp_path / "lock").exists()


def test_release_and_reacquire_in_process(tmp_path):
  with lock_lib.WorkdirLock(tmp_path) as lk:
    assert lk.holder()["pid"] == os.getpid()
  with lock_lib.WorkdirLock(tmp_path):
    pass
  assert list(tmp_path.iterdir()) == []


def test_pid_fallback_without_flock(tmp_path, monkeypatch):
  """Where flock is unsupported (some network file systems) the recorded pid decides."""
  def no_flock(fd, op):
    raise OSError(errno.ENOLCK, "No locks available")
  monkeypatch.setattr(lock_lib.fcntl, "flock", no_flock)
  host = socket.gethostname()
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  dead_pid = int(dead.stdout)
  (tmp_path / "lock").write_text(json.dumps({"pid": dead_pid, "host": host, "started": time.time()}))
  lk = lock_lib.WorkdirLock(tmp_path).acquire()   # a dead pid on this host: stale
  assert lk.taken_over["pid"] == dead_pid
  lk.release()
  (tmp_path / "lock").write_text(json.dumps({"pid": os.getppid(), "host": host}))
  with pytest.raises(lock_lib.LockError, match=f"in use by process {os.getppid()} on host"):
    lock_lib.WorkdirLock(tmp_path).acquire()      # alive
  (tmp_path / "lock").write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
  with pytest.raises(lock_lib.LockError, match="on host elsewhere"):
    lock_lib.WorkdirLock(tmp_path).acquire()      # another host cannot be checked: refused


def test_unwritable_workdir_is_one_line(tmp_path):
  missing = tmp_path / "no" / "such"
  with pytest.raises(lock_lib.LockError, match=r"is not writable \(No such file or directory\)"):
    lock_lib.WorkdirLock(missing).acquire()

"""`python -m launch.tpu ACTION --name=NAME --zone=ZONE [flags] [-- dualjax.main ARGS]`: Cloud TPU VMs.

Plain `gcloud` in the big_vision manner; every action is a few `gcloud compute tpus` commands.

  create   create the slice (on demand; --spot; or --queued, through a queued resource) and wait
           until it is READY
  setup    copy this checkout (tracked and untracked, not ignored files) to every worker, install it
           with its dependencies and jax[tpu] into ~/dualjax-venv, mount --nfs / --gcsfuse_bucket
  run      start `python -m dualjax.main --distributed ARGS` on all workers at once, detached; with
           several --run flags the runs go one after another (finished ones are skipped)
  status   the slice's state and the run's exit code on worker 0 (empty while it runs)
  logs     follow the training log of --worker (default 0)
  stop     SIGTERM the trainers: they save a checkpoint and exit 0; `launch` then stops too
  delete   delete the slice (and its queued resource)
  launch   create + setup + run, then watch every --poll_seconds: a preempted slice is deleted and
           created again, set up, and the run started again (the trainer resumes from its last
           checkpoint); ends when every run is finished (exit 0) or one fails (exit 1)

Zone and project: --zone / --project, else $DUALJAX_ZONE / $DUALJAX_PROJECT, else
$CLOUDSDK_COMPUTE_ZONE / $CLOUDSDK_CORE_PROJECT (no project: gcloud's configured one).
--dry_run (or --dry-run) prints the exact commands, one per line, and runs nothing. Before any
command the runs are checked against the slice: the mesh (replica x fsdp x tensor) must cover its
chips and lam must be representable; a mismatch is one line and exit code 2. Workdirs must be
paths every worker sees (an NFS share or a gcsfuse-mounted bucket; launch/README.md, 'Storage').
"""

import dataclasses
import functools
import os
import shlex
import subprocess
import sys
import tempfile
import time

from absl import flags

from dualjax import accelerators
from launch import common

FLAGS = flags.FlagValues()  # own flags: dualjax modules imported here define none globally
ACTIONS = ("create", "setup", "run", "status", "logs", "stop", "delete", "launch")

_str = functools.partial(flags.DEFINE_string, flag_values=FLAGS)
_bool = functools.partial(flags.DEFINE_bool, flag_values=FLAGS)
_int = functools.partial(flags.DEFINE_integer, flag_values=FLAGS)
_NAME = _str("name", None, "TPU VM (node) name; the queued resource is NAME-qr")
_ACCELERATOR = _str("accelerator", None, "accelerator type: v4-N, v5p-N (N TensorCores), "
                    "v5e-N = v5litepod-N, v6e-N (N chips)")
_ZONE = _str("zone", None, "zone, e.g. us-east5-a (default: $DUALJAX_ZONE, $CLOUDSDK_COMPUTE_ZONE)")
_PROJECT = _str("project", None,
                "project (default: $DUALJAX_PROJECT, $CLOUDSDK_CORE_PROJECT, gcloud's own)")
_SPOT = _bool("spot", False, "create a Spot slice (preemptible; `launch` recreates it)")
_QUEUED = _bool("queued", False, "create the slice through a queued resource (waits for capacity)")
_RUNTIME = _str("runtime_version", None, "TPU software version (default: by generation)")
_RUN = flags.DEFINE_multi_string("run", [], "dualjax.main arguments of one run (repeatable; "
                                 "in order)", flag_values=FLAGS)
_NFS = _str("nfs", None, "setup: mount this NFS export (HOST:/PATH, Filestore) at --mount_point")
_GCSFUSE = _str("gcsfuse_bucket", None,
                "setup: mount this bucket with gcsfuse at --mount_point (gcsfuse must be installed)")
_MOUNT_POINT = _str("mount_point", "/mnt/dualjax", "where --nfs / --gcsfuse_bucket is mounted")
_JAX_SPEC = _str("jax_spec", "jax[tpu]==0.10.2", "setup: the jax requirement of the workers")
_PYTHON_VERSION = _str("python_version", "3.12", "setup: Python of the workers' venv (uv)")
_WORKER = _str("worker", "0", "logs: which worker's log")
_POLL = _int("poll_seconds", 120, "launch: seconds between state checks")
_MAX_RESTARTS = _int("max_restarts", 20, "launch: give up after this many restarts")
_DELETE_WHEN_DONE = _bool("delete_when_done", False, "launch: delete the slice once all runs finished")
_DRY_RUN = _bool("dry_run", False, "print the commands, one per line; run nothing")

# Flags used below, as documented (checked by tests/test_launch.py):
#   https://cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm/create
#     TPU --zone --version --accelerator-type --spot (+ gcloud-wide --project --quiet)
#   https://cloud.google.com/sdk/gcloud/reference/compute/tpus/queued-resources/create
#     QUEUED_RESOURCE --zone --node-id --accelerator-type --runtime-version --spot
#   https://cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm/ssh
#     TPU --zone --worker --command --strict-host-key-checking
#   https://cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm/scp
#     SRC TPU:DEST --zone --worker --strict-host-key-checking
#   https://cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm/delete         TPU --zone
#   https://cloud.google.com/sdk/gcloud/reference/compute/tpus/queued-resources/delete
#     QUEUED_RESOURCE --zone --force
#   describe (tpu-vm / queued-resources): TPU --zone + gcloud-wide --format
# Node states: https://cloud.google.com/python/docs/reference/tpu/latest/google.cloud.tpu_v2.types.Node.State

REMOTE_DIR = "$HOME/dualjax"
REMOTE_VENV = "$HOME/dualjax-venv"
REMOTE_TARBALL = "dualjax-src.tar.gz"  # relative to the worker's home (scp destination)
LOG, PID, RC, STOPPED, WPID = (f"$HOME/dualjax-run.{x}" for x in (
    "log", "pid", "rc", "stopped", "wpid"))
# True on a worker while a run sequence started by `run` is going (its wrapper shell is alive).
ACTIVE = f'[ -e "{WPID}" ] && kill -0 "$(cat "{WPID}")" 2>/dev/null'
UNFINISHED, USER_STOP = 75, 130  # run exit codes: trainer exited 0 before the end; `stop`


@dataclasses.dataclass(frozen=True)
class Target:
  """The slice the commands address."""
  name: str
  zone: str
  project: str | None
  slice: accelerators.TpuSlice | None
  spot: bool = False
  queued: bool = False
  runtime_version: str | None = None

  @property
  def qr(self) -> str:
    return f"{self.name}-qr"

  def where(self) -> list[str]:
    return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])


def create_cmd(t: Target) -> list[str]:
  assert t.slice is not None
  version = t.runtime_version or t.slice.runtime_version
  if t.queued:
    cmd = ["gcloud", "compute", "tpus", "queued-resources", "create", t.qr, *t.where(),
           f"--node-id={t.name}", f"--accelerator-type={t.slice.accelerator_type}",
           f"--runtime-version={version}"]
  else:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", "create", t.name, *t.where(),
           f"--accelerator-type={t.slice.accelerator_type}", f"--version={version}"]
  return cmd + (["--spot"] if t.spot else [])


def describe_cmd(t: Target) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "describe", t.name, *t.where(),
          "--format=value(state)"]


def qr_describe_cmd(t: Target) -> list[str]:
  return ["gcloud", "compute", "tpus", "queued-resources", "describe", t.qr, *t.where(),
          "--format=value(state.state)"]


def delete_cmd(t: Target) -> list[str]:
  if t.queued:  # --force deletes the node first
    return ["gcloud", "compute", "tpus", "queued-resources", "delete", t.qr, *t.where(),
            "--force", "--quiet"]
  return ["gcloud", "compute", "tpus", "tpu-vm", "delete", t.name, *t.where(), "--quiet"]


def ssh_cmd(t: Target, command: str, worker: str = "all") -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", t.name, *t.where(), f"--worker={worker}",
          "--strict-host-key-checking=no", "--quiet", f"--command={command}"]


def scp_cmd(t: Target, src: str, dest: str, worker: str = "all") -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "scp", src, f"{t.name}:{dest}", *t.where(),
          f"--worker={worker}", "--strict-host-key-checking=no", "--quiet"]


def package_cmd(out: str) -> list[str]:
  """Tars the checkout's tracked and untracked-but-not-ignored files (what `git status` shows)."""
  repo = shlex.quote(str(common.REPO))
  return ["bash", "-c", f"git -C {repo} ls-files -z --cached --others --exclude-standard | "
                        f"tar -C {repo} --null -T - -czf {shlex.quote(out)}"]


def install_script(jax_spec: str, python_version: str, nfs: str | None, bucket: str | None,
                   mount_point: str) -> str:
  """Run on every worker: unpack the checkout, build the venv (uv), mount the shared storage."""
  mp = shlex.quote(mount_point)
  lines = [
      "set -e",
      f'if {ACTIVE}; then echo "a dualjax run is going on $(hostname): stop it first" >&2; exit 1; fi',
      f'rm -rf "{REMOTE_DIR}" && mkdir -p "{REMOTE_DIR}" && '
      f'tar -xzf "$HOME/{REMOTE_TARBALL}" -C "{REMOTE_DIR}"',
      'python3 -m pip install --user --quiet --upgrade uv',
      f'[ -x "{REMOTE_VENV}/bin/python" ] || '
      f'"$HOME/.local/bin/uv" venv --python {shlex.quote(python_version)} "{REMOTE_VENV}"',
      f'"$HOME/.local/bin/uv" pip install --quiet --python "{REMOTE_VENV}/bin/python" '
      f'-e "{REMOTE_DIR}" {shlex.quote(jax_spec)}',
  ]
  if nfs:
    lines += ["sudo apt-get -qq update && sudo apt-get -qq install -y nfs-common",
              f"sudo mkdir -p {mp}",
              f"mountpoint -q {mp} || sudo mount -t nfs -o rw,hard {shlex.quote(nfs)} {mp}"]
  if bucket:
    lines += ['command -v gcsfuse >/dev/null || { echo "gcsfuse is not installed: '
              'https://cloud.google.com/storage/docs/cloud-storage-fuse/install" >&2; exit 1; }',
              f'sudo mkdir -p {mp} && sudo chown "$USER" {mp}',
              f"mountpoint -q {mp} || gcsfuse --implicit-dirs --rename-dir-limit=1000000 "
              f"{shlex.quote(bucket)} {mp}"]
  return "; ".join(lines)


def run_script(runs: list[list[str]]) -> str:
  """Run on every worker: the runs in sequence, detached; exit code into ~/dualjax-run.rc.

  A run whose workdir is finished is skipped; a trainer that exits 0 before train.steps (SIGTERM)
  ends the sequence with code 75, `stop` with 130; any other failure with its own code.
  """
  one = "; ".join([
      'wd=$1', "shift",
      '"$PY" -m dualjax.sweep --finished="$wd" && return 0',
      'echo "== $(date -u +%FT%TZ) $(hostname) start $wd" >> "$LOG"',
      f'"$PY" -m dualjax.main --distributed "$@" >> "$LOG" 2>&1 & echo $! > "{PID}"',
      'wait $!', "rc=$?",
      '[ "$rc" -ne 0 ] && return "$rc"',
      f'[ -e "{STOPPED}" ] && return {USER_STOP}',
      f'"$PY" -m dualjax.sweep --finished="$wd" || return {UNFINISHED}'])
  inner = "; ".join([
      f'PY="{REMOTE_VENV}/bin/python"', f'LOG="{LOG}"', f"one() {{ {one}; }}",
      " && ".join(shlex.join(["one", common.workdir_of(args), *args]) for args in runs),
      # the wrapper counts as gone once the exit code is there
      f'rc=$?; rm -f "{WPID}"; echo $rc > "{RC}"'])
  # Nothing is started where a run is going. Braces: only the nohup'd sequence goes to the
  # background, after the synchronous rm (a caller may poll the exit-code file right away).
  return (f'cd "{REMOTE_DIR}" && if {ACTIVE}; then echo "a dualjax run is already going on '
          f'$(hostname)"; else rm -f "{RC}" "{STOPPED}" && {{ nohup bash -c {shlex.quote(inner)} '
          f'> /dev/null 2>&1 < /dev/null & echo $! > "{WPID}"; }}; fi')


def active_cmd(t: Target) -> list[str]:
  return ssh_cmd(t, f"if {ACTIVE}; then echo running; fi", worker="0")


def rc_cmd(t: Target) -> list[str]:
  return ssh_cmd(t, f'cat "{RC}" 2>/dev/null || true', worker="0")


def logs_cmd(t: Target, worker: str) -> list[str]:
  return ssh_cmd(t, f'tail -n 200 -F "{LOG}"', worker=worker)


def stop_cmd(t: Target) -> list[str]:
  return ssh_cmd(t, f'touch "{STOPPED}"; [ -e "{PID}" ] && kill -TERM "$(cat "{PID}")" 2>/dev/null; true')


def tarball(t: Target) -> str:
  return os.path.join(tempfile.gettempdir(), f"dualjax-src-{t.name}.tar.gz")


def setup_cmds(t: Target) -> list[list[str]]:
  return [package_cmd(tarball(t)), scp_cmd(t, tarball(t), REMOTE_TARBALL),
          ssh_cmd(t, install_script(_JAX_SPEC.value, _PYTHON_VERSION.value, _NFS.value,
                                    _GCSFUSE.value, _MOUNT_POINT.value))]


def plan_cmds(action: str, t: Target, runs: list[list[str]]) -> list[list[str]]:
  """The commands of one action (for `launch`: of its first pass), in order."""
  if action == "create":
    return [create_cmd(t)] + ([qr_describe_cmd(t)] if t.queued else []) + [describe_cmd(t)]
  if action == "setup":
    return setup_cmds(t)
  if action == "run":
    return [ssh_cmd(t, run_script(runs))]
  if action == "status":
    return ([qr_describe_cmd(t)] if t.queued else []) + [describe_cmd(t), rc_cmd(t)]
  if action == "logs":
    return [logs_cmd(t, _WORKER.value)]
  if action == "stop":
    return [stop_cmd(t)]
  if action == "delete":
    return [delete_cmd(t)]
  assert action == "launch"
  return (plan_cmds("create", t, runs) + setup_cmds(t) + [ssh_cmd(t, run_script(runs))]
          + [describe_cmd(t), rc_cmd(t)] + ([delete_cmd(t)] if _DELETE_WHEN_DONE.value else []))


# ----------------------------------------------------------------------------------------------
# Running the commands (not under --dry_run).

def _call(cmd: list[str], capture: bool = False) -> subprocess.CompletedProcess:
  print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
  return subprocess.run(cmd, capture_output=capture, text=True, check=False)


def _check(cmd: list[str]) -> None:
  r = _call(cmd)
  if r.returncode:
    raise RuntimeError(f"command failed (exit {r.returncode}): {shlex.join(cmd)}")


def slice_state(t: Target) -> str | None:
  """The node's state (READY, PREEMPTED, ...), the queued resource's while it has no node, or None."""
  if t.queued:
    r = _call(qr_describe_cmd(t), capture=True)
    if r.returncode:
      return None
    qr = r.stdout.strip()
    if qr != "ACTIVE":
      return f"QUEUED_{qr}"
  r = _call(describe_cmd(t), capture=True)
  return r.stdout.strip() if r.returncode == 0 else None


def wait_ready(t: Target) -> None:
  while True:
    state = slice_state(t)
    if state == "READY":
      return
    if state in (None, "QUEUED_FAILED", "QUEUED_SUSPENDED", "PREEMPTED", "TERMINATED"):
      raise RuntimeError(f"slice {t.name} is {state or 'gone'} while waiting for it")
    time.sleep(_POLL.value)


def run_exit_code(t: Target) -> int | None:
  r = _call(rc_cmd(t), capture=True)
  text = r.stdout.strip().splitlines()
  return int(text[-1]) if r.returncode == 0 and text and text[-1].strip().isdigit() else None


def launch(t: Target, runs: list[list[str]]) -> int:
  """create / setup / run, then watch; recreate a preempted slice; returns the exit code."""
  restarts, fresh = 0, True
  while True:
    state = slice_state(t)
    if state != "READY":
      if state is not None:  # preempted, terminated, suspended or failed: start over
        _check(delete_cmd(t))
      _check(create_cmd(t))
      wait_ready(t)
      fresh = True
    elif fresh and "running" in _call(active_cmd(t), capture=True).stdout:
      fresh = False  # `launch` was restarted while its run goes on: watch it
      print(f"{t.name}: a run is going; watching it", file=sys.stderr)
    if fresh:
      for cmd in setup_cmds(t):
        _check(cmd)
      fresh = False
    _check(ssh_cmd(t, run_script(runs)))
    while True:
      time.sleep(_POLL.value)
      state = slice_state(t)
      if state != "READY":
        print(f"slice {t.name}: {state or 'gone'}; recreating it", file=sys.stderr)
        break
      rc = run_exit_code(t)
      if rc is None:
        continue
      if rc == 0:
        print(f"{t.name}: every run finished", file=sys.stderr)
        if _DELETE_WHEN_DONE.value:
          _check(delete_cmd(t))
        return 0
      if rc == USER_STOP:
        print(f"{t.name}: stopped (checkpoint saved); `launch` again to resume", file=sys.stderr)
        return 0
      if rc != UNFINISHED:
        print(f"{t.name}: a run failed (exit {rc}); see `python -m launch.tpu logs --name={t.name}`",
              file=sys.stderr)
        return 1
      print(f"{t.name}: the trainer stopped before the end (SIGTERM); starting it again",
            file=sys.stderr)
      break
    restarts += 1
    if restarts > _MAX_RESTARTS.value:
      print(f"{t.name}: more than --max_restarts={_MAX_RESTARTS.value} restarts; giving up",
            file=sys.stderr)
      return 1


def target() -> Target:
  zone = _ZONE.value or os.environ.get("DUALJAX_ZONE") or os.environ.get("CLOUDSDK_COMPUTE_ZONE")
  project = (_PROJECT.value or os.environ.get("DUALJAX_PROJECT")
             or os.environ.get("CLOUDSDK_CORE_PROJECT"))
  if not _NAME.value:
    raise common.LaunchError("--name is required")
  if not zone:
    raise common.LaunchError("--zone is required (or set $DUALJAX_ZONE / $CLOUDSDK_COMPUTE_ZONE)")
  tslice = None
  if _ACCELERATOR.value:
    try:
      tslice = accelerators.parse_tpu(_ACCELERATOR.value)
    except accelerators.AcceleratorError as e:
      raise common.LaunchError(f"--accelerator: {e}") from None
  if _NFS.value and _GCSFUSE.value:
    raise common.LaunchError("--nfs and --gcsfuse_bucket: choose one")
  return Target(_NAME.value, zone, project, tslice, _SPOT.value, _QUEUED.value, _RUNTIME.value)


def main(argv: list[str]) -> int:
  if common.wants_help(argv):
    print(__doc__.strip() + "\n\nflags:\n" + FLAGS.module_help(sys.modules[__name__]))
    return 0
  argv = common.normalise_argv(argv)
  try:
    rest = FLAGS(argv)[1:]
  except flags.Error as e:
    common.fail(str(e).splitlines()[0])
  try:
    if not rest or rest[0] not in ACTIONS:
      raise common.LaunchError(f"first argument: one of {', '.join(ACTIONS)} (got "
                               f"{rest[0] if rest else 'nothing'})")
    action, positional = rest[0], rest[1:]
    t = target()
    runs: list[list[str]] = []
    if action in ("create", "run", "launch") and t.slice is None:
      raise common.LaunchError(f"{action}: --accelerator is required (e.g. v5p-128)")
    if action in ("run", "launch"):
      runs = common.runs_from(_RUN.value, positional)
      common.check_runs(runs, t.slice.devices, t.slice.accelerator_type)
    elif positional or _RUN.value:
      raise common.LaunchError(f"{action} takes no training arguments")
  except common.LaunchError as e:
    common.fail(str(e))
  cmds = plan_cmds(action, t, runs)
  if _DRY_RUN.value:
    if t.slice is not None:
      print(f"# {t.slice.accelerator_type}: {t.slice.chips} chips, {t.slice.hosts} hosts, "
            f"runtime {t.runtime_version or t.slice.runtime_version}"
            + ("; launch repeats from create when the slice is preempted" if action == "launch" else ""))
    for cmd in cmds:
      print(shlex.join(cmd))
    return 0
  try:
    if action == "launch":
      return launch(t, runs)
    if action == "create":
      _check(create_cmd(t))
      wait_ready(t)
      return 0
    for cmd in cmds:
      _check(cmd)
  except RuntimeError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:  # e.g. leaving `logs`; the run on the slice goes on
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))

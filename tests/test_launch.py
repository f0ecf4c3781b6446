"""launch/: dry-run output of the TPU and SLURM launchers (no cloud, no network), their checks,
and (slow) the generated shell scripts executed here with the trainer on CPU."""

import os
import pathlib
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest

from data_fixtures import embedded_prepared  # noqa: F401  pylint: disable=unused-import
from launch import slurm
from launch import tpu

REPO = pathlib.Path(__file__).resolve().parents[1]
RUN = ["--config=configs/base.py", "--workdir=/mnt/dualjax/runs/r32", "--config.data.repetitions=32",
       "--config.objective.lam=0.5", "--config.data.prepared_dir=/mnt/dualjax/prepared"]

# Flags of each command as listed in its reference page (SYNOPSIS); a launcher may use no other.
GCLOUD_WIDE = {"--access-token-file", "--account", "--billing-project", "--configuration",
               "--flags-file", "--flatten", "--format", "--help", "--impersonate-service-account",
               "--log-http", "--project", "--quiet", "--trace-token", "--user-output-enabled",
               "--verbosity"}  # https://cloud.google.com/sdk/gcloud/reference (GCLOUD WIDE FLAGS)
DOCUMENTED = {
    # https://cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm/create
    ("tpu-vm", "create"): {
        "--zone", "--version", "--async", "--boot-disk", "--data-disk", "--description",
        "--internal-ips", "--labels", "--metadata", "--metadata-from-file", "--network",
        "--preemptible", "--queue-count", "--range", "--reserved", "--scopes", "--service-account",
        "--shielded-secure-boot", "--spot", "--subnetwork", "--tags", "--accelerator-type",
        "--topology", "--type"},
    # https://cloud.google.com/sdk/gcloud/reference/compute/tpus/queued-resources/create
    ("queued-resources", "create"): {
        "--zone", "--runtime-version", "--accelerator-type", "--topology", "--type", "--node-id",
        "--node-count", "--node-prefix", "--async", "--boot-disk", "--data-disk", "--description",
        "--guaranteed", "--internal-ips", "--labels", "--metadata", "--metadata-from-file",
        "--network", "--range", "--reserved", "--scopes", "--service-account",
        "--shielded-secure-boot", "--spot", "--subnetwork", "--tags", "--valid-after-duration",
        "--valid-after-time", "--valid-until-duration", "--valid-until-time",
        "--reservation-host-folder", "--reservation-host-organization",
        "--reservation-host-project"},
    # https://cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm/ssh
    ("tpu-vm", "ssh"): {
        "--dry-run", "--force-key-file-overwrite", "--internal-ip", "--plain", "--ssh-flag",
        "--ssh-key-file", "--strict-host-key-checking", "--worker", "--zone", "--command",
        "--output-directory", "--ssh-key-expiration", "--ssh-key-expire-after"},
    # https://cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm/scp
    ("tpu-vm", "scp"): {
        "--compress", "--dry-run", "--force-key-file-overwrite", "--internal-ip", "--plain",
        "--recurse", "--scp-flag", "--ssh-key-file", "--strict-host-key-checking", "--worker",
        "--zone", "--ssh-key-expiration", "--ssh-key-expire-after"},
    # https://cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm/describe
    ("tpu-vm", "describe"): {"--zone"},
    # https://cloud.google.com/sdk/gcloud/reference/compute/tpus/queued-resources/describe
    ("queued-resources", "describe"): {"--zone"},
    # https://cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm/delete
    ("tpu-vm", "delete"): {"--zone", "--async"},
    # https://cloud.google.com/sdk/gcloud/reference/compute/tpus/queued-resources/delete
    ("queued-resources", "delete"): {"--zone", "--async", "--force"},
}
# https://slurm.schedmd.com/sbatch.html and https://slurm.schedmd.com/srun.html (options used)
SBATCH_DOCUMENTED = {"--parsable", "--job-name", "--nodes", "--ntasks-per-node", "--gpus-per-node",
                     "--requeue", "--signal", "--open-mode", "--output", "--partition", "--account",
                     "--time", "--exclusive"}
SRUN_DOCUMENTED = {"--nodes", "--ntasks-per-node", "--kill-on-bad-exit", "--label"}


def _tpu(argv: list[str], capsys) -> tuple[int, list[str], str]:
  tpu.FLAGS.unparse_flags()
  try:
    rc = tpu.main(["launch.tpu", *argv])
  except SystemExit as e:
    rc = e.code
  out, err = capsys.readouterr()
  return rc, [l for l in out.splitlines() if l and not l.startswith("#")], out + err


def _slurm(argv: list[str], capsys) -> tuple[int, list[str], str]:
  slurm.FLAGS.unparse_flags()
  try:
    rc = slurm.main(["launch.slurm", *argv])
  except SystemExit as e:
    rc = e.code
  out, err = capsys.readouterr()
  return rc, [l for l in out.splitlines() if l and not l.startswith("#")], out + err


def _gcloud(line: str) -> tuple[tuple[str, str], dict[str, str], list[str]]:
  """(command, {flag: value}, positionals) of a printed gcloud line; flags checked against the docs."""
  argv = shlex.split(line)
  assert argv[:3] == ["gcloud", "compute", "tpus"], line
  key = (argv[3], argv[4])
  flags = {a.split("=", 1)[0]: (a.split("=", 1) + [""])[1] for a in argv[5:] if a.startswith("--")}
  assert set(flags) <= DOCUMENTED[key] | GCLOUD_WIDE, (key, set(flags) - DOCUMENTED[key] - GCLOUD_WIDE)
  return key, flags, [a for a in argv[5:] if not a.startswith("--")]


def _bash_syntax_ok(script: str) -> None:
  r = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True, check=False)
  assert r.returncode == 0, (r.stderr, script)


def test_tpu_v5p_128_launch_dry_run(capsys):
  rc, lines, out = _tpu(["launch", "--name=dj1", "--accelerator=v5p-128", "--zone=us-east5-a",
                         "--project=proj", "--dry-run", "--", *RUN], capsys)
  assert rc == 0, out
  assert "# v5p-128: 64 chips, 16 hosts, runtime v2-alpha-tpuv5" in out
  assert lines[0] == ("gcloud compute tpus tpu-vm create dj1 --zone=us-east5-a --project=proj "
                      "--accelerator-type=v5p-128 --version=v2-alpha-tpuv5")
  cmds = [_gcloud(l) if l.startswith("gcloud") else (("local",), {}, shlex.split(l)) for l in lines]
  assert [c[0] for c in cmds] == [("tpu-vm", "create"), ("tpu-vm", "describe"), ("local",),
                                  ("tpu-vm", "scp"), ("tpu-vm", "ssh"), ("tpu-vm", "ssh"),
                                  ("tpu-vm", "describe"), ("tpu-vm", "ssh")]
  for key, flags, pos in cmds:
    if key != ("local",):
      assert flags["--zone"] == "us-east5-a" and flags["--project"] == "proj"
  # copy the checkout to every worker, install, then the same command on all workers
  assert cmds[2][2][:2] == ["bash", "-c"] and "ls-files" in cmds[2][2][2]
  assert cmds[3][1]["--worker"] == "all" and cmds[3][2][1] == "dj1:dualjax-src.tar.gz"
  install, run = cmds[4][1]["--command"], cmds[5][1]["--command"]
  assert cmds[4][1]["--worker"] == cmds[5][1]["--worker"] == "all"
  assert "uv" in install and "jax[tpu]==0.10.2" in install
  assert "-m dualjax.main --distributed" in run and shlex.join(RUN) in run
  assert cmds[7][1]["--worker"] == "0" and "dualjax-run.rc" in cmds[7][1]["--command"]
  for script in (install, run, _inner(run)):
    _bash_syntax_ok(script)


def _inner(run_command: str) -> str:
  argv = shlex.split(run_command)
  return argv[argv.index("-c") + 1]


def test_tpu_v5e_256_spot(capsys):
  rc, lines, out = _tpu(["create", "--name=dj2", "--accelerator=v5e-256", "--zone=us-west4-a",
                         "--spot", "--dry_run"], capsys)
  assert rc == 0, out
  assert "# v5litepod-256: 256 chips, 32 hosts, runtime v2-alpha-tpuv5-lite" in out
  key, flags, pos = _gcloud(lines[0])
  assert key == ("tpu-vm", "create") and pos == ["dj2"]
  assert flags == {"--zone": "us-west4-a", "--accelerator-type": "v5litepod-256",
                   "--version": "v2-alpha-tpuv5-lite", "--spot": ""}
  assert _gcloud(lines[1])[0] == ("tpu-vm", "describe")


def test_tpu_queued_resources(capsys, monkeypatch):
  monkeypatch.setenv("DUALJAX_ZONE", "us-central2-b")
  monkeypatch.setenv("DUALJAX_PROJECT", "envproj")
  rc, lines, out = _tpu(["launch", "--name=dj3", "--accelerator=v6e-256", "--queued", "--spot",
                         "--dry-run", "--", *RUN], capsys)
  assert rc == 0, out
  key, flags, pos = _gcloud(lines[0])
  assert key == ("queued-resources", "create") and pos == ["dj3-qr"]
  assert flags == {"--zone": "us-central2-b", "--project": "envproj", "--node-id": "dj3",
                   "--accelerator-type": "v6e-256", "--runtime-version": "v2-alpha-tpuv6e",
                   "--spot": ""}
  assert _gcloud(lines[1])[:3:2] == (("queued-resources", "describe"), ["dj3-qr"])
  rc, lines, _ = _tpu(["delete", "--name=dj3", "--queued", "--dry-run"], capsys)
  key, flags, pos = _gcloud(lines[0])
  assert (key, pos, "--force" in flags, "--quiet" in flags) == (
      ("queued-resources", "delete"), ["dj3-qr"], True, True)


@pytest.mark.parametrize("action,key", [("status", ("tpu-vm", "describe")), ("logs", ("tpu-vm", "ssh")),
                                        ("stop", ("tpu-vm", "ssh")), ("delete", ("tpu-vm", "delete"))])
def test_tpu_other_actions(action, key, capsys):
  rc, lines, out = _tpu([action, "--name=dj4", "--zone=europe-west4-a", "--dry-run"], capsys)
  assert rc == 0, out
  assert _gcloud(lines[0])[0] == key
  for l in lines:
    _, flags, _ = _gcloud(l)
    if "--command" in flags:
      _bash_syntax_ok(flags["--command"])


def test_tpu_several_runs_in_sequence(capsys):
  run2 = [a.replace("r32", "r64") for a in RUN]
  rc, lines, out = _tpu(["run", "--name=dj5", "--accelerator=v5p-128", "--zone=z", "--dry-run",
                         f"--run={shlex.join(RUN)}", f"--run={shlex.join(run2)}"], capsys)
  assert rc == 0, out
  inner = _inner(_gcloud(lines[0])[1]["--command"])
  assert inner.index("one /mnt/dualjax/runs/r32 ") < inner.index("&& one /mnt/dualjax/runs/r64 ")


def _cli(module: str, argv: list[str]) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.parametrize("argv,fragment", [
    (["launch", "--name=x", "--accelerator=v3-8", "--zone=z", "--", *RUN],
     "unknown TPU generation 'v3'"),
    (["launch", "--name=x", "--accelerator=v5p-128", "--zone=z", "--", *RUN,
      "--config.mesh.replica=32"], "replica*fsdp*tensor = 32 but there are 64 devices"),
    (["run", "--name=x", "--accelerator=v5p-128", "--zone=z", "--", "--config=configs/base.py",
      "--workdir=gs://bucket/run"], "not gs:// paths"),
])
def test_tpu_bad_input_is_one_line_exit_2(argv, fragment):
  r = _cli("launch.tpu", argv)
  assert r.returncode == 2, r.stderr
  assert r.stdout == "" and r.stderr.strip().count("\n") == 0 and fragment in r.stderr


def test_tpu_missing_zone_and_lam_checked(capsys, monkeypatch):
  for var in ("DUALJAX_ZONE", "CLOUDSDK_COMPUTE_ZONE"):
    monkeypatch.delenv(var, raising=False)
  rc, _, out = _tpu(["create", "--name=x", "--accelerator=v5p-8"], capsys)
  assert rc == 2 and "--zone is required" in out
  rc, _, out = _tpu(["launch", "--name=x", "--accelerator=v5p-128", "--zone=z", "--dry-run", "--",
                     *RUN, "--config.objective.lam=0.3"], capsys)
  assert rc == 2 and "objective.lam=0.3 is not representable with 64 replicas" in out


def test_slurm_2_nodes_x_8_dry_run(capsys):
  rc, lines, out = _slurm(["--nodes=2", "--gpus_per_node=8", "--time=24:00:00",
                           "--partition=gpu", "--dry-run", "--", *RUN], capsys)
  assert rc == 0, out
  assert "# 2 nodes x 8 GPUs: 16 processes" in out
  sb, sr = shlex.split(lines[0]), shlex.split(lines[1])
  assert sb[0] == "sbatch" and sb[-1].endswith("slurm/dualjax.sbatch")
  opts = dict((a.split("=", 1) + [""])[:2] for a in sb[1:-1])
  assert set(opts) <= SBATCH_DOCUMENTED
  assert {k: opts[k] for k in ("--nodes", "--ntasks-per-node", "--gpus-per-node", "--requeue",
                               "--signal", "--time", "--partition")} == {
      "--nodes": "2", "--ntasks-per-node": "8", "--gpus-per-node": "8", "--requeue": "",
      "--signal": "B:USR1@300", "--time": "24:00:00", "--partition": "gpu"}
  exe = sr.index("bash")
  assert sr[0] == "srun" and set(a.split("=")[0] for a in sr[1:exe]) <= SRUN_DOCUMENTED
  assert sr[1:exe] == ["--nodes=2", "--ntasks-per-node=8", "--kill-on-bad-exit=1", "--label"]
  body = sr[exe + 2]
  assert ('--coordinator_address="$DUALJAX_COORDINATOR" --num_processes="$SLURM_NTASKS" '
          '--process_id="$SLURM_PROCID"') in body and "dualjax.main" in body
  assert sr[exe + 4:] == RUN
  # the batch script runs exactly that srun line, after working out the coordinator
  rc, _, script = _slurm(["--nodes=2", "--gpus_per_node=8", "--print_script", "--", *RUN], capsys)
  assert rc == 0 and "#SBATCH --nodes=2" in script and "#SBATCH --requeue" in script
  assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in script
  assert shlex.join(sr) in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
  _bash_syntax_ok(script)


def test_slurm_bad_input(capsys):
  r = _cli("launch.slurm", ["--nodes=2", "--gpus_per_node=8", "--", *RUN, "--config.mesh.replica=8"])
  assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
  assert "replica*fsdp*tensor = 8 but there are 16 devices" in r.stderr
  rc, _, out = _slurm(["--nodes=2", "--", "--config=configs/base.py"], capsys)
  assert rc == 2 and "--workdir=DIR is required" in out
  rc, _, out = _slurm(["--nodes=2", "--", *RUN, "--distributed"], capsys)
  assert rc == 2 and "set by the launcher" in out


def test_help(capsys):
  for fn, words in ((_tpu, ("launch", "--accelerator", "--dry_run")),
                    (_slurm, ("--nodes", "--requeue", "--dry_run"))):
    rc, _, out = fn(["--help"], capsys)
    assert rc == 0 and all(w in out for w in words)


# ------------------------------------------------------------------------------------------------
# The generated scripts, executed here: the trainer on CPU, one process. `jax.distributed` finds
# its coordinator through SLURM variables (a cluster environment JAX auto-detects), fake `srun` /
# `scontrol` stand in for SLURM's.

TINY = ["--config=configs/base.py:tiny", "--config.model.vocab_size=1024", "--config.model.d_model=32",
        "--config.model.num_heads=2", "--config.model.head_dim=16", "--config.model.mlp_dim=64",
        "--config.data.source=", "--config.data.seq_len=32", "--config.data.global_batch=8",
        "--config.train.steps=25", "--config.checkpoint.every=5", "--config.log.every=1",
        "--config.log.val_every=0"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait_for(pred, timeout: float = 240, what: str = "") -> None:
  t0 = time.time()
  while not pred():
    assert time.time() - t0 < timeout, f"timed out waiting for {what}"
    time.sleep(0.3)


def _logged_step(workdir: pathlib.Path, step: int) -> bool:
  f = workdir / "metrics.jsonl"
  return f.exists() and f'"step": {step},' in f.read_text()


def _env(**extra) -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  env.pop("SLURM_RESTART_COUNT", None)
  env.update(extra)
  return env


@pytest.mark.slow
def test_tpu_run_script_stop_resume_skip(tmp_path, embedded_prepared, capsys):  # noqa: F811
  home = tmp_path / "home"
  (home / "dualjax-venv" / "bin").mkdir(parents=True)
  (home / "dualjax").symlink_to(REPO)
  py = home / "dualjax-venv" / "bin" / "python"
  py.write_text(f'#!/bin/bash\nexec {shlex.quote(sys.executable)} "$@"\n')
  py.chmod(0o755)
  wd = tmp_path / "run"
  run = [*TINY, f"--workdir={wd}", f"--config.data.prepared_dir={embedded_prepared}"]
  rc, lines, out = _tpu(["run", "--name=sim", "--accelerator=v5e-1", "--zone=z", "--dry-run",
                         "--", *run], capsys)
  assert rc == 0, out
  start = _gcloud(lines[0])[1]["--command"]
  _, _, out = _tpu(["stop", "--name=sim", "--zone=z", "--dry-run"], capsys)
  stop = _gcloud(out.splitlines()[-1])[1]["--command"]
  env = _env(HOME=str(home), SLURM_JOB_ID="7", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="1",
             SLURM_PROCID="0", SLURM_LOCALID="0", JAX_COORDINATOR_PORT=str(_free_port()))
  rc_file = home / "dualjax-run.rc"

  def start_and_wait() -> int:
    subprocess.run(["bash", "-c", start], env=env, check=True, timeout=60)
    assert not rc_file.exists()  # removed before the command returns
    _wait_for(rc_file.exists, what="the run's exit code file")
    return int(rc_file.read_text())

  subprocess.run(["bash", "-c", start], env=env, check=True, timeout=60)
  _wait_for(lambda: _logged_step(wd, 3), what="step 3")
  again = subprocess.run(["bash", "-c", start], env=env, check=True, timeout=60,
                         capture_output=True, text=True)
  assert "already going" in again.stdout                 # no second trainer on the same workdir
  subprocess.run(["bash", "-c", stop], env=env, check=True, timeout=60)   # SIGTERM: save, exit 0
  _wait_for(rc_file.exists, what="the run's exit code file")
  assert int(rc_file.read_text()) == tpu.USER_STOP
  saved = sorted(int(p.name) for p in (wd / "checkpoints").iterdir())
  assert saved and saved[-1] < 25
  rc = start_and_wait()                                   # resumes and finishes
  log = (home / "dualjax-run.log").read_text()
  assert rc == 0, log[-3000:]
  assert f"resumed from step {saved[-1]}" in log and (wd / "checkpoints" / "25").is_dir()
  assert log.count(" start ") == 2
  assert start_and_wait() == 0                            # finished: skipped
  assert (home / "dualjax-run.log").read_text() == log


@pytest.mark.slow
def test_slurm_script_requeue_and_resume(tmp_path, embedded_prepared, capsys):  # noqa: F811
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "srun").write_text(  # one task: drop srun's options, run the command
      '#!/bin/bash\nwhile [ "$1" != bash ]; do shift; done\n'
      "export SLURM_NTASKS=1 SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_STEP_NODELIST=localhost\n"
      'exec "$@"\n')
  (bin_dir / "scontrol").write_text(
      f'#!/bin/bash\nif [ "$1" = show ]; then echo localhost; '
      f'else echo "$@" >> {shlex.quote(str(tmp_path / "scontrol.log"))}; fi\n')
  for f in bin_dir.iterdir():
    f.chmod(0o755)
  wd = tmp_path / "run"
  run = [*TINY, f"--workdir={wd}", f"--config.data.prepared_dir={embedded_prepared}"]
  port = _free_port()
  rc, _, script = _slurm(["--nodes=1", "--gpus_per_node=1", f"--port_base={port - 1}",
                          "--print_script", "--", *run], capsys)
  assert rc == 0, script
  job = tmp_path / "job.sbatch"
  job.write_text(script)
  env = _env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="1",
             SLURM_JOB_NODELIST="localhost", SLURM_JOB_NUM_NODES="1")
  p = subprocess.Popen(["bash", str(job)], env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
  try:
    _wait_for(lambda: _logged_step(wd, 3), what="step 3")
    p.send_signal(signal.SIGUSR1)          # the time limit is near
    out, _ = p.communicate(timeout=240)
  finally:
    if p.poll() is None:
      p.kill()
  assert p.returncode == 0, out
  assert "unfinished: requeue" in out and "SIGTERM: saved a checkpoint" in out
  assert (tmp_path / "scontrol.log").read_text() == "requeue 1\n"
  assert not (wd / "checkpoints" / "25").exists()
  # the requeued job starts the script again: it resumes and finishes, no further requeue
  r = subprocess.run(["bash", str(job)], env=dict(env, SLURM_RESTART_COUNT="1"),
                     capture_output=True, text=True, timeout=240, check=False)
  assert r.returncode == 0, r.stdout + r.stderr
  assert "resumed from step" in r.stdout + r.stderr and (wd / "checkpoints" / "25").is_dir()
  assert (tmp_path / "scontrol.log").read_text() == "requeue 1\n"


FAKE_GCLOUD = r'''#!/usr/bin/env python3
"""Stands in for gcloud: a TPU node whose state lives in $FAKE/state; the run's exit codes are
read, one per poll, from $FAKE/rcs; a preemption is scheduled by $FAKE/preempt_after (polls)."""
import os, pathlib, sys
d = pathlib.Path(os.environ["FAKE"])
a = sys.argv[1:]
with (d / "calls").open("a") as f:
  f.write(" ".join(a[2:4]) + (" " + next((x for x in a if x.startswith("--worker")), "")).rstrip() + "\n")
state = d / "state"
verb = (a[2], a[3])
if verb == ("tpu-vm", "describe"):
  if not state.exists():
    sys.exit(1)
  polls = int((d / "polls").read_text()) if (d / "polls").exists() else 0
  (d / "polls").write_text(str(polls + 1))
  pre = d / "preempt_after"
  if pre.exists() and polls + 1 >= int(pre.read_text()):
    pre.unlink()
    state.write_text("PREEMPTED")
  print(state.read_text())
elif verb == ("tpu-vm", "create"):
  state.write_text("READY")
elif verb == ("tpu-vm", "delete"):
  state.unlink()
elif verb == ("tpu-vm", "ssh"):
  cmd = next(x for x in a if x.startswith("--command="))
  if cmd.startswith('--command=cat "$HOME/dualjax-run.rc"'):  # the exit-code poll
    rcs = (d / "rcs").read_text().split("\n")
    print(rcs[0])
    (d / "rcs").write_text("\n".join(rcs[1:]))
'''


def test_tpu_launch_loop_recreates_a_preempted_slice(tmp_path):
  fake = tmp_path / "fake"
  (fake / "bin").mkdir(parents=True)
  g = fake / "bin" / "gcloud"
  g.write_text(FAKE_GCLOUD)
  g.chmod(0o755)
  (fake / "preempt_after").write_text("3")       # the 3rd describe of the node finds it preempted
  (fake / "rcs").write_text("\n" + f"{tpu.UNFINISHED}\n" + "\n0\n")  # running, SIGTERMed, running, done
  env = dict(os.environ, FAKE=str(fake), PATH=f"{fake / 'bin'}{os.pathsep}{os.environ['PATH']}",
             JAX_PLATFORMS="cpu", TMPDIR=str(tmp_path))
  r = subprocess.run([sys.executable, "-m", "launch.tpu", "launch", f"--name=loop{os.getpid()}",
                      "--accelerator=v5p-8", "--zone=z", "--poll_seconds=0", "--delete_when_done",
                      "--", *RUN], cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
                     check=False)
  out = r.stderr
  assert r.returncode == 0, out
  calls = (fake / "calls").read_text().splitlines()
  setup = ["tpu-vm scp --worker=all", "tpu-vm ssh --worker=all", "tpu-vm ssh --worker=all"]
  assert calls == (
      ["tpu-vm describe", "tpu-vm create", "tpu-vm describe"] + setup         # create, wait, setup+run
      + ["tpu-vm describe", "tpu-vm ssh --worker=0",                         # poll: running
         "tpu-vm describe",                                                  # poll: preempted
         "tpu-vm describe", "tpu-vm delete", "tpu-vm create", "tpu-vm describe"] + setup
      + ["tpu-vm describe", "tpu-vm ssh --worker=0",                         # 75: SIGTERMed
         "tpu-vm describe", "tpu-vm ssh --worker=all",                       # start it again
         "tpu-vm describe", "tpu-vm ssh --worker=0",                         # running
         "tpu-vm describe", "tpu-vm ssh --worker=0",                         # 0: done
         "tpu-vm delete"])
  assert "recreating it" in out and "every run finished" in out
  assert (tmp_path / f"dualjax-src-loop{os.getpid()}.tar.gz").is_file()  # the checkout, packed

"""Issue 13 as a user meets it: `python -m dualjax.main` / `prepare` in subprocesses on real files,
with real signals, a real full disk (a small tmpfs in a private mount namespace) and a real
read-only file system. Each test fails without the behaviour it names."""

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from data_fixtures import embedded_prepared  # noqa: F401  pylint: disable=unused-import
from dualjax import metrics as metrics_lib
from dualjax import prepare as prepare_lib
from dualjax import results
from dualjax import trained
from test_train import CONFIG, REPO, _args, _env, _last_step, _main, _run, _tree_digest

# End-to-end: every test starts `python -m dualjax.main` / `prepare` as a user would.
pytestmark = pytest.mark.slow

def _one_error_line(r: subprocess.CompletedProcess, pattern: str, warnings: bool = False) -> str:
  """Exit 2 and one `error:` line matching `pattern`; nothing else on stderr (but WARNING log
  lines if `warnings`)."""
  lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
  if warnings:
    lines = [l for l in lines if " WARNING " not in l]
  assert r.returncode == 2, r.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(pattern, lines[0]), \
      r.stderr[-3000:]
  return lines[0]


def _docs_jsonl(path: pathlib.Path, n: int = 200, field: str = "text") -> pathlib.Path:
  path.write_text("".join(json.dumps({field: f"document {i}: " + "lorem ipsum dolor sit amet " *
                                      (i % 9 + 3)}) + "\n" for i in range(n)))
  return path


def _unshare() -> list[str]:
  return ["unshare", "--mount"] + (["--map-root-user"] if os.geteuid() else [])


def _mount_tmpfs_works() -> bool:
  if shutil.which("unshare") is None:
    return False
  probe = pathlib.Path(__file__).parent  # any directory: the mount is private and temporary
  r = subprocess.run(_unshare() + ["sh", "-c", f"mount -t tmpfs -o size=64k none {probe} && "
                                   f"touch {probe}/x"], capture_output=True, check=False)
  return r.returncode == 0


needs_tmpfs = pytest.mark.skipif(not _mount_tmpfs_works(),
                                 reason="cannot mount a tmpfs in a private mount namespace here")


def _in_tmpfs(mountpoint: pathlib.Path, size: str, script: str, ro: bool = False,
              timeout: float = 300) -> subprocess.CompletedProcess:
  """Runs `script` (sh) with a fresh tmpfs of `size` at `mountpoint`, in a private namespace."""
  mountpoint.mkdir(parents=True, exist_ok=True)
  opts = f"size={size}" + (",ro" if ro else "")
  cmd = _unshare() + ["sh", "-c", f"mount -t tmpfs -o {opts} none {mountpoint} && {script}"]
  return subprocess.run(cmd, cwd=REPO, env=_env(1), capture_output=True, text=True,
                        timeout=timeout, check=False)


# --- 1. a prepared directory is never replaced silently -------------------------------------------

def test_prepared_dir_of_another_source_is_refused_or_used_as_it_is(tmp_path):
  src = _docs_jsonl(tmp_path / "my.jsonl")
  d = tmp_path / "D"
  r = subprocess.run([sys.executable, "-m", "dualjax.prepare", f"--config.data.source={src}",
                      f"--config.data.prepared_dir={d}", "--config.model.vocab_size=300",
                      "--config.data.num_workers=1", "--config.data.val_fraction=0.1"],
                     cwd=REPO, env=_env(1), capture_output=True, text=True, check=False)
  assert r.returncode == 0, r.stderr
  before = _tree_digest(d)
  small = ["--config.model.vocab_size=1024", "--config.model.d_model=32",
           "--config.model.num_heads=2", "--config.model.head_dim=16", "--config.model.mlp_dim=64",
           "--config.data.seq_len=32", "--config.data.global_batch=16", "--config.train.steps=3",
           "--config.log.val_every=0", "--config.checkpoint.every=3"]
  wd = tmp_path / "run"
  # The config names data.source='embedded': D (prepared from my.jsonl) is refused, untouched.
  r = _run([f"--config={REPO}/configs/rep1.py:tiny", f"--workdir={wd}",
            f"--config.data.prepared_dir={d}"] + small, devices=1)
  _one_error_line(r, rf"data\.prepared_dir: {re.escape(str(d))} holds data prepared from source "
                     rf"'{re.escape(str(src))}' .*not from data\.source='embedded'")
  assert _tree_digest(d) == before and not wd.exists()
  # Naming no source trains on D as it is.
  r = _run([f"--config={REPO}/configs/rep1.py:tiny", f"--workdir={wd}",
            f"--config.data.prepared_dir={d}", "--config.data.source="] + small, devices=1)
  assert r.returncode == 0, r.stderr[-3000:]
  assert _tree_digest(d) == before and trained.load(wd).tokenizer.vocab_size <= 300
  # Another run's data: prepare with another source into D is refused too.
  r = subprocess.run([sys.executable, "-m", "dualjax.prepare", "--config.data.source=embedded",
                      f"--config.data.prepared_dir={d}", "--config.model.vocab_size=300"],
                     cwd=REPO, env=_env(1), capture_output=True, text=True, check=False)
  _one_error_line(r, r"holds data prepared from source .*refusing to replace it .*--replace")
  assert _tree_digest(d) == before


# --- 2. damaged prepared data ---------------------------------------------------------------------

def _damage_cases(d: pathlib.Path) -> dict[str, tuple]:
  m = prepare_lib.read_manifest(d)
  shard = d / m["train"]["shards"][0]
  val = d / m["val"]["shards"][0]

  def truncate(p=shard):
    os.truncate(p, p.stat().st_size // 2)

  def zero(p=val):
    p.write_bytes(b"\0" * p.stat().st_size)

  def lengths(p=d / "train_lengths.npy"):
    os.truncate(p, p.stat().st_size - 100)

  def edit(p=d / "manifest.json"):
    mm = json.loads(p.read_text())
    mm["train"]["tokens"] += 1
    p.write_text(json.dumps(mm))
  return {"truncated shard": (truncate, rf"{re.escape(str(shard))} has [\d,]+ bytes, the manifest "
                                        r"says [\d,]+ \(truncated or replaced\)"),
          "zeroed shard": (zero, rf"{re.escape(str(val))} (holds 0 records|is not a readable ArrayRecord)"),
          "truncated lengths": (lengths, r"train_lengths\.npy has [\d,]+ bytes"),
          "edited manifest": (edit, r"manifest\.json was edited or damaged")}


def test_damaged_prepared_data_is_one_line_before_the_workdir_is_written(
    embedded_prepared, tmp_path):  # noqa: F811
  for name in _damage_cases(embedded_prepared):
    d = tmp_path / name.replace(" ", "_")
    shutil.copytree(embedded_prepared, d)
    damage, pattern = _damage_cases(d)[name]
    damage()
    wd = tmp_path / f"run_{d.name}"
    r = _run(_args(d, wd), devices=1)
    line = _one_error_line(r, pattern)
    assert "rebuild it with: python -m dualjax.prepare --config.data.source=embedded" in line, name
    assert not wd.exists(), name


def test_verify_finds_a_damaged_byte_and_prepare_rebuilds(embedded_prepared, tmp_path):  # noqa: F811
  d = tmp_path / "prep"
  shutil.copytree(embedded_prepared, d)
  prep = [sys.executable, "-m", "dualjax.prepare", f"--config.data.prepared_dir={d}"]
  r = subprocess.run(prep + ["--verify"], cwd=REPO, env=_env(1), capture_output=True, text=True,
                     check=False)
  assert r.returncode == 0 and "sha256 match the manifest" in r.stdout, r.stderr
  shard = d / prepare_lib.read_manifest(d)["train"]["shards"][0]
  with open(shard, "r+b") as f:  # same size, same record count: only the checksum sees it
    n = shard.stat().st_size
    f.seek(n // 4)
    f.write(b"\0" * (n // 2))
  prepare_lib.check_integrity(d)  # the cheap start-up check cannot see it...
  r = subprocess.run(prep + ["--verify"], cwd=REPO, env=_env(1), capture_output=True, text=True,
                     check=False)
  _one_error_line(r, rf"{re.escape(str(shard))}: sha256 differs from the manifest")
  # ...training that reads it names it in one line (the pipeline's reader error)...
  r = _run(_args(d, tmp_path / "run", **{"data.repetitions": 1}), devices=1)
  _one_error_line(r, rf"prepared data {re.escape(str(shard))} is damaged .*--verify")
  # ...and prepare with the same settings rebuilds it instead of calling it up to date.
  r = subprocess.run(prep + ["--config.data.source=embedded", "--config.model.vocab_size=1024",
                             "--config.data.num_workers=1"],
                     cwd=REPO, env=_env(1), capture_output=True, text=True, check=False)
  assert r.returncode == 0 and "is damaged" in r.stderr and "rebuilding" in r.stderr, r.stderr
  prepare_lib.verify(d)


# --- 3. one writer per workdir (with 6: metrics.jsonl stays valid JSONL) ---------------------------

def test_second_writer_refused_then_a_killed_writer_is_taken_over(embedded_prepared, tmp_path):  # noqa: F811
  wd = tmp_path / "run"
  args = _args(embedded_prepared, wd, **{"train.steps": 40})
  first = _main(args, devices=1)
  deadline = time.time() + 240
  while _last_step(wd) < 12:
    assert first.poll() is None, first.stderr.read()[-2000:]
    assert time.time() < deadline
    time.sleep(0.01)
  first.send_signal(signal.SIGSTOP)  # alive and holding the workdir, but not running ahead
  r = _run(args, devices=1)
  _one_error_line(r, rf"workdir {re.escape(str(wd))} is in use by process {first.pid} on host "
                     rf"{re.escape(socket.gethostname())}")
  first.send_signal(signal.SIGKILL)
  first.communicate(timeout=60)
  with open(wd / "metrics.jsonl", "a", encoding="utf-8") as f:
    f.write('{"step": 99, "kind": "train", "loss": 1.')  # as if killed mid-write
  r = _run(args, devices=1)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"took over the lock of process {first.pid}" in r.stderr
  lines = (wd / "metrics.jsonl").read_text().splitlines()
  recs = [json.loads(l) for l in lines]                  # every line is JSON
  keys = [(x["kind"], x["step"]) for x in recs]
  assert len(keys) == len(set(keys)), "a step was logged twice"
  assert sorted(s for k, s in keys if k == "train") == list(range(1, 41))
  assert not (wd / "lock").exists()


# --- 4. nothing is written before a data error ------------------------------------------------------

def test_data_errors_leave_no_workdir_behind(tmp_path):
  src = _docs_jsonl(tmp_path / "few.jsonl", n=30)
  small = {"model.vocab_size": 512, "data.prepared_dir": "", "data.num_workers": 1,
           "data.seq_len": 32, "train.steps": 2, "data.repetitions": 1}
  cases = [
      # a source whose split leaves no validation document (found after preparing it)
      ({"data.source": str(src), "data.val_fraction": 1e-6},
       r"has no validation documents"),
      # a repetition factor the prepared corpus cannot hold (found after preparing it)
      ({"data.source": str(src), "train.steps": 20, "data.repetitions": 2},
       r"repetitions=2: the unique subset needs [\d,]+ tokens but \S+ holds only"),
      ({"data.source": str(src), "data.val_fraction": 0.0}, r"data\.val_fraction=0 holds none out"),
      ({"data.source": str(tmp_path / "missing.jsonl")}, r"missing\.jsonl does not exist"),
      ({"data.source": "embedded", "data.repetitions": 10**6},
       r"repetitions=1000000 leaves a unique subset"),
  ]
  for extra, pattern in cases:
    wd = tmp_path / "w" / "run"
    o = {**small, **extra}
    args = [f"--config={CONFIG}", f"--workdir={wd}"] + [f"--config.{k}={v}" for k, v in o.items()]
    r = _run(args, devices=1)
    _one_error_line(r, pattern, warnings=True)
    assert not wd.exists(), (extra, list(wd.rglob("*")))
  # An existing (empty) workdir stays empty: the prepared data this start made is removed too.
  wd = tmp_path / "exists"
  wd.mkdir()
  args = [f"--config={CONFIG}", f"--workdir={wd}"] + [
      f"--config.{k}={v}" for k, v in {**small, **cases[0][0]}.items()]
  _one_error_line(_run(args, devices=1), cases[0][1], warnings=True)
  assert list(wd.iterdir()) == []


@needs_tmpfs
def test_read_only_workdir_is_one_line(embedded_prepared, tmp_path):  # noqa: F811
  ro = tmp_path / "ro"
  args = " ".join(f"'{a}'" for a in _args(embedded_prepared, ro / "run"))
  r = _in_tmpfs(ro, "1m", f"{sys.executable} -m dualjax.main {args}", ro=True)
  _one_error_line(r, r"cannot create --workdir .*run \(Read-only file system\)")
  r = _in_tmpfs(ro, "1m", f"{sys.executable} -m dualjax.main "
                + " ".join(f"'{a}'" for a in _args(embedded_prepared, ro)), ro=True)
  _one_error_line(r, rf"workdir {re.escape(str(ro))} is not writable \(Read-only file system\)")


# --- 5. full disk -----------------------------------------------------------------------------------

@needs_tmpfs
def test_full_disk_during_an_async_save_is_one_line_and_keeps_the_last_good_checkpoint(
    embedded_prepared, tmp_path):  # noqa: F811
  disk, keep = tmp_path / "disk", tmp_path / "copy"
  every = 20  # room for the asynchronous write to end well before the next save on a loaded box
  args = " ".join(f"'{a}'" for a in _args(embedded_prepared, disk / "run", **{
      "log.val_every": 0, "checkpoint.every": every}))
  # ~1.4 MB: the run files and one ~0.97 MB checkpoint fit, the second does not.
  r = _in_tmpfs(disk, "1400k", f"{sys.executable} -m dualjax.main {args}; rc=$?; "
                f"cp -a {disk / 'run'} {keep}; exit $rc")
  assert r.returncode == 2, r.stderr[-3000:]
  err = [l for l in r.stderr.splitlines() if l.strip()]
  assert not any("Traceback" in l for l in err), r.stderr[-3000:]
  m = re.fullmatch(rf"error: saving the checkpoint of step (\d+) to {re.escape(str(disk))}/run/"
                   r"checkpoints failed: no space left on device \(a checkpoint needs about "
                   r"([\d,]+) bytes, ([\d,]+) bytes free\); the last good checkpoint is step (\d+)",
                   err[-1])
  assert m, err[-1]
  failed, need, good = int(m.group(1)), int(m.group(2).replace(",", "")), int(m.group(4))
  assert need > 500_000 and good == failed - every
  # Detected while training goes on after the failure, not at the next save.
  assert _last_step(keep) < failed + every - 1
  t = trained.load(keep)  # the last good checkpoint restores
  assert t.step == good


@needs_tmpfs
def test_full_disk_during_prepare_is_one_line(tmp_path):
  disk = tmp_path / "disk"
  r = _in_tmpfs(disk, "300k", f"{sys.executable} -m dualjax.prepare --config.data.source=embedded "
                f"--config.data.prepared_dir={disk / 'prep'} --config.model.vocab_size=512 "
                f"--config.data.num_workers=1; rc=$?; ls -A {disk}; exit $rc")
  line = _one_error_line(r, rf"no space left on device writing {re.escape(str(disk))}/prep: the "
                            r"disk filled after [\d,]+ bytes of output \([\d,]+ bytes free now\); "
                            r"preparing this source needs more than [\d,]+ bytes")
  assert r.stdout.strip() == "", f"left behind: {r.stdout}"  # no temporary directory remains
  del line


# --- 7. quiet handled faults ------------------------------------------------------------------------

def test_fallback_and_unrestorable_checkpoints_print_no_tracebacks(embedded_prepared, tmp_path):  # noqa: F811
  wd = tmp_path / "run"
  few = {"train.steps": 20, "log.val_every": 0, "data.repetitions": 1}
  args = _args(embedded_prepared, wd, **few)
  assert _run(args, devices=1).returncode == 0
  ck = wd / "checkpoints"
  for f in (ck / "20" / "state").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(b"\0" * f.stat().st_size)
  shutil.copytree(wd, tmp_path / "all")
  r = _run(args, devices=1)
  assert r.returncode == 0 and "resumed from step 15" in r.stderr, r.stderr[-3000:]
  assert "Traceback" not in r.stderr and "Event loop is closed" not in r.stderr, r.stderr[-3000:]
  warn = [l for l in r.stderr.splitlines() if "unreadable" in l]
  assert len(warn) == 1 and "checkpoint at step 20 is unreadable" in warn[0]
  # Every checkpoint damaged: one line, exit 2, nothing moved.
  for f in (tmp_path / "all" / "checkpoints").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(b"\0" * f.stat().st_size)
  r = _run(_args(embedded_prepared, tmp_path / "all", **few), devices=1)
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert re.fullmatch(r"error: no checkpoint in \S+ could be restored .*nothing was moved",
                      r.stderr.strip().splitlines()[-1])
  assert sorted(p.name for p in (tmp_path / "all" / "checkpoints").iterdir()
                if p.name.isdigit()) == ["15", "20"]


def test_sigterm_during_start_up_exits_0_and_leaves_nothing(tmp_path):
  wd = tmp_path / "run"
  # Preparing the embedded corpus into the workdir (tokenizer training) takes a few seconds.
  proc = _main([f"--config={CONFIG}", f"--workdir={wd}", "--config.model.vocab_size=2048",
                "--config.data.num_workers=1"], devices=1)
  deadline = time.time() + 120
  while not (wd.exists() and any(p.name.startswith(".prepared.tmp-") for p in wd.iterdir())):
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    assert time.time() < deadline
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 0, err[-3000:]
  assert "SIGTERM during start-up" in out and "Traceback" not in err, (out, err)
  assert not wd.exists()


# --- 8. checkpoints resume only into the run that wrote them -------------------------------------

def test_checkpoints_without_config_json_refuse_another_run(embedded_prepared, tmp_path):  # noqa: F811
  a = tmp_path / "a"
  few = {"train.steps": 10, "log.val_every": 0, "data.repetitions": 1}
  assert _run(_args(embedded_prepared, a, **few), devices=1).returncode == 0
  moved = tmp_path / "moved"
  shutil.copytree(a / "checkpoints", moved / "checkpoints")  # config.json lost in a move
  before = _tree_digest(moved)
  r = _run(_args(embedded_prepared, moved, **(few | {"train.steps": 20})), devices=1)
  _one_error_line(r, r"checkpoint \S+/moved/checkpoints/10 belongs to another run "
                     r"\(train\.steps: 10 -> 20\)")
  assert _tree_digest(moved) == before
  # The same run resumes (and writes its config.json again).
  r = _run(_args(embedded_prepared, moved, **few), devices=1)
  assert r.returncode == 0 and (moved / "config.json").is_file(), r.stderr[-2000:]


# --- issue 15 item 3: the overfitting flag on a real run at heavy repetition ----------------------

def test_overfitting_flag_turns_on_in_a_real_heavily_repeated_run(embedded_prepared, tmp_path):  # noqa: F811
  """AR-only at r=64 on a ~100k-parameter model: the unique subset (~1k tokens) is memorised;
  the held-out loss turns up while the training loss falls, and the flag records when."""
  wd = tmp_path / "r128"
  r = _run(_args(embedded_prepared, wd, **{
      "objective.lam": 1.0, "data.repetitions": 64, "train.steps": 120, "log.val_every": 5,
      "checkpoint.every": 60, "log.every": 10}), devices=1)
  assert r.returncode == 0, r.stderr[-3000:]
  val = metrics_lib.read_metrics(wd, "val")
  last = val[max(val)]
  assert last["ar_overfitting"] is True and 30 <= last["ar_overfit_step"] <= 110, last
  first = last["ar_overfit_step"]
  assert [s for s, v in sorted(val.items()) if v.get("ar_overfitting")][0] == first
  best = min(v["ar_loss"] for v in val.values())
  assert last["ar_loss"] > 1.2 * best and last["ar_train_loss"] < val[first]["ar_train_loss"]
  row = results.row(wd)
  assert row["ar_overfitting"] == 1 and row["ar_overfit_step"] == first
  assert np.isnan(row["avg/ar"])

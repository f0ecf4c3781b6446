"""The training job end to end: `python -m dualjax.main`, bad starts, exact resume, SIGTERM,
non-finite loss, multi-process training, and the README demo."""

import hashlib
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import pytest

from data_fixtures import embedded_prepared  # noqa: F401  pylint: disable=unused-import
from dualjax import checkpoint as ckpt_lib
from dualjax import config_lib
from dualjax import metrics as metrics_lib
from dualjax import train as train_lib
from dualjax import trained
from dualjax import workdir as workdir_lib
from dualjax.errors import ConfigError
from dualjax.evaluation import suite
from test_metrics import read_events, scalars

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "rep32.py") + ":tiny"   # lam = 1/2: both objectives

# A ~100k-parameter model on the session's prepared embedded corpus (vocab 1024).
OVERRIDES = {
    "model.vocab_size": 1024, "model.d_model": 32, "model.num_heads": 2, "model.head_dim": 16,
    "model.mlp_dim": 64, "model.num_layers": 2,
    "data.source": "", "data.seq_len": 32, "data.global_batch": 16,
    "train.steps": 60, "checkpoint.every": 5, "checkpoint.keep": 2,
    "log.every": 1, "log.val_every": 20, "log.val_batches": 1,
}


def _args(prepared: pathlib.Path, workdir: pathlib.Path, **extra) -> list[str]:
  o = OVERRIDES | {"data.prepared_dir": str(prepared)} | extra
  return [f"--config={CONFIG}", f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in o.items()]


def _env(devices: int = 8) -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _main(args: list[str], devices: int = 8, **kw) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "dualjax.main", *args], cwd=REPO, env=_env(devices),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _run(args: list[str], devices: int = 8, timeout: float = 300) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "dualjax.main", *args], cwd=REPO, env=_env(devices),
                        capture_output=True, text=True, timeout=timeout, check=False)


def _losses(workdir: pathlib.Path) -> dict[int, tuple[float, float, float]]:
  return {s: (m["loss"], m["ar_loss"], m["mdm_loss"])
          for s, m in metrics_lib.read_metrics(workdir, "train").items()}


def _last_step(workdir: pathlib.Path) -> int:
  f = workdir / "metrics.jsonl"
  if not f.exists():
    return 0
  steps = [json.loads(l)["step"] for l in f.read_text().splitlines()
           if l.strip().endswith("}") and '"kind": "train"' in l]
  return max(steps, default=0)


def _signal_at(proc: subprocess.Popen, workdir: pathlib.Path, step: int, sig: int) -> None:
  """Sends `sig` once the run has logged `step` (or fails if it ends first)."""
  deadline = time.time() + 240
  while _last_step(workdir) < step:
    if proc.poll() is not None:
      pytest.fail(f"run ended before step {step}: {proc.stderr.read()[-2000:]}")
    if time.time() > deadline:
      proc.kill()
      pytest.fail(f"run did not reach step {step}")
    time.sleep(0.01)
  proc.send_signal(sig)


def _tree_digest(d: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference_run(embedded_prepared, tmp_path_factory):  # noqa: F811
  """One uninterrupted 60-step run on 8 devices in one process."""
  wd = tmp_path_factory.mktemp("reference")
  r = _run(_args(embedded_prepared, wd))
  assert r.returncode == 0, r.stderr[-3000:]
  return wd, r


def test_reference_run_outputs(reference_run):
  wd, r = reference_run
  losses = _losses(wd)
  assert sorted(losses) == list(range(1, 61))
  val = metrics_lib.read_metrics(wd, "val")
  assert sorted(val) == [0, 20, 40, 60]
  assert {"ar_loss", "mdm_loss", "ar_overfitting", "mdm_overfitting", "ar_overfit_step",
          "mdm_overfit_step", "val_tokens"} <= set(val[60])
  assert val[60]["ar_loss"] < val[0]["ar_loss"] and val[60]["mdm_loss"] < val[0]["mdm_loss"]
  # Logs (issue 13 item 19, issue 12): lr, step time, tokens/s, ETA in plain lines; compile line;
  # no MFU where the peak is unknown (CPU); the flags and hyper-parameters in TensorBoard.
  assert "compiling the training step (step 1)…" in r.stdout
  line = next(l for l in r.stdout.splitlines() if l.startswith("step 30/60 "))
  assert re.fullmatch(r"step 30/60 loss [\d.]+ ar_loss [\d.]+ mdm_loss [\d.]+ lr [\d.e-]+ "
                      r"[\d.]+ ms/step tok/s [\d,]+ ETA \d+:\d\d:\d\d", line), line
  train = metrics_lib.read_metrics(wd, "train")
  compiled = float(re.search(r"compiled in ([\d.]+) s", r.stdout)[1])
  assert train[1]["step_time_s"] < compiled / 2  # step 1's time leaves its compilation out
  assert train[30]["lr"] > 0 and "mfu" not in train[30]
  assert scalars(wd / "tensorboard", "val/ar_overfitting") == [(20, 0.0), (40, 0.0), (60, 0.0)]
  assert "hparams" in {v.metadata.plugin_data.plugin_name for e in read_events(wd / "tensorboard")
                       if e.HasField("summary") for v in e.summary.value}
  assert ckpt_lib.Checkpointer(wd, every=5, keep=2).manager.all_steps() == [55, 60]
  assert (wd / "tensorboard").is_dir() and (wd / "tokenizer.model").is_file()
  assert "lam 0.5 = 4/8 AR cells" in r.stdout + r.stderr
  t = trained.load(wd)
  assert t.step == 60 and t.model_cfg.d_model == 32 and t.tokenizer.vocab_size == 1024
  assert t.params["embed"].shape == (1024, 32)


@pytest.mark.slow
def test_sigterm_then_sigkill_resume_reproduces_the_uninterrupted_run(
    embedded_prepared, reference_run, tmp_path):  # noqa: F811
  ref = _losses(reference_run[0])
  wd = tmp_path / "run"
  args = _args(embedded_prepared, wd)
  # SIGTERM: a checkpoint at the next step boundary, exit code 0.
  proc = _main(args)
  _signal_at(proc, wd, 8, signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  stopped = _last_step(wd)
  assert stopped < 60 and f"SIGTERM: saved a checkpoint at step {stopped}" in out
  assert ckpt_lib.Checkpointer(wd, every=5, keep=2).latest_step() == stopped
  # SIGKILL mid-training, with checkpoints every 5 steps (one may be half written).
  proc = _main(args)
  _signal_at(proc, wd, stopped + 12, signal.SIGKILL)
  proc.communicate(timeout=60)
  killed = _last_step(wd)
  assert killed < 60, "the run finished before it could be killed"
  # Restart to the end: every step's losses equal the uninterrupted run's, bit for bit.
  r = _run(args)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from step" in r.stderr
  got = _losses(wd)
  assert sorted(got) == sorted(ref)
  diff = {s: (got[s], ref[s]) for s in ref if got[s] != ref[s]}
  assert not diff, f"steps differ after resume: {dict(list(diff.items())[:3])}"
  for s in (0, 20, 40, 60):  # incl. the mean train loss since the previous validation
    got_v, ref_v = (metrics_lib.read_metrics(d, "val")[s] for d in (wd, reference_run[0]))
    assert {k: v for k, v in got_v.items() if k != "time"} == \
        {k: v for k, v in ref_v.items() if k != "time"}


def test_stop_at_then_resume_equals_the_uninterrupted_run(
    embedded_prepared, reference_run, tmp_path):  # noqa: F811
  """train.stop_at ends a start at step N with a checkpoint; the schedule and unique subset still
  follow train.steps, so resuming without it reproduces the uninterrupted run bit for bit."""
  wd = tmp_path / "stopped"
  r = _run(_args(embedded_prepared, wd) + ["--config.train.stop_at=23"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert "stopped at step 23 (train.stop_at)" in r.stdout and _last_step(wd) == 23
  assert ckpt_lib.Checkpointer(wd, every=5, keep=2).latest_step() == 23
  r = _run(_args(embedded_prepared, wd) + ["--config.train.stop_at=10"])  # already past it
  assert r.returncode == 0 and "nothing to do" in r.stdout, r.stderr[-3000:]
  r = _run(_args(embedded_prepared, wd))
  assert r.returncode == 0 and "resumed from step 23" in r.stderr, r.stderr[-3000:]
  ref = reference_run[0]
  assert _losses(wd) == _losses(ref)
  for s in (0, 20, 40, 60):
    got_v, ref_v = (metrics_lib.read_metrics(d, "val")[s] for d in (wd, ref))
    assert {k: v for k, v in got_v.items() if k != "time"} == \
        {k: v for k, v in ref_v.items() if k != "time"}
  r = _run(_args(embedded_prepared, wd) + ["--config.train.stop_at=61"])
  assert r.returncode == 2 and "train.stop_at=61 must be in [0, train.steps=60]" in r.stderr


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one(embedded_prepared, reference_run, tmp_path):  # noqa: F811
  """2 processes x 4 CPU devices with jax.distributed on localhost == 1 process x 8 devices."""
  wd = tmp_path / "multi"
  args = _args(embedded_prepared, wd) + [
      f"--coordinator_address=localhost:{_free_port()}", "--num_processes=2"]
  procs = [_main(args + [f"--process_id={i}"], devices=4) for i in range(2)]
  outs = [p.communicate(timeout=400) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  got, ref = _losses(wd), _losses(reference_run[0])
  assert sorted(got) == sorted(ref)
  # Step 1 sees the same init, rows and noise: equal up to the summation order of the
  # cross-process (Gloo) all-reduce, ~1e-7 relative, which grows slowly through training.
  assert got[1] == pytest.approx(ref[1], rel=1e-6)
  for s in ref:
    assert got[s] == pytest.approx(ref[s], rel=2e-4 if s <= 12 else 5e-3), s
  assert ckpt_lib.Checkpointer(wd, every=5, keep=2).latest_step() == 60
  # Step 60's data file of process 1 only is damaged: both processes agree to fall back to 55,
  # retrain 56..60 and move step 60 aside (no process goes on alone or hangs).
  (wd / "checkpoints" / "60" / "data" / "process_1-of-2.json").write_text("{not json")
  args[-2] = f"--coordinator_address=localhost:{_free_port()}"
  procs = [_main(args + [f"--process_id={i}"], devices=4) for i in range(2)]
  outs = [p.communicate(timeout=400) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "resumed from step 55" in outs[0][1]
  assert [d.name.split("-")[0] for d in (wd / "corrupt").iterdir()] == ["60"]
  assert ckpt_lib.Checkpointer(wd, every=5, keep=2).latest_step() == 60


@pytest.mark.slow
def test_one_device_trains_like_eight(embedded_prepared, reference_run, tmp_path):  # noqa: F811
  """The losses do not depend on the mesh (issue 13 item 9): the same rows get the same
  objective and noise on 1 device (time split, 2 microsteps) as on 8 (device split, 4 + 4), and
  a run started on 1 device and resumed on 8 continues the same trajectory."""
  wd = tmp_path / "one"
  r = _run(_args(embedded_prepared, wd, **{"train.stop_at": 3}), devices=1)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "objective split: time" in r.stdout + r.stderr
  r = _run(_args(embedded_prepared, wd, **{"train.stop_at": 6}), devices=8)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from step 3" in r.stdout + r.stderr and "objective split: device" in r.stdout
  got, ref = _losses(wd), _losses(reference_run[0])
  assert sorted(got) == list(range(1, 7))
  assert got[1] == pytest.approx(ref[1], rel=1e-6)  # the same sums in another order
  for s in got:  # Muon's bf16 Newton-Schulz amplifies that order a little, step by step
    assert got[s] == pytest.approx(ref[s], rel=1e-4), s


@pytest.mark.slow
def test_rows_per_device_fitted_at_start_up(embedded_prepared, tmp_path):  # noqa: F811
  """mesh.max_device_rows=-1: start-up compiles the step for these devices and trains with the
  rows and remat it chose (recorded in config.json); on CPU without a memory size, one line."""
  wd = tmp_path / "fit"
  r = _run(_args(embedded_prepared, wd, **{"train.stop_at": 2, "mesh.max_device_rows": -1,
                                          "mesh.device_memory_gb": 50, "model.remat": "full"}))
  assert r.returncode == 0, r.stderr[-3000:]
  out = r.stdout + r.stderr
  assert "fitting rows per device and remat to 8 x cpu (50.00 GB per device" in out, out[-3000:]
  # 16 rows on 8 devices: at most 2 rows per device, and nothing needs recomputation
  assert "fitted: mesh.max_device_rows=2 model.remat=none" in out, out[-3000:]
  saved = json.loads((wd / "config.json").read_text())
  assert saved["mesh"]["max_device_rows"] == 2 and saved["model"]["remat"] == "none"
  assert sorted(_losses(wd)) == [1, 2]
  r = _run(_args(embedded_prepared, tmp_path / "nomem", **{"mesh.max_device_rows": -1}))
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(
      "error: mesh.device_memory_gb: the cpu devices report no memory limit"), r.stderr[-2000:]
  assert not (tmp_path / "nomem").exists()


def test_bad_starts_fail_in_one_line_and_leave_the_workdir_alone(
    reference_run, embedded_prepared, tmp_path):  # noqa: F811
  from dualjax import prepare as prepare_lib  # pylint: disable=import-outside-toplevel
  wd = reference_run[0]
  before = _tree_digest(wd)
  other = tmp_path / "other"   # prepared with another tokenizer
  (tmp_path / "docs.jsonl").write_text("".join(
      json.dumps({"text": f"document {i}: " + "lorem ipsum dolor " * (i % 7 + 1)}) + "\n"
      for i in range(300)))
  prepare_lib.prepare(str(tmp_path / "docs.jsonl"), other, vocab_size=300, num_workers=1,
                      val_fraction=0.1, verbose=False)
  cases = [
      (["--config.model.d_modle=3"], r"--config\.model\.d_modle: unknown config key"),
      (["--config.train.steps=many"], r"--config\.train\.steps=many"),
      (["--config.objective.lam=0.3"], r"objective\.lam=0\.3 is not representable .* nearest: "
                                       r"4/16 = 0\.25 or 5/16 = 0\.3125"),
      (["--config.mesh.replica=3"], r"mesh: replica\*fsdp\*tensor = 3 but there are 8 devices"),
      (["--config.data.global_batch=12"], r"data\.global_batch=12 is not divisible by the 8 replicas"),
      (["--config.optim.learning_rate=0.5"], r"holds a run with a different config: optim\.learning_rate"),
      (["--config.data.repetitions=100000"], r"holds a run with a different config: data\.repetitions"),
      (["--config.model.vocab_size=512"], r"model\.vocab_size=512 is smaller than the tokenizer's 1024"),
  ]
  for extra, pattern in cases:
    r = _run(_args(embedded_prepared, wd) + extra)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (extra, r.stderr[-2000:])
    assert len(lines) == 1 and re.search(pattern, lines[0]), (extra, r.stderr)
  r = _run(_args(other, wd))
  assert r.returncode == 2 and re.fullmatch(
      r"error: data: the tokenizer of \S+ differs from this run's \S+tokenizer.model .*",
      r.stderr.strip()), r.stderr[-2000:]
  r = _run(_args(embedded_prepared, wd) + ["steps=5"])
  assert r.returncode == 2 and r.stderr.strip() == (
      "error: unexpected arguments: steps=5 (flags take the form --name=value)"), r.stderr
  r = _run([f"--config={REPO}/configs/nope.py", f"--workdir={wd}"])
  assert r.returncode == 2 and "nope.py" in r.stderr and len(r.stderr.strip().splitlines()) == 1
  assert _tree_digest(wd) == before


def test_plan_errors_before_any_write(embedded_prepared, tmp_path):  # noqa: F811
  wd = tmp_path / "never"
  cfg = config_lib.rep_config(32, "tiny")
  cfg.data.source, cfg.data.prepared_dir = "", str(embedded_prepared)
  cfg.data.seq_len = 999
  with pytest.raises(ConfigError, match=r"data.seq_len=999 must be in \[1, model.max_seq_len=128\]"):
    train_lib.plan(cfg, wd)
  cfg.data.seq_len = 32
  cfg.data.repetitions = 10**9   # the unique subset is smaller than one batch: a data error
  with pytest.raises(Exception, match=r"repetitions=1000000000 leaves a unique subset"):
    train_lib.train(cfg, wd)
  assert not (wd / "config.json").exists() and not (wd / "checkpoints").exists()


def test_non_finite_loss_stops_with_a_clear_message(embedded_prepared, tmp_path):  # noqa: F811
  wd = tmp_path / "nan"
  # Warmup starts at lr 0: step 1 is fine, step 2 blows the parameters up.
  r = _run(_args(embedded_prepared, wd, **{"optim.learning_rate": 1e30, "optim.warmup_steps": 3,
                                           "checkpoint.every": 1, "log.val_every": 0}))
  assert r.returncode == 1, r.stderr[-2000:]
  m = re.search(r"error: non-finite loss or gradient at step (\d+) .*last good checkpoint: step (\d+)", r.stderr)
  assert m, r.stderr[-2000:]
  bad, good = int(m.group(1)), int(m.group(2))
  assert good == bad - 1 >= 1
  restored = trained.load(wd)
  assert restored.step == good
  assert all(bool(jax.numpy.isfinite(x).all()) for x in jax.tree.leaves(restored.params))


@pytest.mark.slow
def test_readme_demo_runs_as_written_and_validation_loss_falls(tmp_path):
  readme = (REPO / "README.md").read_text()
  cmd = re.search(r"python -m dualjax\.main [^\n`#]*", readme).group(0)
  cmd = re.sub(r"--workdir=\S+", f"--workdir={tmp_path / 'demo'}", cmd).split()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")  # as on a fresh machine: 1 CPU device
  r = subprocess.run([sys.executable] + cmd[1:], cwd=REPO, env=env, capture_output=True, text=True,
                     timeout=600, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  val = metrics_lib.read_metrics(tmp_path / "demo", "val")
  first, last = val[min(val)], val[max(val)]
  assert last["ar_loss"] < first["ar_loss"] - 1.0 and last["mdm_loss"] < first["mdm_loss"] - 1.0


def test_evaluate_cli_reads_a_training_workdir(reference_run, eval_data_dir, tmp_path):
  out = tmp_path / "eval.json"
  r = subprocess.run(
      [sys.executable, "-m", "dualjax.evaluate", f"--workdir={reference_run[0]}",
       "--config.eval.tasks=arc_easy,piqa", "--config.eval.limit=6",
       f"--config.eval.data_dir={eval_data_dir}",
       f"--out={out}"], cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=300,
      check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads(out.read_text())
  assert res["step"] == 60 and res["tasks"]["piqa"]["num_examples"] == 6
  assert 0.0 <= res["tasks"]["arc_easy"]["modes"]["ar"]["acc"] <= 1.0
  # No --modes: those a dual model (lam = 1/2) supports, i.e. all four.
  assert res["config"]["modes"] == ["ar", "prefix", "pll1", "pll6", "mc"]


def test_default_evaluation_modes_follow_the_trained_lambda(reference_run, tmp_path):
  assert workdir_lib.run_lam(reference_run[0]) == 0.5
  assert workdir_lib.run_lam(reference_run[0] / "checkpoints" / "60") == 0.5
  assert workdir_lib.run_lam(tmp_path) is None
  assert suite.supported_modes(1.0) == ("ar",)
  assert suite.supported_modes(0.0) == ("pll", "mc")
  assert suite.supported_modes(0.5) == suite.supported_modes(None) == ("ar", "prefix", "pll", "mc")


def test_periodic_evaluation_during_training(embedded_prepared, eval_data_dir, tmp_path):  # noqa: F811
  cfg = config_lib.rep_config(32, "tiny")
  for k, v in (OVERRIDES | {"data.prepared_dir": str(embedded_prepared), "train.steps": 4,
                            "data.repetitions": 1, "log.val_every": 0, "eval.every": 2,
                            "eval.tasks": "arc_easy",
                            "eval.modes": "ar,prefix", "eval.limit": 4,
                            "eval.data_dir": str(eval_data_dir)}).items():
    section, name = k.split(".")
    cfg[section][name] = v
  train_lib.train(cfg, tmp_path / "run")
  evals = metrics_lib.read_metrics(tmp_path / "run", "eval")
  assert sorted(evals) == [2, 4]
  assert {"arc_easy/ar/acc", "arc_easy/prefix/score", "headline/ar"} <= set(evals[4])
  assert json.loads((tmp_path / "run" / "eval" / "step_4.json").read_text())["step"] == 4
  assert (tmp_path / "run" / "eval" / "step_4.md").is_file()

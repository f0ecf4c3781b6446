"""Metrics: JSONL + TensorBoard writer (repair and truncation on resume, booleans, hparams),
progress timing/lines, and the §5.3 overfitting detector on synthetic noisy curves."""

import json
import math
import re
import struct

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from dualjax import metrics


def read_events(directory):
  """Every Event of the TensorBoard files in `directory` (TFRecord framing read by hand)."""
  events = []
  for f in sorted(directory.glob("events.out.tfevents.*")):
    data = f.read_bytes()
    pos = 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      ev = event_pb2.Event()
      ev.ParseFromString(data[pos + 12:pos + 12 + n])
      events.append(ev)
      pos += 12 + n + 4
  return events


def scalars(directory, tag):
  return [(e.step, v.simple_value) for e in read_events(directory) if e.HasField("summary")
          for v in e.summary.value if v.tag == tag]


def test_writer_jsonl_and_tensorboard(tmp_path):
  w = metrics.MetricWriter(tmp_path)
  w.write(1, "train", {"loss": 2.5, "note": "x"})
  w.write(2, "train", {"loss": 2.0})
  w.write(1, "train", {"loss": 2.4})  # re-run after a resume: last one wins
  w.write(2, "val", {"ar_loss": 3.0, "ar_overfitting": True, "ar_overfit_step": 2})
  w.write_hparams({"lam": 0.5, "repetitions": 4}, ("val/ar_loss",))
  w.close()
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert len(lines) == 4 and lines[0]["note"] == "x"
  train = metrics.read_metrics(tmp_path)
  assert {s: r["loss"] for s, r in train.items()} == {1: 2.4, 2: 2.0}
  assert metrics.read_metrics(tmp_path, "val")[2]["ar_loss"] == 3.0
  tb = tmp_path / "tensorboard"
  assert scalars(tb, "val/ar_overfitting") == [(2, 1.0)]  # booleans reach TensorBoard as 0/1
  assert scalars(tb, "train/loss") == [(1, 2.5), (2, 2.0), (1, pytest.approx(2.4))]
  # The hparams summaries (HParams tab) are in the run's own event file.
  plugins = {v.metadata.plugin_data.plugin_name for e in read_events(tb) if e.HasField("summary")
             for v in e.summary.value}
  assert "hparams" in plugins


def test_resume_repairs_a_torn_line_and_drops_later_steps(tmp_path):
  w = metrics.MetricWriter(tmp_path)
  for s in range(1, 7):
    w.write(s, "train", {"loss": 10.0 - s})
  w.write(5, "val", {"ar_loss": 1.0})
  w.close()
  with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
    f.write('{"step": 7, "kind": "train", "lo')  # killed mid-write
  w = metrics.MetricWriter(tmp_path, resume_step=4)  # the checkpoint restored was step 4
  w.write(5, "train", {"loss": 0.5})
  w.close()
  text = (tmp_path / "metrics.jsonl").read_text()
  recs = [json.loads(l) for l in text.splitlines()]  # every line parses
  assert [(r["step"], r["kind"]) for r in recs] == [(1, "train"), (2, "train"), (3, "train"),
                                                    (4, "train"), (5, "train")]
  assert recs[-1]["loss"] == 0.5 and text.endswith("\n")
  # TensorBoard hides the re-run steps: a SessionLog START at step 5 purges later events.
  starts = [e.step for e in read_events(tmp_path / "tensorboard") if e.HasField("session_log")]
  assert 5 in starts
  # A fresh start (no checkpoint) keeps nothing: step 0's validation runs again.
  w = metrics.MetricWriter(tmp_path, resume_step=0)
  w.close()
  assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_repair_metrics_counts(tmp_path):
  p = tmp_path / "m.jsonl"
  p.write_text('{"step": 1, "kind": "train"}\nnot json\n{"step": 3, "kind": "val"}\n{"st')
  assert metrics.repair_metrics(p, keep_through=2) == 3
  assert p.read_text() == '{"step": 1, "kind": "train"}\n'
  assert metrics.repair_metrics(p, keep_through=2) == 0


def test_progress_times_steps_between_marks():
  p = metrics.Progress(total_steps=100, start_step=0, tokens_per_step=1000,
                       flops_per_token=6.0, peak_flops=1e6, chips=2)
  p.mark(0, skip_next=True)
  assert p.update(1, 3.0) == {}          # includes compilation: not measured
  p._t -= 0.5                            # pretend 2 steps took 0.5 s on the device
  out = p.update(3, 2.0)
  assert out["step_time_s"] == pytest.approx(0.25, rel=0.05)
  assert out["tokens_per_s"] == pytest.approx(4000, rel=0.05)
  assert out["mfu"] == pytest.approx(4000 * 6.0 / 2e6, rel=0.05)
  line = p.line(3, {"loss": 2.0, "ar_loss": 1.5, "lr": 1e-3, **out})
  m = re.fullmatch(r"step 3/100 loss 2\.0000 ar_loss 1\.5000 lr 0\.001 ([\d.]+) ms/step tok/s "
                   r"([\d,]+) MFU ([\d.]+)% ETA 0:00:(\d\d)", line)
  assert m, line
  assert float(m[1]) == pytest.approx(250, rel=0.05)
  assert int(m[2].replace(",", "")) == pytest.approx(4000, rel=0.05)
  assert float(m[3]) == pytest.approx(1.2, abs=0.1) and 22 <= int(m[4]) <= 26  # 97 x 0.25 s
  cpu = metrics.Progress(total_steps=10, start_step=0, tokens_per_step=10)  # peak unknown
  cpu.mark(0)
  cpu._t -= 0.1
  assert "mfu" not in cpu.update(1, 1.0)
  p.close()
  cpu.close()


def _feed(detector, val, train, obj="ar", every=10):
  out = None
  for i, (v, t) in enumerate(zip(val, train)):
    out = detector.update(obj, (i + 1) * every, float(v), float(t))
  return out


def test_overfit_flag_on_a_rising_held_out_curve():
  x = np.arange(40)
  rng = np.random.default_rng(0)
  val = (4 + 3 * np.exp(-x / 5) + 0.05 * np.maximum(x - 15, 0)) * (1 + 0.01 * rng.standard_normal(40))
  train = 3 + 3 * np.exp(-x / 5) - 0.02 * x
  d = metrics.OverfitDetector(rel_tol=0.01, window=3, patience=2)
  out = _feed(d, val, train)
  assert out["overfitting"] and 160 <= out["overfit_step"] <= 300, out
  # The flag stays on and its first step does not move.
  again = d.update("ar", 410, float(val[-1]), float(train[-1]))
  assert again["overfitting"] and again["overfit_step"] == out["overfit_step"]
  # Restored from its state (a checkpoint), the detector continues identically.
  d2 = metrics.OverfitDetector(0.01, 3, 2)
  d2.restore(json.loads(json.dumps(d.state())))
  assert d2.update("ar", 420, 9.0, 0.5) == d.update("ar", 420, 9.0, 0.5)


@pytest.mark.parametrize("sigma", [0.005, 0.01, 0.02])
def test_noisy_flat_held_out_curve_does_not_flag(sigma):
  flagged = []
  for seed in range(20):
    rng = np.random.default_rng(seed)
    val = 5.0 * (1 + sigma * rng.standard_normal(60))
    train = 4.0 - 0.01 * np.arange(60) + 0.05 * rng.standard_normal(60)  # still converging
    out = _feed(metrics.OverfitDetector(0.01, 3, 2), val, train)
    flagged += [seed] if out["overfitting"] else []
  assert not flagged, f"a flat curve with {sigma:.1%} noise was flagged (seeds {flagged})"


def test_spikes_and_a_train_loss_that_stopped_falling_do_not_flag():
  x = np.arange(30)
  val = 4 + 3 * np.exp(-x / 5)
  val[[12, 20]] += 2.0                        # two isolated spikes
  out = _feed(metrics.OverfitDetector(0.01, 3, 2), val, 3 + 3 * np.exp(-x / 5))
  assert not out["overfitting"]
  rising = 4 + 0.05 * x                       # held-out rises but so does training loss
  out = _feed(metrics.OverfitDetector(0.01, 3, 2), rising, 3 + 0.05 * x)
  assert not out["overfitting"]
  # Objectives are separate; non-finite values are skipped.
  d = metrics.OverfitDetector()
  assert d.update("mdm", 10, math.nan, 1.0) == {"overfitting": False, "overfit_step": -1,
                                                "diverging": False}
  with pytest.raises(ValueError, match="window"):
    metrics.OverfitDetector(window=0)

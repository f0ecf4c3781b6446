import json

from dualjax import metrics


def test_writer_jsonl_and_tensorboard(tmp_path):
  w = metrics.MetricWriter(tmp_path)
  w.write(1, "train", {"loss": 2.5, "note": "x"})
  w.write(2, "train", {"loss": 2.0})
  w.write(1, "train", {"loss": 2.4})  # re-run after a resume: last one wins
  w.write(2, "val", {"ar_loss": 3.0})
  w.close()
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert len(lines) == 4 and lines[0]["note"] == "x"
  train = metrics.read_metrics(tmp_path)
  assert {s: r["loss"] for s, r in train.items()} == {1: 2.4, 2: 2.0}
  assert metrics.read_metrics(tmp_path, "val")[2]["ar_loss"] == 3.0
  assert any((tmp_path / "tensorboard").iterdir())


def test_overfit_detector():
  d = metrics.OverfitDetector(rel_tol=0.01)
  assert not d.update("ar", val_loss=3.0, train_loss=3.1)
  assert not d.update("ar", val_loss=2.5, train_loss=2.6)   # both fall
  assert not d.update("ar", val_loss=2.51, train_loss=2.4)  # within tolerance
  assert d.update("ar", val_loss=2.7, train_loss=2.3)       # val rises, train falls
  assert not d.update("ar", val_loss=2.7, train_loss=2.7)   # train no longer falls: underfit/noise
  assert not d.update("mdm", val_loss=5.0, train_loss=5.0)  # objectives are separate
  d2 = metrics.OverfitDetector()
  d2.restore(d.state())
  assert d2.update("ar", val_loss=2.7, train_loss=2.3)

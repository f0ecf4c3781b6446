"""Training metrics: JSONL + TensorBoard event files, a terminal progress bar, overfitting flag."""

import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Mapping

import tensorboardX
import tqdm


class MetricWriter:
  """Appends one JSON object per record to `metrics.jsonl` and scalars to TensorBoard."""

  def __init__(self, workdir: str | os.PathLike, enabled: bool = True):
    self.enabled = enabled
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    if enabled:
      self._file = open(self.path, "a", encoding="utf-8")
      self._tb = tensorboardX.SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

  def write(self, step: int, kind: str, values: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "kind": kind, "time": time.time(), **_plain(values)}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    for k, v in record.items():
      if k not in ("step", "time", "kind") and isinstance(v, (int, float)) and not isinstance(v, bool):
        self._tb.add_scalar(f"{kind}/{k}", v, step)

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      self._tb.close()


def _plain(values: Mapping[str, Any]) -> dict[str, Any]:
  out = {}
  for k, v in values.items():
    if hasattr(v, "item"):
      v = v.item()
    out[k] = v
  return out


def read_metrics(workdir: str | os.PathLike, kind: str = "train") -> dict[int, dict[str, Any]]:
  """Records of one kind by step; a step logged twice (re-run after a resume) keeps the last."""
  out: dict[int, dict[str, Any]] = {}
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if path.exists():
    for line in path.read_text(encoding="utf-8").splitlines():
      if line.strip():
        rec = json.loads(line)
        if rec.get("kind") == kind:
          out[rec["step"]] = rec
  return out


class Progress:
  """A tqdm bar with tokens/s, loss and ETA when stdout is a terminal; plain lines otherwise."""

  def __init__(self, total_steps: int, start_step: int, tokens_per_step: int):
    self.tokens_per_step = tokens_per_step
    self.tty = sys.stderr.isatty()
    self.bar = tqdm.tqdm(total=total_steps, initial=start_step, disable=not self.tty,
                         unit="step", dynamic_ncols=True)
    self._t = time.perf_counter()
    self._step = start_step

  def update(self, step: int, loss: float) -> float:
    """Moves to `step`; returns tokens/s since the previous update."""
    now = time.perf_counter()
    tok_s = (step - self._step) * self.tokens_per_step / max(now - self._t, 1e-9)
    self._t, self._step = now, step
    self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}")
    self.bar.update(step - self.bar.n)
    return tok_s

  def log(self, line: str) -> None:
    (self.bar.write if self.tty else print)(line)

  def close(self) -> None:
    self.bar.close()


class OverfitDetector:
  """Paper §5.3: held-out loss rising while training loss still falls.

  Flags an objective when its latest held-out loss exceeds its best by `rel_tol` while the training
  loss (mean since the previous evaluation) is below what it was at that best evaluation.
  """

  def __init__(self, rel_tol: float = 0.01):
    self.rel_tol = rel_tol
    self.best: dict[str, tuple[float, float]] = {}  # objective -> (best val, train at best)

  def update(self, objective: str, val_loss: float, train_loss: float) -> bool:
    if not (math.isfinite(val_loss) and math.isfinite(train_loss)):
      return False
    best = self.best.get(objective)
    if best is None or val_loss < best[0]:
      self.best[objective] = (val_loss, train_loss)
      return False
    return val_loss > best[0] * (1 + self.rel_tol) and train_loss < best[1]

  def state(self) -> dict[str, list[float]]:
    return {k: list(v) for k, v in self.best.items()}

  def restore(self, state: Mapping[str, list[float]]) -> None:
    self.best = {k: (float(v[0]), float(v[1])) for k, v in state.items()}

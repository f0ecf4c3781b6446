"""The training job: set-up, then a loop object (DESIGN.md §4, §9, §10).

`train(cfg, workdir)`:
  1. `plan` runs every check that needs no data (each module checks its own section) before
     anything is written; all processes agree on the outcome.
  2. Set-up: the workdir, the prepared data (once, process 0), the dataset, `config.json` and the
     tokenizer copy (see dualjax.workdir for the layout).
  3. `Trainer.run`: restores the newest readable checkpoint (or initialises), then steps. Metrics
     are fetched one step late, so the host never waits for the device on an ordinary step; at
     steps that validate, evaluate, checkpoint or stop the step's metrics are checked first
     (a non-finite step is never saved).
"""

import dataclasses
import logging
import math
import os
import pathlib
import shutil
import signal
from typing import Any

import jax
import ml_collections
import numpy as np

from dualjax import checkpoint as ckpt_lib
from dualjax import config_lib
from dualjax import distributed
from dualjax import mesh as mesh_lib
from dualjax import metrics as metrics_lib
from dualjax import model as model_lib
from dualjax import pipeline
from dualjax import prepare as prepare_lib
from dualjax import split as split_lib
from dualjax import state as state_lib
from dualjax import step as step_lib
from dualjax import tokenizer as tok_lib
from dualjax import workdir as workdir_lib
from dualjax.errors import ConfigError
from dualjax.evaluation import scoring
from dualjax.evaluation import suite

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
  """The loss became NaN/inf; the run stopped and the last good checkpoint is kept."""


@dataclasses.dataclass
class Plan:
  """Everything derived from the config before any work is done."""
  model_cfg: model_lib.ModelConfig
  mesh: jax.sharding.Mesh
  split: split_lib.ObjectiveSplit
  rules: tuple[tuple[str, Any], ...]
  eval_settings: suite.EvalSettings
  prepared_dir: pathlib.Path
  token_budget: int


def _check_trainer_fields(cfg: ml_collections.ConfigDict) -> None:
  """The fields only the trainer reads: train, checkpoint, log, objective.ar_loss_scale."""
  for name, value in (("train.steps", cfg.train.steps), ("checkpoint.every", cfg.checkpoint.every),
                      ("checkpoint.keep", cfg.checkpoint.keep), ("log.every", cfg.log.every)):
    if value < 1:
      raise ConfigError(f"{name} must be >= 1, got {value}")
  for name, value in (("log.val_every", cfg.log.val_every), ("log.val_batches", cfg.log.val_batches)):
    if value < 0:
      raise ConfigError(f"{name} must be >= 0, got {value}")
  if cfg.objective.ar_loss_scale <= 0:
    raise ConfigError(f"objective.ar_loss_scale must be > 0, got {cfg.objective.ar_loss_scale}")


def plan(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Plan:
  """Checks the config against the devices and the workdir; raises a one-line error."""
  mc = config_lib.model_config(cfg)
  _check_trainer_fields(cfg)
  prepare_lib.check_config(cfg.data, mc.vocab_size)
  pipeline.check_config(cfg.data, mc.max_seq_len, jax.process_count())
  mesh = mesh_lib.mesh_from_config(cfg.mesh)
  split = split_lib.split_from_config(cfg, mesh.shape)
  rules = config_lib.rules(cfg)
  try:
    state_lib.param_shardings(mc, mesh, rules)
  except (ValueError, KeyError, TypeError) as e:
    raise ConfigError(f"mesh.rules: {e}") from None
  settings = config_lib.eval_settings(cfg)
  if settings.every:
    try:
      suite.check_settings(settings, split.lam)
    except ValueError as err:
      raise ConfigError(f"eval: {err}") from None
  workdir_lib.check_identity(cfg, workdir)
  d = cfg.data
  prepared = pathlib.Path(d.prepared_dir) if d.prepared_dir else (
      pathlib.Path(workdir) / workdir_lib.PREPARED_DIR)
  budget = cfg.train.steps * d.global_batch * (d.seq_len + 1)
  return Plan(mc, mesh, split, rules, settings, prepared, budget)


def prepare_data(cfg: ml_collections.ConfigDict, p: Plan) -> tok_lib.Tokenizer:
  """Prepares the token shards once (process 0) and loads the tokenizer everywhere."""
  d = cfg.data
  error = None
  if distributed.is_main() and d.source:
    try:
      prepare_lib.prepare(d.source, p.prepared_dir, tokenizer=d.tokenizer or None,
                          vocab_size=p.model_cfg.vocab_size, num_workers=d.num_workers,
                          val_fraction=d.val_fraction)
    except Exception as e:  # pylint: disable=broad-except
      error = e
  distributed.agree_or_raise(error, ConfigError(
      f"data preparation into {p.prepared_dir} failed on process 0 (see its log)"))
  tok = prepare_lib.load_tokenizer(p.prepared_dir)
  prepare_lib.check_vocab(tok, p.model_cfg.vocab_size, p.prepared_dir)
  return tok


class _Preemption:
  """SIGTERM sets a flag; the loop saves at the next step boundary and exits 0."""

  def __init__(self):
    self.flag = False
    self._old = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.flag = True

  def requested(self) -> bool:
    """Whether any process was signalled (a collective: all processes agree and save together)."""
    return not distributed.processes_agree(not self.flag)

  def restore(self):
    signal.signal(signal.SIGTERM, self._old)


class Trainer:
  """The training loop over a planned, set-up run (see the module docstring)."""

  def __init__(self, cfg: ml_collections.ConfigDict, p: Plan, workdir: pathlib.Path,
               tokenizer: tok_lib.Tokenizer, dataset: Any):
    self.cfg, self.p, self.workdir, self.tokenizer = cfg, p, workdir, tokenizer
    self.it = iter(dataset)
    self.subset_tokens = dataset.plan.subset_tokens
    self.spec = state_lib.state_spec(cfg, p.mesh)
    self.ckpt = ckpt_lib.Checkpointer(workdir, every=cfg.checkpoint.every,
                                      keep=cfg.checkpoint.keep,
                                      async_save=cfg.checkpoint.async_save)
    self.overfit = metrics_lib.OverfitDetector(cfg.log.overfit_rel_tol)
    self.train_window: dict[str, list[float]] = {}
    self.start = 0
    self.state = None
    o = cfg.objective
    self.train_step = jax.jit(
        step_lib.make_train_step(p.model_cfg, p.split, p.mesh, self.spec.optimizer,
                                 ar_loss_scale=o.ar_loss_scale, z_loss=o.z_loss, rules=p.rules),
        in_shardings=(self.spec.shardings, mesh_lib.batch_sharding(p.mesh)),
        out_shardings=(self.spec.shardings, None), donate_argnums=(0,))
    self.eval_fn = jax.jit(step_lib.make_eval_fn(p.model_cfg, span_mask=cfg.log.span_mask_val,
                                                 mesh=p.mesh, rules=p.rules))
    self.scorer: scoring.Scorer | None = None  # built at the first evaluation, then reused
    self.writer = metrics_lib.MetricWriter(workdir, enabled=distributed.is_main())
    self.progress: metrics_lib.Progress | None = None
    self.preempt: _Preemption | None = None

  # --- set-up of the state -----------------------------------------------------------------------

  def restore_or_init(self) -> None:
    restored = self.ckpt.restore_latest(self.spec.abstract, self.it)
    if restored is None:
      self.state = state_lib.initial_state(self.spec)
      return
    self.start, self.state, meta = restored
    self.overfit.restore(meta.get("overfit", {}))
    self.train_window = meta.get("train_window", {})
    log.info("resumed from step %d", self.start)

  def _meta(self) -> dict[str, Any]:
    s = self.p.split
    return {"process_count": jax.process_count(), "tokenizer_checksum": self.tokenizer.checksum,
            "prepared_dir": str(self.p.prepared_dir), "lam": s.lam, "microsteps": s.microsteps,
            "replicas": s.replicas, "overfit": self.overfit.state(),
            "train_window": self.train_window}

  # --- the loop ----------------------------------------------------------------------------------

  def run(self) -> dict[str, Any]:
    """Trains from the restored step to `train.steps`; returns the last training metrics."""
    cfg, p = self.cfg, self.p
    steps, d = cfg.train.steps, cfg.data
    try:
      self.restore_or_init()
    except BaseException:
      self.ckpt.close()
      raise
    self.progress = metrics_lib.Progress(steps, self.start, d.global_batch * d.seq_len)
    if distributed.is_main():
      self.progress.log(
          f"{p.model_cfg.num_layers}-layer model, {model_lib.count_params(p.model_cfg)['total']:,} "
          f"parameters; mesh {dict(p.mesh.shape)}; r={d.repetitions}: unique subset "
          f"{self.subset_tokens:,} tokens; steps {self.start}->{steps}; workdir {self.workdir}")
      self.progress.log(p.split.describe())
    self.preempt = _Preemption()
    last: dict[str, Any] = {}
    try:
      if cfg.log.val_every and self.start == 0:  # the untrained baseline: curves start at 0
        self._validate(0)
      pending = None
      for step in range(self.start, steps):
        self.state, m = self.train_step(self.state, mesh_lib.to_global(next(self.it), p.mesh))
        done = step + 1
        if pending is not None:
          last = self._record(*pending)
        pending = (done, m)
        stop = self._check_preemption(done)
        if stop or self._sync_point(done):
          last = self._record(*pending)
          pending = None
          self._at_sync_point(done, force_save=stop or done == steps)
          if stop:
            self.progress.log(f"SIGTERM: saved a checkpoint at step {done}; exiting")
            break
    finally:
      self.ckpt.close()
      self.writer.close()
      self.progress.close()
      self.preempt.restore()
    return last

  def _sync_point(self, done: int) -> bool:
    cfg = self.cfg
    return (done == cfg.train.steps or self.ckpt.should_save(done)
            or bool(cfg.log.val_every and done % cfg.log.val_every == 0)
            or bool(self.p.eval_settings.every and done % self.p.eval_settings.every == 0))

  def _check_preemption(self, done: int) -> bool:
    # One process: a host flag, every step. Several: a collective, at logging steps only (the
    # same steps on every process), so that ordinary steps never wait for the device.
    if jax.process_count() == 1 or done % self.cfg.log.every == 0 or self._sync_point(done):
      return self.preempt.requested()
    return False

  def _record(self, done: int, metrics: dict[str, jax.Array]) -> dict[str, float]:
    """Fetches a step's metrics, stops on a non-finite one, logs them."""
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not all(math.isfinite(v) for v in m.values()):  # loss, and grads/params too
      good = self.ckpt.latest_step()
      raise NonFiniteLoss(
          f"non-finite loss or gradient at step {done} ("
          + ", ".join(f"{k}={v:.4g}" for k, v in m.items()) + "); stopped; "
          + (f"last good checkpoint: step {good} in {self.ckpt.directory}" if good is not None
             else "no checkpoint was written"))
    for k in ("ar_loss", "mdm_loss"):
      if k in m:
        self.train_window.setdefault(k, []).append(m[k])
    m["tokens_per_s"] = self.progress.update(done, m["loss"])
    if done % self.cfg.log.every == 0 or done == self.cfg.train.steps:
      self.writer.write(done, "train", m)
      if not self.progress.tty and distributed.is_main():
        self.progress.log(f"step {done}/{self.cfg.train.steps} loss {m['loss']:.4f} "
                          + " ".join(f"{k} {m[k]:.4f}" for k in ("ar_loss", "mdm_loss") if k in m)
                          + f" tok/s {m['tokens_per_s']:,.0f}")
    return m

  def _at_sync_point(self, done: int, force_save: bool) -> None:
    cfg, every = self.cfg, self.p.eval_settings.every
    if cfg.log.val_every and (done % cfg.log.val_every == 0 or done == cfg.train.steps):
      self._validate(done)
    if every and (done % every == 0 or done == cfg.train.steps):
      self._evaluate(done)
    if self.ckpt.save(done, self.state, self.it.get_state(), self._meta(), force=force_save):
      log.info("checkpoint at step %d", done)

  # --- validation and evaluation -----------------------------------------------------------------

  def _validate(self, done: int) -> None:
    v = validate(self.cfg, self.p, self.eval_fn, self.state["params"])
    if done:
      for obj in ("ar", "mdm"):
        window = self.train_window.pop(f"{obj}_loss", None)
        if window:  # mean training loss since the previous validation, and the §5.3 flag
          v[f"{obj}_train_loss"] = float(np.mean(window))
          v[f"{obj}_overfitting"] = self.overfit.update(obj, v[f"{obj}_loss"],
                                                        v[f"{obj}_train_loss"])
    self.writer.write(done, "val", v)
    if distributed.is_main():
      self.progress.log(f"step {done}: validation " + _fmt(v))

  def _evaluate(self, done: int) -> None:
    """Downstream tasks on the current parameters; JSON + Markdown per step, scores logged."""
    params = self.state["params"]
    if self.scorer is None:
      s = self.p.eval_settings
      self.scorer = scoring.Scorer(params, self.p.model_cfg, mesh=self.p.mesh, row_len=s.row_len,
                                   batch_tokens=s.batch_tokens)
    results = suite.evaluate_settings(params, self.p.model_cfg, self.tokenizer,
                                      self.p.eval_settings, self.p.split.lam, scorer=self.scorer,
                                      step=done, checkpoint=str(self.workdir))
    path = workdir_lib.eval_results_path(self.workdir, done)
    if distributed.is_main():
      suite.write_results(results, path)
    self.writer.write(done, "eval", suite.flat_scores(results))
    if distributed.is_main():
      self.progress.log(f"step {done}: evaluation written to {path.with_suffix('.md')}")


def validate(cfg: ml_collections.ConfigDict, p: Plan, eval_fn, params) -> dict[str, Any]:
  """Held-out AR loss and MDM NELBO over the first `log.val_batches` batches, fixed noise."""
  d = cfg.data
  ds = pipeline.make_val_dataset(
      p.prepared_dir, seq_len=d.seq_len, batch_size=d.global_batch,
      process_index=jax.process_index(), process_count=jax.process_count(),
      max_batches=cfg.log.val_batches or None)
  key = jax.random.fold_in(jax.random.key(cfg.seed), 2)
  sums: dict[str, float] = {}
  n = 0
  for i, local in enumerate(ds):
    out = jax.device_get(eval_fn(params, mesh_lib.to_global(local, p.mesh),
                                 jax.random.fold_in(key, i)))
    for k, v in out.items():
      sums[k] = sums.get(k, 0.0) + float(v)
    n += 1
  return {k: v / max(n, 1) for k, v in sums.items()} | {"val_batches": n}


def _fmt(values: dict[str, Any]) -> str:
  return " ".join(f"{k} {x:.4f}" if isinstance(x, float) else f"{k} {x}" for k, x in values.items())


def _write_run_files(cfg: ml_collections.ConfigDict, workdir: pathlib.Path,
                     tok: tok_lib.Tokenizer) -> None:
  """config.json and the tokenizer copy, once (process 0)."""
  if not distributed.is_main():
    return
  if not (workdir / workdir_lib.CONFIG_FILE).exists():
    workdir_lib.write_atomic(workdir / workdir_lib.CONFIG_FILE, cfg.to_json(indent=2))
  if not (workdir / workdir_lib.TOKENIZER_FILE).exists():
    shutil.copyfile(tok.path, workdir / workdir_lib.TOKENIZER_FILE)


def train(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns the last training metrics."""
  workdir = pathlib.Path(workdir)
  p, error = None, None
  try:
    p = plan(cfg, workdir)
  except Exception as e:  # pylint: disable=broad-except
    error = e
  distributed.agree_or_raise(error, ConfigError(
      "start-up checks failed on another process (see its log)"))
  if distributed.is_main():
    workdir.mkdir(parents=True, exist_ok=True)
  distributed.barrier("dualjax-workdir")
  tok = prepare_data(cfg, p)
  run_tok = workdir / workdir_lib.TOKENIZER_FILE
  if run_tok.exists() and tok_lib.file_checksum(run_tok) != tok.checksum:
    raise ConfigError(f"data: the tokenizer of {p.prepared_dir} differs from this run's "
                      f"{run_tok} (use the run's prepared data or another --workdir)")
  d = cfg.data
  ds = pipeline.make_train_dataset(
      p.prepared_dir, seq_len=d.seq_len, global_batch=d.global_batch, token_budget=p.token_budget,
      repetitions=d.repetitions, seed=cfg.seed, process_index=jax.process_index(),
      process_count=jax.process_count())
  assert ds.plan.num_full_batches >= cfg.train.steps, ds.plan
  if d.repetitions > 1 and ds.plan.subset_docs < 2:
    log.warning("the unique subset is a single document")
  # Nothing was written to the workdir but prepared data until here.
  _write_run_files(cfg, workdir, tok)
  return Trainer(cfg, p, workdir, tok, ds).run()

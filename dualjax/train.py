"""The training job: set-up, then a loop object (DESIGN.md §4, §9, §10).

`train(cfg, workdir)`:
  1. `plan` runs every check that needs no data work before anything is written (each module
     checks its own section; the prepared data's settings and sizes; the checkpoints' run
     identity); all processes agree on the outcome.
  2. Set-up: the workdir and its lock (one writer per workdir), the prepared data (built once on
     process 0 when absent; an existing one is never replaced unless it is this unstarted
     workdir's own), the datasets, then `config.json` and the tokenizer copy (see
     dualjax.workdir). A failure before those files are written leaves nothing behind: a workdir
     this start created is removed again.
  3. `Trainer.run`: restores the newest readable checkpoint of this run (or initialises), then
     steps. Metrics are fetched one step late, so the host never waits for the device on an
     ordinary step (tokens/s and MFU come from the times those fetches return); at steps that
     validate, evaluate, checkpoint or stop the step's metrics are checked first (a non-finite
     step is never saved). A failed asynchronous save is found at the next step.
SIGTERM before the loop exits at once (code 0); in the loop it saves at the next step boundary.
`train.stop_at=N` ends this start at step N with a checkpoint, leaving the run unchanged.
"""

import contextlib
import dataclasses
import errno
import logging
import math
import os
import pathlib
import shutil
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.contrib import logging as tqdm_logging

from dualjax import checkpoint as ckpt_lib
from dualjax import compile as compile_lib
from dualjax import config_lib
from dualjax import distributed
from dualjax import flops
from dualjax import lock as lock_lib
from dualjax import mesh as mesh_lib
from dualjax import metrics as metrics_lib
from dualjax import model as model_lib
from dualjax import optim
from dualjax import pipeline
from dualjax import prepare as prepare_lib
from dualjax import split as split_lib
from dualjax import state as state_lib
from dualjax import step as step_lib
from dualjax import tokenizer as tok_lib
from dualjax import validation
from dualjax import workdir as workdir_lib
from dualjax.errors import ConfigError
from dualjax.evaluation import scoring
from dualjax.evaluation import suite

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
  """The loss became NaN/inf; the run stopped and the last good checkpoint is kept."""


class StartupInterrupted(BaseException):
  """SIGTERM arrived before the training loop started: nothing to save, exit 0."""


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
  prepare_action: str = "use"  # 'use' the prepared data | 'build' it | 'replace' it (own, unused)
  identity: dict[str, Any] = dataclasses.field(default_factory=dict)


def _check_trainer_fields(cfg: ml_collections.ConfigDict) -> None:
  """The fields only the trainer reads: train, checkpoint, log, objective.ar_loss_scale."""
  for name, value in (("train.steps", cfg.train.steps), ("checkpoint.every", cfg.checkpoint.every),
                      ("checkpoint.keep", cfg.checkpoint.keep), ("log.every", cfg.log.every),
                      ("log.overfit_window", cfg.log.overfit_window),
                      ("log.overfit_patience", cfg.log.overfit_patience)):
    if value < 1:
      raise ConfigError(f"{name} must be >= 1, got {value}")
  for name, value in (("log.val_every", cfg.log.val_every), ("log.val_batches", cfg.log.val_batches),
                      ("checkpoint.keep_every", cfg.checkpoint.keep_every),
                      ("log.overfit_rel_tol", cfg.log.overfit_rel_tol)):
    if value < 0:
      raise ConfigError(f"{name} must be >= 0, got {value}")
  if not 0 <= cfg.train.stop_at <= cfg.train.steps:
    raise ConfigError(f"train.stop_at={cfg.train.stop_at} must be in [0, train.steps="
                      f"{cfg.train.steps}] (0 = run to the end)")
  if cfg.objective.ar_loss_scale <= 0:
    raise ConfigError(f"objective.ar_loss_scale must be > 0, got {cfg.objective.ar_loss_scale}")


def _prepared_action(cfg: ml_collections.ConfigDict, prepared: pathlib.Path, own: bool,
                     vocab_size: int) -> str:
  """What set-up does with the prepared data (no writes); PrepareError when it must refuse."""
  d = cfg.data
  if not d.source:  # the directory is used as it is
    prepare_lib.check_integrity(prepared)
    return "use"
  state, why = prepare_lib.status(prepared, d.source, tokenizer=d.tokenizer or None,
                                  vocab_size=vocab_size, val_fraction=d.val_fraction,
                                  text_field=d.text_field)
  if state == "ready":
    prepare_lib.check_integrity(prepared)
    return "use"
  if state == "absent":
    return "build"
  if own:  # this workdir's own directory and no run has started here: nothing else uses it
    return "replace"
  if state == "other":
    raise prepare_lib.PrepareError(
        f"data.prepared_dir: {why}, not from data.source={d.source!r}; use another "
        "data.prepared_dir, or set data.source='' to train on it as it is")
  raise prepare_lib.PrepareError(
      f"data.prepared_dir: {why}; rebuild it with python -m dualjax.prepare (the same "
      "--config.data.* fields) or use another data.prepared_dir")


def plan(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Plan:
  """Checks the config against the devices, the data and the workdir; raises a one-line error.

  Reads only: nothing is written. With `mesh.max_device_rows=-1` (and no `mesh.microsteps`) it
  first fits rows per device and remat to the devices (compiling the step; `cfg` is updated in
  place).
  """
  workdir = pathlib.Path(workdir)
  if compile_lib.fitted_rows(cfg):
    probe = ml_collections.ConfigDict(cfg.to_dict())
    probe.mesh.max_device_rows = 0
    error = None
    try:
      plan(probe, workdir)  # every other check first: a bad config costs no compile
    except Exception as e:  # pylint: disable=broad-except
      error = e
    distributed.agree_or_raise(error, ConfigError(
        "start-up checks failed on another process (see its log)"))
    compile_lib.fit_to_devices(cfg, log.info)  # sets max_device_rows and remat in cfg
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
  identity = workdir_lib.identity(cfg)
  ckpt_lib.check_identity(workdir / workdir_lib.CHECKPOINTS_DIR, identity)
  d = cfg.data
  budget = cfg.train.steps * d.global_batch * (d.seq_len + 1)
  pipeline.check_subset(token_budget=budget, repetitions=d.repetitions, seq_len=d.seq_len,
                        global_batch=d.global_batch)
  embedded = d.source.strip().startswith("embedded")
  if cfg.log.val_every and d.source and not embedded and d.val_fraction == 0:
    raise ConfigError("log.val_every needs validation documents but data.val_fraction=0 holds "
                      "none out (set it > 0, or log.val_every=0)")
  prepared = pathlib.Path(d.prepared_dir) if d.prepared_dir else (
      workdir / workdir_lib.PREPARED_DIR)
  own = not d.prepared_dir and not (workdir / workdir_lib.CONFIG_FILE).exists()
  action = _prepared_action(cfg, prepared, own, mc.vocab_size)
  return Plan(mc, mesh, split, rules, settings, prepared, budget, action, identity)


def prepare_data(cfg: ml_collections.ConfigDict, p: Plan) -> tok_lib.Tokenizer:
  """Prepares the token shards if the plan says so (process 0); loads the tokenizer everywhere."""
  d = cfg.data
  error = None
  if distributed.is_main() and p.prepare_action in ("build", "replace"):
    try:
      prepare_lib.prepare(d.source, p.prepared_dir, tokenizer=d.tokenizer or None,
                          vocab_size=p.model_cfg.vocab_size, num_workers=d.num_workers,
                          val_fraction=d.val_fraction, text_field=d.text_field,
                          replace=p.prepare_action == "replace")
    except Exception as e:  # pylint: disable=broad-except
      error = e
  distributed.agree_or_raise(error, ConfigError(
      f"data preparation into {p.prepared_dir} failed on process 0 (see its log)"))
  tok = prepare_lib.load_tokenizer(p.prepared_dir)
  prepare_lib.check_vocab(tok, p.model_cfg.vocab_size, p.prepared_dir)
  return tok


class _Signals:
  """SIGTERM: before the loop raises StartupInterrupted (exit 0 at once); in the loop sets a flag
  and the loop saves at the next step boundary, then exits 0."""

  def __init__(self):
    self.flag = False
    self.in_loop = False
    self._old = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.flag = True
    if not self.in_loop:
      raise StartupInterrupted()

  def restore(self):
    signal.signal(signal.SIGTERM, self._old)


class Trainer:
  """The training loop over a planned, set-up run (see the module docstring)."""

  def __init__(self, cfg: ml_collections.ConfigDict, p: Plan, workdir: pathlib.Path,
               tokenizer: tok_lib.Tokenizer, dataset: Any,
               validator: validation.Validator | None, signals: _Signals | None = None):
    self.cfg, self.p, self.workdir, self.tokenizer = cfg, p, workdir, tokenizer
    self.it = iter(dataset)
    self.subset_tokens = dataset.plan.subset_tokens
    self.validator = validator
    self.spec = state_lib.state_spec(cfg, p.mesh)
    c = cfg.checkpoint
    self.ckpt = ckpt_lib.Checkpointer(workdir, every=c.every, keep=c.keep,
                                      async_save=c.async_save, keep_every=c.keep_every,
                                      identity=p.identity)
    lg = cfg.log
    self.overfit = metrics_lib.OverfitDetector(lg.overfit_rel_tol, lg.overfit_window,
                                               lg.overfit_patience)
    self.train_window: dict[str, list[float]] = {}
    self.start = 0
    self.end = cfg.train.stop_at or cfg.train.steps
    self.state = None
    o = cfg.objective
    self.train_step = jax.jit(
        step_lib.make_train_step(p.model_cfg, p.split, p.mesh, self.spec.optimizer,
                                 ar_loss_scale=o.ar_loss_scale, z_loss=o.z_loss, rules=p.rules,
                                 grad_shardings=self.spec.grad_shardings),
        in_shardings=(self.spec.shardings, mesh_lib.batch_sharding(p.mesh)),
        out_shardings=(self.spec.shardings, None), donate_argnums=(0,))
    self.scorer: scoring.Scorer | None = None  # built at the first evaluation, then reused
    self.writer: metrics_lib.MetricWriter | None = None  # opened after the restore
    self.progress: metrics_lib.Progress | None = None
    self.signals = signals or _Signals()
    self._own_signals = signals is None
    self._lr: np.ndarray | None = None

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

  def _schedule(self) -> np.ndarray:
    """The learning rate of every step (WSD of the update count), computed once before the loop
    so that logging it never waits behind a training step."""
    c = optim.optim_config(self.cfg.optim)
    sched = optim.wsd_schedule(c.learning_rate, self.cfg.train.steps, c.warmup_steps,
                               c.decay_fraction)
    try:
      device = jax.local_devices(backend="cpu")[0]  # this process's own: no collective
    except RuntimeError:  # JAX_PLATFORMS without cpu
      device = jax.local_devices()[0]
    with jax.default_device(device):
      return np.asarray(jax.vmap(sched)(jnp.arange(self.cfg.train.steps)))

  def _learning_rate(self, step: int) -> float:
    """The learning rate step `step` (1-based) used: the schedule at update count step - 1."""
    return float(self._lr[min(max(step - 1, 0), len(self._lr) - 1)])

  # --- the loop ----------------------------------------------------------------------------------

  def run(self) -> dict[str, Any]:
    """Trains from the restored step to `train.stop_at` or `train.steps`; returns the last
    training metrics."""
    try:
      last = self._run()
    except BaseException as e:
      self._close(in_flight=e)
      raise
    self._close(in_flight=None)
    return last

  def _close(self, in_flight: BaseException | None) -> None:
    """Waits for the last save and closes the writers, raising what failed. With an error
    `in_flight`, only a failed save is raised over it, and only when that error is a full
    disk (a log write met the disk an asynchronous save had filled: the save is the cause)."""
    error: Exception | None = None
    try:
      self.ckpt.close()  # waits for the last save: CheckpointError if it failed
    except ckpt_lib.CheckpointError as e:
      if in_flight is None or (isinstance(in_flight, OSError)
                               and in_flight.errno in (errno.ENOSPC, errno.EDQUOT)):
        error = e
    for closable in (self.writer, self.progress):
      try:
        if closable is not None:
          closable.close()
      except OSError as e:
        if in_flight is None and error is None:
          error = e
    if self._own_signals:
      self.signals.restore()
    if error is not None:
      raise error from None

  def _run(self) -> dict[str, Any]:
    cfg, p = self.cfg, self.p
    steps, d = cfg.train.steps, cfg.data
    self.restore_or_init()
    main = distributed.is_main()
    self.writer = metrics_lib.MetricWriter(self.workdir, enabled=main, resume_step=self.start)
    self.progress = metrics_lib.Progress(
        steps, self.start, d.global_batch * d.seq_len,
        flops_per_token=flops.train_flops_per_token(p.model_cfg, d.seq_len, p.split.lam),
        peak_flops=flops.peak_flops(jax.devices()[0]), chips=jax.device_count())
    if main:
      self.progress.log(
          f"{p.model_cfg.num_layers}-layer model, {model_lib.count_params(p.model_cfg)['total']:,} "
          f"parameters; mesh {dict(p.mesh.shape)}; r={d.repetitions}: unique subset "
          f"{self.subset_tokens:,} tokens; steps {self.start}->{self.end}"
          + (f" of {steps} (train.stop_at)" if self.end < steps else "")
          + f"; workdir {self.workdir}")
      self.progress.log(p.split.describe())
    if self.start >= self.end:
      if main:
        self.progress.log(f"the run is at step {self.start}" + (
            f" (train.stop_at={self.end})" if self.end < steps else " (finished)")
            + ": nothing to do")
      return {}
    if self.start == 0:
      self._write_hparams()
    self._lr = self._schedule()
    redirect = (tqdm_logging.logging_redirect_tqdm() if self.progress.tty
                else contextlib.nullcontext())
    with redirect:
      return self._loop()

  def _loop(self) -> dict[str, Any]:
    cfg, p, steps = self.cfg, self.p, self.cfg.train.steps
    main = distributed.is_main()
    last: dict[str, Any] = {}
    if cfg.log.val_every and self.start == 0:  # the untrained baseline: curves start at 0
      self._validate(0)
    self.signals.in_loop = True
    if self.signals.flag:  # SIGTERM during the baseline validation: nothing new to save
      raise StartupInterrupted()
    pending = None
    for step in range(self.start, self.end):
      batch = mesh_lib.to_global(next(self.it), p.mesh)
      if step == self.start:
        if main:
          self.progress.log(f"compiling the training step (step {step + 1})…")
        t0 = time.perf_counter()
      self.state, m = self.train_step(self.state, batch)
      done = step + 1
      if step == self.start:
        if main:
          self.progress.log(f"compiled in {time.perf_counter() - t0:.1f} s")
        self.progress.mark(self.start)
      if pending is not None:
        last = self._record(*pending)
      pending = (done, m)
      stop = self._check_faults(done)
      if stop or self._sync_point(done):
        last = self._record(*pending)
        pending = None
        self._at_sync_point(done, force_save=stop or done == self.end)
        self.progress.mark(done)
        if stop:
          self.progress.log(f"SIGTERM: saved a checkpoint at step {done}; exiting")
          break
    else:
      if self.end < steps and main:
        self.progress.log(f"stopped at step {self.end} (train.stop_at) with a checkpoint; run "
                          "again without train.stop_at to continue to step "
                          f"{steps}")
    return last

  def _sync_point(self, done: int) -> bool:
    cfg = self.cfg
    return (done == cfg.train.steps or done == self.end or self.ckpt.should_save(done)
            or bool(cfg.log.val_every and done % cfg.log.val_every == 0)
            or bool(self.p.eval_settings.every and done % self.p.eval_settings.every == 0))

  def _check_faults(self, done: int) -> bool:
    """SIGTERM (-> True: save and stop) and failed asynchronous saves (-> CheckpointError).

    One process: every step, host-side only. Several: a collective at logging and sync steps
    (the same steps on every process), so that ordinary steps never wait for the device.
    """
    if jax.process_count() > 1 and done % self.cfg.log.every and not self._sync_point(done):
      return False
    error = self.ckpt.save_error()
    stop, failed = distributed.any_process([self.signals.flag, error is not None])
    if failed:
      raise error or ckpt_lib.CheckpointError(
          "a checkpoint save failed on another process (see its log)")
    return stop

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
    m.update(self.progress.update(done, m["loss"]))
    if done % self.cfg.log.every == 0 or done == self.end:
      m["lr"] = self._learning_rate(done)
      self.writer.write(done, "train", m)
      if not self.progress.tty and distributed.is_main():
        self.progress.log(self.progress.line(done, m))
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
    v = self.validator(self.state["params"])
    if done:
      for obj in ("ar", "mdm"):
        window = self.train_window.pop(f"{obj}_loss", None)
        if window:  # mean training loss since the previous validation, and the §5.3 flag
          v[f"{obj}_train_loss"] = float(np.mean(window))
          flag = self.overfit.update(obj, done, v[f"{obj}_loss"], v[f"{obj}_train_loss"])
          v[f"{obj}_overfitting"] = flag["overfitting"]
          v[f"{obj}_overfit_step"] = flag["overfit_step"]
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

  def _write_hparams(self) -> None:
    cfg, mc = self.cfg, self.p.model_cfg
    self.writer.write_hparams({
        "lam": cfg.objective.lam, "repetitions": cfg.data.repetitions, "seed": cfg.seed,
        "steps": cfg.train.steps, "learning_rate": cfg.optim.learning_rate,
        "global_batch": cfg.data.global_batch, "seq_len": cfg.data.seq_len,
        "d_model": mc.d_model, "num_layers": mc.num_layers,
        "params": model_lib.count_params(mc)["total"],
        "ar_loss_scale": cfg.objective.ar_loss_scale}, ("val/ar_loss", "val/mdm_loss"))


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


def _take_workdir(workdir: pathlib.Path) -> tuple[lock_lib.WorkdirLock | None, bool]:
  """Process 0 creates the workdir if needed and locks it; returns (lock, created)."""
  lock, created, error = None, False, None
  if distributed.is_main():
    try:
      if not workdir.exists():
        try:
          workdir.mkdir(parents=True)
        except OSError as e:
          raise lock_lib.LockError(f"cannot create --workdir {workdir} ({e.strerror})") from None
        created = True
      lock = lock_lib.WorkdirLock(workdir).acquire()
      if lock.taken_over:
        log.warning("took over the lock of process %s on %s (no longer running)",
                    lock.taken_over.get("pid"), lock.taken_over.get("host"))
    except lock_lib.LockError as e:
      if created:
        shutil.rmtree(workdir, ignore_errors=True)
      error = e
  distributed.agree_or_raise(error, lock_lib.LockError(
      f"workdir {workdir}: process 0 could not take it (see its log)"))
  return lock, created


def train(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns the last training metrics ({} when a
  SIGTERM arrived during start-up)."""
  workdir = pathlib.Path(workdir)
  signals = _Signals()
  try:
    return _train(cfg, workdir, signals)
  except StartupInterrupted:
    pass
  except Exception:  # pylint: disable=broad-except
    if not (signals.flag and not signals.in_loop):
      raise
    # The signal surfaced through a library as its own error (e.g. SentencePiece's trainer).
  finally:
    signals.restore()
  print("SIGTERM during start-up: stopped before training (nothing to save)", flush=True)
  return {}


def _train(cfg: ml_collections.ConfigDict, workdir: pathlib.Path, signals: _Signals
           ) -> dict[str, Any]:
  p, error = None, None
  try:
    p = plan(cfg, workdir)
  except Exception as e:  # pylint: disable=broad-except
    error = e
  distributed.agree_or_raise(error, ConfigError(
      "start-up checks failed on another process (see its log)"))
  lock, created = _take_workdir(workdir)
  prepared_existed = p.prepared_dir.exists()
  written = False
  try:
    tok = prepare_data(cfg, p)
    run_tok = workdir / workdir_lib.TOKENIZER_FILE
    if run_tok.exists() and tok_lib.file_checksum(run_tok) != tok.checksum:
      raise ConfigError(f"data: the tokenizer of {p.prepared_dir} differs from this run's "
                        f"{run_tok} (use the run's prepared data or another --workdir)")
    d = cfg.data
    ds = pipeline.make_train_dataset(
        p.prepared_dir, seq_len=d.seq_len, global_batch=d.global_batch,
        token_budget=p.token_budget, repetitions=d.repetitions, seed=cfg.seed,
        process_index=jax.process_index(), process_count=jax.process_count())
    assert ds.plan.num_full_batches >= cfg.train.steps, ds.plan
    if d.repetitions > 1 and ds.plan.subset_docs < 2:
      log.warning("the unique subset is a single document")
    validator = None
    if cfg.log.val_every:
      validator = validation.Validator(cfg, model_cfg=p.model_cfg, mesh=p.mesh,
                                       microsteps=p.split.microsteps,
                                       prepared_dir=p.prepared_dir, rules=p.rules)
    # Nothing was written to the workdir but its lock and prepared data until here.
    _write_run_files(cfg, workdir, tok)
    written = True
    return Trainer(cfg, p, workdir, tok, ds, validator, signals).run()
  except BaseException:
    if not written and distributed.is_main():  # leave nothing this start created behind
      if created:
        if lock is not None:
          lock.release()
        shutil.rmtree(workdir, ignore_errors=True)
      elif (not prepared_existed and p.prepared_dir.parent == workdir
            and p.prepared_dir.exists()):
        shutil.rmtree(p.prepared_dir, ignore_errors=True)
    raise
  finally:
    if lock is not None:
      lock.release()

"""The training job: data, mesh, state, the loop, checkpoints, metrics (DESIGN.md §4, §9, §10).

`train(cfg, workdir)` checks everything it can before writing anything (`plan`), prepares the
data once, then trains or resumes from the newest readable checkpoint in `workdir`:

  workdir/config.json        the run's config (a later start must agree on the run's identity)
  workdir/tokenizer.model    the tokenizer (with config.json, what `load_for_eval` needs)
  workdir/prepared/          token shards, unless data.prepared_dir points elsewhere
  workdir/checkpoints/N/     Orbax checkpoints: state (params, opt_state, step, rng), data, meta
  workdir/metrics.jsonl      one line per logged step: kind train | val | eval
  workdir/tensorboard/       the same as TensorBoard events
  workdir/eval/step_N.{json,md}  downstream evaluation results (eval.every > 0)
"""

import dataclasses
import functools
import json
import logging
import math
import os
import pathlib
import shutil
import signal
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from dualjax import checkpoint as ckpt_lib
from dualjax import mesh as mesh_lib
from dualjax import metrics as metrics_lib
from dualjax import model as model_lib
from dualjax import optim
from dualjax import pipeline
from dualjax import prepare as prepare_lib
from dualjax import sharding as sharding_lib
from dualjax import sources as sources_lib
from dualjax import step as step_lib
from dualjax import tokenizer as tok_lib
from dualjax.mesh import ConfigError

log = logging.getLogger(__name__)

# Config sections whose change makes an existing workdir a different run.
_RUN_IDENTITY = ("seed", "model", "data", "objective", "optim", "train")
_NOT_IDENTITY = ("data.prepared_dir", "data.num_workers", "model.attention_impl", "model.remat",
                 "model.scan_layers")
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"


class NonFiniteLoss(RuntimeError):
  """The loss became NaN/inf; the run stopped and the last good checkpoint is kept."""


@dataclasses.dataclass
class Plan:
  """Everything derived from the config before any work is done."""
  model_cfg: model_lib.ModelConfig
  mesh: jax.sharding.Mesh
  split: mesh_lib.Split
  prepared_dir: pathlib.Path
  token_budget: int


def model_config(cfg: ml_collections.ConfigDict) -> model_lib.ModelConfig:
  try:
    return model_lib.ModelConfig(**cfg.model.to_dict())
  except (TypeError, ValueError) as e:
    raise ConfigError(f"model: {e}") from None


def plan(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Plan:
  """Checks the config against the devices and the workdir; raises ConfigError in one line."""
  mc = model_config(cfg)
  d, o, t = cfg.data, cfg.objective, cfg.train
  workdir = pathlib.Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise ConfigError(f"--workdir {workdir} exists and is not a directory")
  if not d.source and not d.prepared_dir:
    raise ConfigError("data.source is empty: give a file/glob/dir, 'embedded' or 'tfds:...'")
  if d.seq_len < 1 or d.seq_len > mc.max_seq_len:
    raise ConfigError(f"data.seq_len={d.seq_len} must be in [1, model.max_seq_len={mc.max_seq_len}]")
  if mc.vocab_size < tok_lib.NUM_SPECIAL:
    raise ConfigError(f"model.vocab_size={mc.vocab_size} is smaller than the "
                      f"{tok_lib.NUM_SPECIAL} special tokens")
  for name, value in (("train.steps", t.steps), ("data.repetitions", d.repetitions),
                      ("data.global_batch", d.global_batch), ("checkpoint.every", cfg.checkpoint.every),
                      ("checkpoint.keep", cfg.checkpoint.keep), ("log.every", cfg.log.every)):
    if value < 1:
      raise ConfigError(f"{name} must be >= 1, got {value}")
  for name, value in (("log.val_every", cfg.log.val_every), ("log.val_batches", cfg.log.val_batches),
                      ("eval.every", cfg.eval.every), ("eval.limit", cfg.eval.limit)):
    if value < 0:
      raise ConfigError(f"{name} must be >= 0, got {value}")
  if o.ar_loss_scale <= 0:
    raise ConfigError(f"objective.ar_loss_scale must be > 0, got {o.ar_loss_scale}")
  if d.tokenizer and not pathlib.Path(d.tokenizer).is_file():
    raise ConfigError(f"data.tokenizer: file not found: {d.tokenizer}")
  if d.tokenizer or d.prepared_dir and (pathlib.Path(d.prepared_dir) / prepare_lib.MANIFEST).is_file():
    tok = (tok_lib.load_tokenizer(d.tokenizer) if d.tokenizer
           else prepare_lib.load_tokenizer(d.prepared_dir))
    _check_vocab(tok, mc, d.tokenizer or d.prepared_dir)
  if d.global_batch % jax.process_count():
    raise ConfigError(f"data.global_batch={d.global_batch} is not divisible by the "
                      f"{jax.process_count()} processes")
  m = cfg.mesh
  mesh = mesh_lib.make_mesh(m.replica, m.fsdp, m.tensor)
  if m.max_device_rows < 0:
    raise ConfigError(f"mesh.max_device_rows must be >= 0, got {m.max_device_rows}")
  # Tensor-parallel collectives inside replica-dependent branches deadlock or fail to partition
  # (XLA, jax 0.10): with tensor > 1 every microstep runs one objective on all devices.
  split = mesh_lib.make_split(o.lam, d.global_batch, mesh.shape["replica"], m.microsteps,
                              max_cell_rows=m.max_device_rows * mesh.shape["fsdp"],
                              whole_microsteps=mesh.shape["tensor"] > 1)
  if d.global_batch % (split.cells * mesh.shape["fsdp"]):
    raise ConfigError(
        f"data.global_batch={d.global_batch} must be divisible by replicas x microsteps x fsdp = "
        f"{split.cells * mesh.shape['fsdp']}")
  try:
    sharding_lib.param_shardings(
        jax.eval_shape(functools.partial(model_lib.init, mc), jax.random.key(0)), mesh,
        [tuple(r) for r in m.rules])
  except (ValueError, KeyError, TypeError) as e:
    raise ConfigError(f"mesh.rules: {e}") from None
  if cfg.eval.every:
    _check_eval(cfg)
  if d.source:
    sources_lib.open_source(d.source)  # a bad source fails here, before anything is written
  _check_workdir(cfg, workdir)
  prepared = pathlib.Path(d.prepared_dir) if d.prepared_dir else workdir / "prepared"
  budget = t.steps * d.global_batch * (d.seq_len + 1)
  return Plan(mc, mesh, split, prepared, budget)


def _check_eval(cfg: ml_collections.ConfigDict) -> None:
  from dualjax import evaluate as eval_lib  # pylint: disable=import-outside-toplevel
  tasks, modes, data_dir = _eval_settings(cfg)
  try:
    eval_lib.expand_modes(modes)
    eval_lib.load_examples(tasks, data_dir, 1, 0)
  except ValueError as err:
    raise ConfigError(f"eval: {err}") from None


def _eval_settings(cfg: ml_collections.ConfigDict) -> tuple[list[str], list[str], Any]:
  """(tasks, modes, data_dir) of the `eval` section with its defaults filled in."""
  from dualjax import evaluate as eval_lib  # pylint: disable=import-outside-toplevel
  e = cfg.eval
  return (_csv(e.tasks) or list(eval_lib.tasks_lib.TASKS),
          _csv(e.modes) or list(eval_lib.supported_modes(cfg.objective.lam)),
          e.data_dir or eval_lib.DEFAULT_DATA_DIR)


def _csv(s: str) -> list[str]:
  return [x for x in s.split(",") if x]


def _check_workdir(cfg: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """A workdir holding another run is refused, naming the first differing field."""
  saved = workdir / CONFIG_FILE
  if not saved.exists():
    return
  try:
    old = json.loads(saved.read_text())
  except json.JSONDecodeError as e:
    raise ConfigError(f"{saved}: unreadable ({e.msg}); use another --workdir") from None
  new = json.loads(cfg.to_json())
  for section in _RUN_IDENTITY:
    diff = _first_diff(old.get(section), new.get(section), section)
    if diff:
      raise ConfigError(f"workdir {workdir} holds a run with a different config: {diff} "
                        "(use another --workdir)")


def _first_diff(a: Any, b: Any, path: str) -> str | None:
  if path in _NOT_IDENTITY:
    return None
  if isinstance(a, dict) and isinstance(b, dict):
    for k in sorted(set(a) | set(b)):
      d = _first_diff(a.get(k), b.get(k), f"{path}.{k}")
      if d:
        return d
    return None
  return None if a == b else f"{path}: {a!r} -> {b!r}"


def prepare_data(cfg: ml_collections.ConfigDict, p: Plan) -> tok_lib.Tokenizer:
  """Prepares the token shards once (process 0) and loads the tokenizer everywhere."""
  d = cfg.data
  error = None
  if jax.process_index() == 0 and d.source:
    try:
      prepare_lib.prepare(d.source, p.prepared_dir, tokenizer=d.tokenizer or None,
                          vocab_size=p.model_cfg.vocab_size, num_workers=d.num_workers,
                          val_fraction=d.val_fraction)
    except Exception as e:  # pylint: disable=broad-except
      error = e
  if not ckpt_lib.processes_agree(error is None):  # the others must not wait for process 0
    if error is not None:
      raise error
    raise ConfigError(f"data preparation into {p.prepared_dir} failed on process 0 (see its log)")
  tok = prepare_lib.load_tokenizer(p.prepared_dir)
  _check_vocab(tok, p.model_cfg, p.prepared_dir)
  return tok


def _check_vocab(tok: tok_lib.Tokenizer, mc: model_lib.ModelConfig, where: Any) -> None:
  if tok.vocab_size > mc.vocab_size:
    raise ConfigError(f"model.vocab_size={mc.vocab_size} is smaller than the tokenizer's "
                      f"{tok.vocab_size} ({where})")


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class _Preemption:
  """SIGTERM sets a flag; the loop saves at the next step boundary and exits 0."""

  def __init__(self):
    self.flag = False
    self._old = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.flag = True

  def requested(self) -> bool:
    """Whether any process was signalled (all processes agree, so all save together)."""
    return not ckpt_lib.processes_agree(not self.flag)

  def restore(self):
    signal.signal(signal.SIGTERM, self._old)


def init_state_fn(cfg: ml_collections.ConfigDict, model_cfg: model_lib.ModelConfig,
                  optimizer) -> Callable[[], dict[str, Any]]:
  """The initial training state {params, opt_state, step, rng} as a function of nothing."""
  def init_state():
    params = model_lib.init(model_cfg, jax.random.key(cfg.seed))
    return {"params": params, "opt_state": optimizer.init(params),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.fold_in(jax.random.key(cfg.seed), 1))}
  return init_state


def abstract_state(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                   ) -> tuple[Any, Any, Callable[[], dict[str, Any]], Any]:
  """(abstract state with shardings, state shardings, init fn, optimizer) for a config."""
  mc = model_config(cfg)
  optimizer = optim.make_optimizer_from_config(cfg.optim, total_steps=cfg.train.steps)
  init_state = init_state_fn(cfg, mc, optimizer)
  abstract_params = jax.eval_shape(functools.partial(model_lib.init, mc), jax.random.key(cfg.seed))
  shardings = sharding_lib.state_shardings(abstract_params, optimizer, mesh,
                                           [tuple(r) for r in cfg.mesh.rules])
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          jax.eval_shape(init_state), shardings)
  return abstract, shardings, init_state, optimizer


def train(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns the last training metrics."""
  workdir = pathlib.Path(workdir)
  p, error = None, None
  try:
    p = plan(cfg, workdir)
  except Exception as e:  # pylint: disable=broad-except
    error = e
  if not ckpt_lib.processes_agree(error is None):  # no process may go on alone
    raise error if error is not None else ConfigError(
        "start-up checks failed on another process (see its log)")
  is_main = jax.process_index() == 0
  d, o = cfg.data, cfg.objective
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
  _sync("dualjax-workdir")
  tok = prepare_data(cfg, p)
  run_tok = workdir / TOKENIZER_FILE
  if run_tok.exists() and tok_lib.file_checksum(run_tok) != tok.checksum:
    raise ConfigError(f"data: the tokenizer of {p.prepared_dir} differs from this run's "
                      f"{run_tok} (use the run's prepared data or another --workdir)")
  ds = pipeline.make_train_dataset(
      p.prepared_dir, seq_len=d.seq_len, global_batch=d.global_batch, token_budget=p.token_budget,
      repetitions=d.repetitions, seed=cfg.seed, process_index=jax.process_index(),
      process_count=jax.process_count())
  assert ds.plan.num_full_batches >= cfg.train.steps, ds.plan
  if d.repetitions > 1 and ds.plan.subset_docs < 2:
    log.warning("the unique subset is a single document")
  it = iter(ds)
  # Nothing was written to the workdir but prepared data until here.
  if is_main:
    if not (workdir / CONFIG_FILE).exists():
      _write_atomic(workdir / CONFIG_FILE, cfg.to_json(indent=2))
    if not (workdir / TOKENIZER_FILE).exists():
      shutil.copyfile(tok.path, workdir / TOKENIZER_FILE)

  abstract, state_shardings, init_state, optimizer = abstract_state(cfg, p.mesh)
  ckpt = ckpt_lib.Checkpointer(workdir, every=cfg.checkpoint.every, keep=cfg.checkpoint.keep,
                               async_save=cfg.checkpoint.async_save)
  overfit = metrics_lib.OverfitDetector(cfg.log.overfit_rel_tol)
  try:
    restored = ckpt.restore_latest(abstract, it)
  except BaseException:
    ckpt.close()
    raise
  saved_meta: dict[str, Any] = {}
  if restored is None:
    state = jax.jit(init_state, out_shardings=state_shardings)()
    start = 0
  else:
    start, state, saved_meta = restored
    overfit.restore(saved_meta.get("overfit", {}))
    log.info("resumed from step %d", start)

  train_step = jax.jit(
      step_lib.make_train_step(p.model_cfg, p.split, p.mesh, optimizer,
                               ar_loss_scale=o.ar_loss_scale, z_loss=o.z_loss),
      in_shardings=(state_shardings, batch_sharding(p.mesh)),
      out_shardings=(state_shardings, None), donate_argnums=(0,))
  eval_fn = jax.jit(step_lib.make_eval_fn(p.model_cfg, span_mask=cfg.log.span_mask_val))
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  steps = cfg.train.steps
  progress = metrics_lib.Progress(steps, start, d.global_batch * d.seq_len)
  if is_main:
    progress.log(f"{p.model_cfg.num_layers}-layer model, "
                 f"{model_lib.count_params(p.model_cfg)['total']:,} parameters; "
                 f"mesh {dict(p.mesh.shape)}; lam {p.split.lam:g} = {p.split.n_ar}/{p.split.cells} "
                 f"AR cells ({p.split.microsteps} microsteps); r={d.repetitions}: unique subset "
                 f"{ds.plan.subset_tokens:,} tokens; steps {start}->{steps}; workdir {workdir}")
  preempt = _Preemption()
  meta = {"process_count": jax.process_count(), "tokenizer_checksum": tok.checksum,
          "prepared_dir": str(p.prepared_dir), "lam": p.split.lam,
          "microsteps": p.split.microsteps, "replicas": p.split.replicas}
  # Training losses since the last validation (the overfitting flag compares their mean).
  train_window: dict[str, list[float]] = saved_meta.get("train_window", {})
  last: dict[str, Any] = {}
  try:
    if cfg.log.val_every and start == 0:  # the untrained baseline, so the curve starts at step 0
      v = validate(cfg, p, eval_fn, state["params"])
      writer.write(0, "val", v)
      if is_main:
        progress.log("step 0: validation " + _fmt(v))
    for step in range(start, steps):
      state, m = train_step(state, to_global(next(it), p.mesh))
      done = step + 1
      m = {k: float(v) for k, v in jax.device_get(m).items()}
      if not all(math.isfinite(v) for v in m.values()):  # loss, and grads/params too
        good = ckpt.latest_step()
        raise NonFiniteLoss(
            f"non-finite loss or gradient at step {done} ("
            + ", ".join(f"{k}={v:.4g}" for k, v in m.items()) + "); stopped; "
            + (f"last good checkpoint: step {good} in {ckpt.directory}" if good is not None
               else "no checkpoint was written"))
      for k in ("ar_loss", "mdm_loss"):
        if k in m:
          train_window.setdefault(k, []).append(m[k])
      m["tokens_per_s"] = progress.update(done, m["loss"])
      if done % cfg.log.every == 0 or done == steps:
        writer.write(done, "train", m)
        if not progress.tty and is_main:
          progress.log(f"step {done}/{steps} loss {m['loss']:.4f} "
                       + " ".join(f"{k} {m[k]:.4f}" for k in ("ar_loss", "mdm_loss") if k in m)
                       + f" tok/s {m['tokens_per_s']:,.0f}")
      last = m
      if cfg.log.val_every and (done % cfg.log.val_every == 0 or done == steps):
        v = validate(cfg, p, eval_fn, state["params"])
        for obj in ("ar", "mdm"):
          window = train_window.pop(f"{obj}_loss", None)
          if window:  # mean training loss since the previous validation, and the §5.3 flag
            v[f"{obj}_train_loss"] = float(np.mean(window))
            v[f"{obj}_overfitting"] = overfit.update(obj, v[f"{obj}_loss"], v[f"{obj}_train_loss"])
        writer.write(done, "val", v)
        if is_main:
          progress.log(f"step {done}: validation " + _fmt(v))
      if cfg.eval.every and (done % cfg.eval.every == 0 or done == steps):
        run_eval(cfg, p, tok, state["params"], done, workdir, writer, progress)
      stop = preempt.requested()
      meta["overfit"], meta["train_window"] = overfit.state(), train_window
      if ckpt.save(done, state, it.get_state(), meta, force=stop or done == steps):
        log.info("checkpoint at step %d", done)
      if stop:
        progress.log(f"SIGTERM: saved a checkpoint at step {done}; exiting")
        break
  finally:
    ckpt.close()
    writer.close()
    progress.close()
    preempt.restore()
  return last


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
    out = jax.device_get(eval_fn(params, to_global(local, p.mesh), jax.random.fold_in(key, i)))
    for k, v in out.items():
      sums[k] = sums.get(k, 0.0) + float(v)
    n += 1
  return {k: v / max(n, 1) for k, v in sums.items()} | {"val_batches": n}


def run_eval(cfg, p: Plan, tok, params, step: int, workdir: pathlib.Path, writer, progress) -> None:
  """Downstream tasks (dualjax.evaluate) on the current parameters; JSON+Markdown per step."""
  from dualjax import evaluate as eval_lib  # pylint: disable=import-outside-toplevel
  tasks, modes, data_dir = _eval_settings(cfg)
  results = eval_lib.evaluate(params, p.model_cfg, tok, tasks, modes, data_dir=data_dir,
                              limit=cfg.eval.limit or None, mesh=p.mesh, step=step,
                              checkpoint=str(workdir))
  if jax.process_index() == 0:
    eval_lib.write_results(results, workdir / "eval" / f"step_{step}.json")
  flat = {}
  for task, r in results["tasks"].items():
    for mode, s in r["modes"].items():
      flat[f"{task}/{mode}/acc"] = float(s["acc"])
      flat[f"{task}/{mode}/score"] = float(s["score"])
  flat |= {f"headline/{mode}": float(h["score"]) for mode, h in results["headline"].items()}
  writer.write(step, "eval", flat)
  if jax.process_index() == 0:
    progress.log(f"step {step}: evaluation written to {workdir / 'eval' / f'step_{step}.md'}")


def _fmt(values: dict[str, Any]) -> str:
  return " ".join(f"{k} {x:.4f}" if isinstance(x, float) else f"{k} {x}" for k, x in values.items())


def _write_atomic(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Rows over ('replica', 'fsdp'): each replica's rows are contiguous, as the step expects."""
  return NamedSharding(mesh, P(("replica", "fsdp")))


def to_global(local: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """This process's rows -> global arrays sharded over the batch axes ('replica', 'fsdp')."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}

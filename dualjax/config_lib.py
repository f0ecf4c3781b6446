"""Run configs (ml_collections): the paper's setting, the tiny preset, the rule for lam (§8, §9).

`get_config(arg)` is the one place the run config is built; `configs/*.py` call it (and
`rep_config`). Sections and where their defaults live:

  model      `dualjax.model.ModelConfig` (the paper's 470M model)
  optim      `dualjax.optim.OptimConfig` (the paper's Muon + AdamW and WSD schedule)
  eval       `dualjax.evaluation.suite.EvalSettings` (`every` = in-training evaluation)
  data, objective, train, mesh, checkpoint, log: here.

Variants (`configs/base.py:tiny`): '' = the paper's scale, 'tiny' = a CPU-sized model on the
embedded corpus that trains in well under a minute on two cores, '7b' = a ~7B model with FSDP
over the whole slice (e.g. v5p-128).
"""

import dataclasses
import fractions
from typing import Any

import ml_collections

from dualjax import model as model_lib
from dualjax import optim
from dualjax import prepare
from dualjax import sharding
from dualjax.errors import ConfigError
from dualjax.evaluation import suite

VARIANTS = ("", "tiny", "7b")

# The tiny preset (the README demo, CPU tests, `evaluate --random_init` smoke runs).
TINY_MODEL = dict(vocab_size=2048, num_layers=2, d_model=64, num_heads=4, head_dim=16, mlp_dim=192,
                  mlp_multiple=1, max_seq_len=128, compute_dtype="float32",
                  attention_impl="xla")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The run config; `arg` selects a scale variant ('tiny', or None/'' for the paper)."""
  c = ml_collections.ConfigDict()
  c.seed = 42
  c.model = ml_collections.ConfigDict(dataclasses.asdict(model_lib.ModelConfig()))
  c.model.mlp_multiple = 128  # the FFN stored 3584 wide (3554 + zero padding): aligned matmuls
  c.data = ml_collections.ConfigDict(dict(
      # HPLT v2 English as JSONL.zst (text field), e.g. '/data/hplt2/eng_Latn/*.jsonl.zst'.
      source="",
      prepared_dir="",    # default: <workdir>/prepared
      tokenizer="",       # a SentencePiece .model; empty = train one of model.vocab_size on the source
      seq_len=2048,
      global_batch=2048,  # rows per optimizer step (each row seq_len + 1 tokens)
      repetitions=1,      # r: the unique subset of D/r tokens is seen r times
      num_workers=0,      # prepare: tokenizer processes (0 = all cores)
      val_fraction=prepare.DEFAULT_VAL_FRACTION,  # held-out share (not for 'embedded': own split)
      text_field="text",  # the JSONL/Parquet/TFDS field holding the text (or ITEM#FIELD)
  ))
  # L = lam * ar_loss_scale * L_AR + (1 - lam) * L_MDM. The authors' released code multiplied
  # L_AR by 2 (paper Appendix B erratum), and every published run -- hence the paper's lambda
  # recommendations -- used it, so the configs that reproduce the paper set ar_loss_scale=2
  # (the library's own default, `objectives.dual_loss`, is Eq. 5's 1).
  c.objective = ml_collections.ConfigDict(dict(lam=1.0, ar_loss_scale=2.0, z_loss=1e-4))
  c.optim = ml_collections.ConfigDict(dataclasses.asdict(optim.OptimConfig()))
  # stop_at: end this start at step N (checkpoint saved, exit 0) without changing the run (its
  # schedule and unique subset follow `steps`); a later start resumes. 0 = run to `steps`.
  c.train = ml_collections.ConfigDict(dict(steps=8192, stop_at=0))
  # Devices form a ('replica', 'fsdp', 'tensor') mesh; -1 takes the remaining devices. The
  # replica axis (x gradient-accumulation microsteps) is split into AR and MDM cells.
  c.mesh = ml_collections.ConfigDict(dict(
      replica=-1, fsdp=1, tensor=1,
      microsteps=0,  # 0 = the fewest that represent lam exactly, divide the batch and fit below
      # Rows per device per microstep (memory bound; 0 = none). -1: fitted, with model.remat
      # (it replaces the configured one), from the compiled memory of the step and validation:
      # by `python -m dualjax.compile` for its --topology (rep128: 16 rows, remat none on
      # v5p:4x4x8; 4 rows on 8xH200 by the CPU compiler's estimate), and by training at start-up
      # for its devices, within `device_memory_gb` per device (0 = what the devices report, the
      # smallest over the processes; a CPU reports none: set it there). In-training
      # evaluation's scorer is not part of the fit. With mesh.microsteps set, those decide.
      max_device_rows=-1,
      device_memory_gb=0.0,
      # Logical axis -> mesh axis (dualjax/sharding.py): parameters FSDP over hidden dims and
      # tensor-parallel over heads/MLP/vocab; activation rows over replica x fsdp.
      rules=tuple(sharding.DEFAULT_RULES),
  ))
  # keep_every: also save and keep every multiple of N (e.g. the step before the WSD decay, to
  # branch from); 0 = only the `keep` newest.
  c.checkpoint = ml_collections.ConfigDict(dict(every=256, keep=3, async_save=True, keep_every=0))
  c.log = ml_collections.ConfigDict(dict(
      every=16, val_every=512, val_batches=8,
      span_mask_val=False,     # also the authors' validation loss: BERT-style 10% span masking
      # Paper §5.3 overfitting flag (dualjax.metrics.OverfitDetector): the held-out loss, median
      # of the last `overfit_window` validations, above its best by this share plus twice its
      # measured noise, while the training loss is below its value at that best, for
      # `overfit_patience` validations in a row.
      overfit_rel_tol=0.01, overfit_window=3, overfit_patience=2))
  # Downstream evaluation (dualjax.evaluation) every `eval.every` steps and at the end; 0 = off.
  c.eval = ml_collections.ConfigDict(dataclasses.asdict(suite.EvalSettings()))

  if arg == "tiny":
    _tiny(c)
  elif arg == "7b":
    _7b(c)
  elif arg not in (None, ""):
    raise ValueError(f"config variant must be one of {VARIANTS}, got {arg!r}")
  return c


def _tiny(c: ml_collections.ConfigDict) -> None:
  c.model.update(TINY_MODEL)
  c.data.update(dict(source="embedded", seq_len=128, global_batch=16))
  c.optim.learning_rate = 0.01
  c.train.steps = 300
  c.checkpoint.every = 50
  c.log.update(dict(every=10, val_every=50, val_batches=4))
  c.mesh.max_device_rows = 0


def _7b(c: ml_collections.ConfigDict) -> None:
  """A ~7B model (Llama-2-7B shapes, the paper's head and vocabulary) for pods: parameters,
  gradients and optimizer state sharded over every chip (FSDP), activations recomputed."""
  c.model.update(dict(num_layers=32, d_model=4096, num_heads=32, head_dim=128, mlp_dim=11008,
                      remat="full"))
  c.mesh.update(dict(replica=1, fsdp=-1, tensor=1, max_device_rows=2))


def paper_lam(repetitions: int) -> float:
  """The paper's rule of thumb (§5.3, DESIGN.md §8) for the AR share lam.

  r <= 16: mostly AR, lam = 15/16 (inside the recommended 7/8 ... 63/64);
  r >= 32: lam = 16 / r, so the AR share sees ~16 repetitions: 32 -> 1/2, 64 -> 1/4, 128 -> 1/8.
  """
  return float(min(fractions.Fraction(15, 16), fractions.Fraction(16, repetitions)))


def rep_config(repetitions: int, arg: str | None = None) -> ml_collections.ConfigDict:
  """The paper's setting at `repetitions` with the rule-of-thumb lam."""
  c = get_config(arg)
  c.data.repetitions = repetitions
  c.objective.lam = paper_lam(repetitions)
  return c


def model_config(cfg: ml_collections.ConfigDict) -> model_lib.ModelConfig:
  """The `model` section as a ModelConfig (ConfigError naming the field)."""
  try:
    return model_lib.ModelConfig(**cfg.model.to_dict())
  except (TypeError, ValueError) as e:
    raise ConfigError(f"model: {e}") from None


def eval_settings(cfg: ml_collections.ConfigDict) -> suite.EvalSettings:
  """The `eval` section as EvalSettings (ConfigError naming the field)."""
  try:
    return suite.settings_from_config(cfg.eval)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"eval: {e}") from None


def rules(cfg: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  """The `mesh.rules` (ConfigError if malformed)."""
  try:
    return sharding.normalize_rules(cfg.mesh.rules)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"mesh.rules: {e}") from None

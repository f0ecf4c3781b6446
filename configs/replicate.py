"""The small-scale replication of the paper's §5 behaviours (issue 15 item 5) on a 2-core CPU.

`python -m dualjax.replicate --out=DIR` reads the default variant. Variants:

  ''          the replication: runs, the figure, the criteria of the behaviours
  'train'     the training config of one of its runs (`python -m dualjax.main
              --config=configs/replicate.py:train --config.data.repetitions=32
              --config.objective.lam=0.5 --workdir=...` trains one point by hand)
  'test'      a drastically shortened replication (a few steps) for tests
  'test_train' its training config

Regime (measured 2026-12-03 on the shared 2-core dev box; BUILD_NOTES.md "Replication"): the
tiny preset's 2 x 64 transformer with a 512-token vocabulary (177k parameters, 106k of them
outside the embeddings) on the embedded corpus (3.2M training tokens at vocab 512), 480 steps x 32
rows x 129 tokens = 1.98M tokens per run. r = 32 leaves a unique subset of 62k tokens, 2.8
parameters per unique token (paper at r = 128: 470M / 250M = 1.9); the tiny preset's own vocab
2048 would put 71% of the parameters in the embeddings. r = 1 uses 1.98M of the 3.2M tokens.
"""

import pathlib

import ml_collections

from dualjax import config_lib

_THIS = pathlib.Path(__file__).resolve()
VARIANTS = ("", "train", "test", "test_train")


def training_config(short: bool = False) -> ml_collections.ConfigDict:
  """One run of the replication (r and lam set per run by the replication)."""
  c = config_lib.get_config("tiny")
  c.model.vocab_size = 512
  c.data.global_batch = 32
  c.train.steps = 480
  c.log.update(dict(every=20, val_every=40, val_batches=4))
  c.checkpoint.update(dict(every=240, keep=1))
  if short:  # a few steps of a smaller batch: the whole path, not the behaviours
    c.data.global_batch = 16
    c.train.steps = 4
    c.log.update(dict(every=2, val_every=2, val_batches=1))
    c.checkpoint.update(dict(every=4, keep=1))
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, *VARIANTS):
    raise ValueError(f"config variant must be one of {VARIANTS}, got {arg!r}")
  if arg in ("train", "test_train"):
    return training_config(short=arg == "test_train")
  c = ml_collections.ConfigDict()
  # The training config of every run (a config file with its variant) and `section.field=value`
  # overrides of it; data.repetitions, objective.lam and seed are set per run.
  c.base = f"{_THIS}:{'test_train' if arg == 'test' else 'train'}"
  c.overrides = ()
  c.seed = 42
  # Without repetition: AR-only, the paper's regular-data lam (15/16) and MDM-only.
  c.plain_r = 1
  c.plain_lams = (1.0, 15 / 16, 0.0)
  # Heavy repetition: AR-only, dual lams and MDM-only (lam = 16 / r is the paper's rule at r >= 32).
  c.heavy_r = 32
  c.heavy_lams = (1.0, 15 / 16, 0.5, 0.0)
  # Token shards shared by all runs ('{root}' = OUT/runs), prepared by the first run.
  c.prepared_dir = "{root}/prepared"
  c.criteria = ml_collections.ConfigDict(dict(
      # A held-out loss "turns up" when its final value exceeds its minimum over the run by
      # more than this fraction (validation noise between evaluations is well below it).
      turn_up_rel=0.02,
      # Two final losses are "within noise" when they differ by at most this fraction.
      noise_rel=0.02,
      # MDM-only "learns slowly" when a dual lam reaches MDM-only's held-out MDM NELBO at this
      # fraction of training at an earlier step.
      slow_at=0.5,
      # The dual lam compared with AR-only and MDM-only at plain_r.
      plain_lam=15 / 16,
  ))
  if arg == "test":
    c.plain_lams = (1.0, 0.5, 0.0)
    c.heavy_r = 2
    c.heavy_lams = (1.0, 0.5, 0.0)
    c.criteria.plain_lam = 0.5
  return c

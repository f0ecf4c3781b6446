"""Held-out losses during training, in microbatches (DESIGN.md §5, §10).

The validation set (the prepared `val` split, packed like training, in order, no shuffle) is read
in chunks of `rows` global rows, by default one training microstep's worth (global_batch /
microsteps = rows per cell x replicas), so validation fits in the memory of a training step.
One jitted function of fixed shapes (compiled once) returns per-chunk sums; the losses are

  AR    sum of next-token cross-entropies / scored tokens
  MDM   sum of 1/p-weighted cross-entropies of the masked targets / scored tokens  (the NELBO
        per real token: E[sum w ce] over a row is the row's NELBO)
  span  (optional, `log.span_mask_val`: the authors' "masked" validation loss) CE of the targets
        of the tokens masked by `objectives.span_mask_corrupt` (many 1-3-token spans, ~10% of
        each document piece; 80% <mask>, 10% random, 10% kept) / their count

over all chunks, so they are averages over real tokens: padding rows (the last chunk is filled
with them) and padding tokens score nothing, and the chunking changes nothing beyond float
summation order. The MDM (and span) noise of a row is drawn from fold_in(key(seed, 2), global row
index), independent of the chunking, the mesh and the process count. Scored tokens are the
objectives' scorable targets (not `<s>`, not padding).
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dualjax import mesh as mesh_lib
from dualjax import model as model_lib
from dualjax import objectives
from dualjax import pipeline
from dualjax import sharding

Batch = dict[str, jax.Array]


def _row_noise(key: jax.Array, rows_B: jax.Array, L: int) -> tuple[jax.Array, ...]:
  """Per-row uniforms (t_B, u_B, r_BxL) for the MDM corruption and keys_B for the span masking."""
  def draw(row):
    kt, ku, kr, ks = jax.random.split(jax.random.fold_in(key, row), 4)
    return jax.random.uniform(kt), jax.random.uniform(ku), jax.random.uniform(kr, (L,)), ks
  return jax.vmap(draw)(rows_B)


def make_sums_fn(model_cfg: model_lib.ModelConfig, *, span_mask: bool = False,
                 mesh: jax.sharding.Mesh | None = None,
                 rules: sharding.Rules = sharding.DEFAULT_RULES):
  """`sums(params, batch, rows_B, key) -> {name: sum}` over one chunk of rows.

  `rows_B` are the rows' global indices (their noise), `key` the validation key.
  """
  def sums(params, batch: Batch, rows_B: jax.Array, key: jax.Array) -> dict[str, jax.Array]:
    with sharding.activation_rules(mesh, rules):
      inputs_BxL, seg_BxL, targets_BxL, scorable_BxL = objectives.split_batch(batch)
      _, L = inputs_BxL.shape
      w_BxL = scorable_BxL.astype(jnp.float32)
      ce_BxL, _ = objectives.model_token_losses(params, inputs_BxL, seg_BxL, targets_BxL,
                                                cfg=model_cfg, mode="causal")
      out = {"ar_sum": (w_BxL * ce_BxL).sum(), "tokens": w_BxL.sum()}
      t_B, u_B, r_BxL, span_keys = _row_noise(key, rows_B, L)
      masked_BxL, weights_BxL, _ = objectives.mdm_corrupt_from_uniforms(
          inputs_BxL, scorable_BxL, t_B, u_B, r_BxL)
      ce_BxL, _ = objectives.model_token_losses(params, masked_BxL, seg_BxL, targets_BxL,
                                                cfg=model_cfg, mode="bidirectional")
      out["mdm_sum"] = (weights_BxL * ce_BxL).sum()
      if span_mask:
        masked_BxL, scored_BxL, _ = objectives.span_mask_corrupt(
            batch["tokens"], batch["segment_ids"], span_keys, vocab_size=model_cfg.vocab_size)
        ce_BxL, _ = objectives.model_token_losses(params, masked_BxL, seg_BxL, targets_BxL,
                                                  cfg=model_cfg, mode="bidirectional")
        s_BxL = scored_BxL.astype(jnp.float32)
        out["span_sum"], out["span_tokens"] = (s_BxL * ce_BxL).sum(), s_BxL.sum()
    return out
  return sums


class Validator:
  """Validation of a planned run: the dataset and the compiled chunk function, built once.

  Construction reads the prepared validation split (PipelineError if it is empty), so a run
  without validation data fails before anything is written.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, model_cfg: model_lib.ModelConfig,
               mesh: jax.sharding.Mesh, microsteps: int, prepared_dir: Any,
               rules: sharding.Rules = sharding.DEFAULT_RULES, rows: int | None = None):
    d = cfg.data
    self.mesh = mesh
    if rows is None:
      rows = d.global_batch // microsteps
      pc = jax.process_count()
      if rows % pc:  # each process feeds whole rows: the next size that splits over processes
        rows = math.lcm(rows, pc) if d.global_batch % math.lcm(rows, pc) == 0 else d.global_batch
    self.rows = rows
    self.chunks_per_batch = max(d.global_batch // rows, 1)
    max_chunks = cfg.log.val_batches * self.chunks_per_batch if cfg.log.val_batches else None
    self.dataset = pipeline.make_val_dataset(
        prepared_dir, seq_len=d.seq_len, batch_size=rows, process_index=jax.process_index(),
        process_count=jax.process_count(), max_batches=max_chunks)
    self.key = jax.random.fold_in(jax.random.key(cfg.seed), 2)
    self.fn = jax.jit(make_sums_fn(model_cfg, span_mask=cfg.log.span_mask_val, mesh=mesh,
                                   rules=rules))

  def __call__(self, params: Any) -> dict[str, Any]:
    """{ar_loss, mdm_loss[, span_loss], val_tokens, val_batches} on `params`."""
    pi, pc = jax.process_index(), jax.process_count()
    local = self.rows // pc
    outs = []  # per-chunk scalar sums, fetched once at the end (no sync per chunk)
    for i, batch in enumerate(self.dataset):
      row_ids = np.arange(i * self.rows + pi * local, i * self.rows + (pi + 1) * local,
                          dtype=np.int32)
      g = mesh_lib.to_global(dict(batch, rows=row_ids), self.mesh)
      rows = g.pop("rows")
      outs.append(self.fn(params, g, rows, self.key))
    n = len(outs)
    t: dict[str, float] = {}
    for out in jax.device_get(outs):
      for k, v in out.items():
        t[k] = t.get(k, 0.0) + float(v)  # float64 on the host
    tokens = max(t.get("tokens", 0.0), 1.0)
    res = {"ar_loss": t.get("ar_sum", 0.0) / tokens, "mdm_loss": t.get("mdm_sum", 0.0) / tokens}
    if "span_sum" in t:
      res["span_loss"] = t["span_sum"] / max(t["span_tokens"], 1.0)
    res["val_tokens"] = int(t.get("tokens", 0.0))
    res["val_batches"] = -(-n // self.chunks_per_batch)
    return res

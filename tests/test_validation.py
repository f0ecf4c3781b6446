"""Validation in microbatches: chunked == whole (float summation order), compiled once, losses
per real token against a float64 NumPy re-derivation, noise per global row."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_fixtures import embedded_prepared  # noqa: F401  pylint: disable=unused-import
from dualjax import config_lib
from dualjax import mesh as mesh_lib
from dualjax import model as model_lib
from dualjax import objectives
from dualjax import pipeline
from dualjax import split as split_lib
from dualjax import validation
import span_reference

OVERRIDES = {"model.vocab_size": 1024, "model.d_model": 32, "model.num_heads": 2,
             "model.head_dim": 16, "model.mlp_dim": 64, "model.num_layers": 2,
             "data.source": "", "data.seq_len": 32, "data.global_batch": 16,
             "log.val_batches": 0, "log.span_mask_val": True, "mesh.microsteps": 2}


@pytest.fixture(scope="module")
def setup(embedded_prepared):  # noqa: F811
  cfg = config_lib.rep_config(32, "tiny")
  cfg.update_from_flattened_dict(OVERRIDES | {"data.prepared_dir": str(embedded_prepared)})
  mc = config_lib.model_config(cfg)
  mesh = mesh_lib.mesh_from_config(cfg.mesh)
  split = split_lib.split_from_config(cfg, mesh.shape)
  params = model_lib.init(mc, jax.random.key(0))
  return cfg, mc, mesh, split, params, embedded_prepared


def _validator(setup, rows=None, val_batches=0):
  cfg, mc, mesh, split, _, prepared = setup
  cfg = cfg.copy_and_resolve_references()
  cfg.log.val_batches = val_batches
  return validation.Validator(cfg, model_cfg=mc, mesh=mesh, microsteps=split.microsteps,
                              prepared_dir=prepared, rows=rows)


def test_chunked_equals_whole_and_compiles_once(setup):
  cfg, _, _, split, params, _ = setup
  whole = _validator(setup, rows=cfg.data.global_batch)
  chunked = _validator(setup)  # default: one training microstep's rows
  assert chunked.rows == cfg.data.global_batch // split.microsteps == 8
  a, b = whole(params), chunked(params)
  assert a["val_tokens"] == b["val_tokens"] > 0 and a["val_batches"] == b["val_batches"]
  for k in ("ar_loss", "mdm_loss", "span_loss"):
    assert b[k] == pytest.approx(a[k], rel=2e-6), k
  chunked(params)
  assert chunked.fn._cache_size() == 1  # fixed shapes: one compilation for every chunk and call
  # val_batches counts global batches: the first one only.
  first = _validator(setup, val_batches=1)(params)
  assert first["val_batches"] == 1 and first["val_tokens"] <= cfg.data.global_batch * 32


def test_losses_per_real_token_against_numpy(setup):
  cfg, mc, _, _, params, prepared = setup
  got = _validator(setup)(params)
  ds = pipeline.make_val_dataset(prepared, seq_len=32, batch_size=16, process_index=0,
                                 process_count=1)
  key = jax.random.fold_in(jax.random.key(cfg.seed), 2)
  causal = jax.jit(lambda x, s: model_lib.apply(params, x, s, cfg=mc))
  bidir = jax.jit(lambda x, s: model_lib.apply(params, x, s, cfg=mc, mode="bidirectional"))

  @jax.jit
  def noise(rows):
    keys = jax.vmap(lambda r: jax.random.split(jax.random.fold_in(key, r), 4))(rows)
    return (jax.vmap(jax.random.uniform)(keys[:, 0]), jax.vmap(jax.random.uniform)(keys[:, 1]),
            jax.vmap(lambda k: jax.random.uniform(k, (32,)))(keys[:, 2]),
            objectives.span_noise(keys[:, 3], 33, mc.vocab_size))
  ar_sum = mdm_sum = span_sum = span_tokens = tokens = 0.0
  for i, b in enumerate(ds):
    tokens_BxL1 = b["tokens"]
    inputs, seg, targets = tokens_BxL1[:, :-1], b["segment_ids"][:, :-1], tokens_BxL1[:, 1:]
    scorable = (targets != 1) & (b["segment_ids"][:, 1:] != 0)  # not <s>, not padding
    logits = np.asarray(causal(inputs, seg), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    ce = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    ar_sum += ce[scorable].sum()
    tokens += scorable.sum()
    # MDM with the documented per-row noise: fold_in(key, global row) -> (t, u, r, span key).
    t, u, r, span_draws = noise(jnp.arange(i * 16, i * 16 + 16))
    masked, w, _ = objectives.mdm_corrupt_from_uniforms(jnp.asarray(inputs), jnp.asarray(scorable),
                                                       t, u, r)
    logits = np.asarray(bidir(masked, seg), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    mdm_sum += (np.asarray(w, np.float64) * ce).sum()
    # span masking: the NumPy port of the authors' algorithm on the row's span draws
    nz = {k: np.asarray(v) for k, v in span_draws.items()}
    draw = lambda b, s, n: (nz["lengths"][b, s:], nz["ratio"][b, s:], nz["action"][b, s:],
                            float(nz["round_u"][b, s]), nz["random"][b, s:s + n])
    masked, scored, _, _, _ = span_reference.corrupt_rows(tokens_BxL1, b["segment_ids"], draw)
    logits = np.asarray(bidir(masked, seg), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    span_sum += ce[scored].sum()
    span_tokens += scored.sum()
  assert got["val_tokens"] == tokens
  assert got["ar_loss"] == pytest.approx(ar_sum / tokens, rel=1e-5)
  assert got["mdm_loss"] == pytest.approx(mdm_sum / tokens, rel=1e-5)
  assert 0.08 * tokens < span_tokens < 0.14 * tokens  # ~10% of the tokens in short spans
  assert got["span_loss"] == pytest.approx(span_sum / span_tokens, rel=1e-5)

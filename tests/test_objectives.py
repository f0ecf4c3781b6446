"""Objectives (DESIGN.md §3) against float64 NumPy re-derivations; MDM unbiasedness by enumeration."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualjax import model as model_lib
from dualjax import objectives
from dualjax.special_tokens import BOS, MASK, NUM_SPECIAL, PAD
import span_reference

CFG = model_lib.ModelConfig(vocab_size=48, num_layers=2, d_model=32, num_heads=2, head_dim=16,
                            mlp_dim=64, max_seq_len=64, compute_dtype="float32",
                            attention_impl="xla")


def _params(seed=0):
  p = model_lib.init(CFG, jax.random.key(seed))
  leaves, tree = jax.tree.flatten(p)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape)
                                   for x, k in zip(leaves, keys)])


def _batch():
  """4 rows of L+1 = 21 tokens: several documents, trailing padding, a mostly-special row."""
  rng = np.random.default_rng(0)
  tok = rng.integers(NUM_SPECIAL, CFG.vocab_size, (4, 21)).astype(np.int32)
  seg = np.ones((4, 21), np.int32)
  tok[:, 0] = BOS
  for b, starts in [(0, (7, 15)), (1, (12,)), (2, ()), (3, (3,))]:
    for s in starts:
      tok[b, s] = BOS
      seg[b, s:] += 1
  tok[2, 16:], seg[2, 16:] = PAD, 0                 # padding at the end of row 2
  tok[3, 5:18] = np.arange(5, 18) % NUM_SPECIAL     # row 3: only a few maskable tokens
  tok[3, 5:18] = np.where(tok[3, 5:18] == BOS, 2, tok[3, 5:18])
  return {"tokens": tok, "segment_ids": seg}


def _np_scorable(batch):
  return (batch["tokens"][:, 1:] != BOS) & (batch["segment_ids"][:, 1:] != 0)


def _np_corrupt(inputs, scorable, t, u, r):
  """§3 per row, float64: exact-count masking, MNTP targets, realised-rate weights."""
  B, L = inputs.shape
  out, w, ks = inputs.copy(), np.zeros((B, L)), []
  for b in range(B):
    maskable = [j for j in range(L) if inputs[b, j] >= NUM_SPECIAL]
    k = min(max(1, math.floor(L * float(t[b]) + float(u[b]))), len(maskable))
    chosen = set(sorted(maskable, key=lambda j: r[b, j])[:k])
    for j in chosen:
      out[b, j] = MASK
    p = (1 - 1e-4) * k / L + 1e-4
    for i in range(L):
      if scorable[b, i] and (i == L - 1 or i + 1 in chosen):
        w[b, i] = 1 / p
    ks.append(k)
  return out, w, np.array(ks)


def _np_ce_lse(logits, targets):
  logits = np.asarray(logits, np.float64)
  m = logits.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
  return lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0], lse


def test_mdm_corruption_matches_numpy_on_fixed_noise():
  batch = _batch()
  inputs, scorable = batch["tokens"][:, :-1], _np_scorable(batch)
  B, L = inputs.shape
  rng = np.random.default_rng(1)
  t = np.array([0.003, 0.41, 0.77, 0.95], np.float32)  # tiny t -> k = max(1, ...); big t -> clipped
  u = rng.random(B).astype(np.float32)
  r = rng.random((B, L)).astype(np.float32)
  masked, w, aux = objectives.mdm_corrupt_from_uniforms(jnp.asarray(inputs), jnp.asarray(scorable),
                                                        t, u, r)
  want_masked, want_w, want_k = _np_corrupt(inputs, scorable, t, u, r)
  np.testing.assert_array_equal(aux["k_B"], want_k)
  np.testing.assert_array_equal(masked, want_masked)
  np.testing.assert_allclose(w, want_w, rtol=1e-6)
  masked = np.asarray(masked)
  assert ((masked == MASK).sum(1) == want_k).all()
  special = inputs < NUM_SPECIAL
  np.testing.assert_array_equal(masked[special], inputs[special])   # specials never masked
  assert want_k[0] == 1 and want_k[3] == (inputs[3] >= NUM_SPECIAL).sum()
  assert (np.asarray(w)[:, -1] > 0).tolist() == scorable[:, -1].tolist()  # last target always


def test_mdm_key_path_and_loss_value_match_numpy():
  params, batch = _params(), _batch()
  inputs, scorable = batch["tokens"][:, :-1], _np_scorable(batch)
  B, L = inputs.shape
  key = jax.random.key(5)
  kt, ku, kr = jax.random.split(key, 3)
  t, u = jax.random.uniform(kt, (B,)), jax.random.uniform(ku, (B,))
  r = jax.random.uniform(kr, (B, L))
  masked, w, _ = _np_corrupt(inputs, scorable, np.asarray(t), np.asarray(u), np.asarray(r))
  z = 1e-3
  with jax.default_matmul_precision("highest"):
    loss, metrics = objectives.mdm_loss(params, batch, key, cfg=CFG, z_loss=z)
    logits = model_lib.apply(params, masked, batch["segment_ids"][:, :-1], cfg=CFG,
                             mode="bidirectional")
  ce, lse = _np_ce_lse(logits, batch["tokens"][:, 1:])
  want_ce = (w * ce).sum() / (B * L)
  want_z = z * (w * lse ** 2).sum() / (B * L)
  np.testing.assert_allclose(metrics["ce"], want_ce, rtol=1e-5)
  np.testing.assert_allclose(metrics["z_loss"], want_z, rtol=1e-5)
  np.testing.assert_allclose(loss, want_ce + want_z, rtol=1e-5)


def test_ar_loss_matches_numpy():
  params, batch = _params(), _batch()
  z = 1e-3
  with jax.default_matmul_precision("highest"):
    loss, metrics = objectives.ar_loss(params, batch, cfg=CFG, z_loss=z)
    logits = model_lib.apply(params, batch["tokens"][:, :-1], batch["segment_ids"][:, :-1],
                             cfg=CFG, mode="causal")
  ce, lse = _np_ce_lse(logits, batch["tokens"][:, 1:])
  s = _np_scorable(batch)
  assert metrics["num_scored"] == s.sum() < s.size
  np.testing.assert_allclose(metrics["ce"], ce[s].mean(), rtol=1e-5)
  np.testing.assert_allclose(loss, ce[s].mean() + z * (lse[s] ** 2).mean(), rtol=1e-5)


def _k_distribution(L, n_maskable, grid=2000):
  """P(k) for k = min(max(1, floor(L t + u)), n), t, u ~ U(0,1): midpoint rule on a fine grid."""
  x = (np.arange(grid) + 0.5) / grid
  k = np.minimum(np.maximum(1, np.floor(L * x[:, None] + x[None, :])), n_maskable).astype(int)
  return np.bincount(k.ravel(), minlength=n_maskable + 1) / k.size


@pytest.mark.slow
def test_mdm_loss_is_an_unbiased_estimate_of_its_exact_expectation():
  """Mean over many noise draws == exact expectation over (t, u, mask choice), enumerated."""
  params = _params(3)
  row = np.array([BOS, 20, 31, 17, BOS, 40, 25], np.int32)   # L = 6 inputs, 4 maskable
  seg = np.array([1, 1, 1, 1, 2, 2, 2], np.int32)
  inputs, targets, L = row[:-1], row[1:], 6
  scorable = (targets != BOS)
  maskable = [j for j in range(L) if inputs[j] >= NUM_SPECIAL]
  z = 1e-2
  subsets = [s for n in range(len(maskable) + 1) for s in itertools.combinations(maskable, n)]
  masked_SxL = np.stack([np.where(np.isin(np.arange(L), s), MASK, inputs) for s in subsets])
  with jax.default_matmul_precision("highest"):
    logits = model_lib.apply(params, masked_SxL, np.repeat(seg[None, :-1], len(subsets), 0),
                             cfg=CFG, mode="bidirectional")
  ce, lse = _np_ce_lse(logits, np.repeat(targets[None], len(subsets), 0))

  def moments(p_k):
    ex = ex2 = 0.0
    for s_idx, s in enumerate(subsets):
      k = len(s)
      if p_k[k] == 0:
        continue
      p = (1 - 1e-4) * k / L + 1e-4
      w = np.array([scorable[i] and (i == L - 1 or i + 1 in s) for i in range(L)]) / p
      x = (w * (ce[s_idx] + z * lse[s_idx] ** 2)).sum() / L
      prob = p_k[k] / math.comb(len(maskable), k)
      ex, ex2 = ex + prob * x, ex2 + prob * x * x
    return ex, ex2 - ex * ex

  exact, var = moments(_k_distribution(L, len(maskable)))
  n = 20_000
  batch = {"tokens": np.repeat(row[None], n, 0), "segment_ids": np.repeat(seg[None], n, 0)}
  with jax.default_matmul_precision("highest"):
    mc = float(jax.jit(lambda b, k: objectives.mdm_loss(params, b, k, cfg=CFG, z_loss=z)[0])(
        batch, jax.random.key(11)))
  se = math.sqrt(var / n)
  assert abs(mc - exact) < 4 * se, (mc, exact, se)
  # The test has power: plain rounding (k = max(1, round(L t)), no u) changes the expectation.
  x = (np.arange(4000) + 0.5) / 4000
  alt_k = np.minimum(np.maximum(1, np.floor(L * x)), len(maskable)).astype(int)
  alt = np.bincount(alt_k, minlength=len(maskable) + 1) / alt_k.size
  assert abs(moments(alt)[0] - exact) > 8 * se


def test_dual_loss_combination_and_lambda_errors():
  params, batch = _params(), _batch()
  key = jax.random.key(2)
  ar, _ = objectives.ar_loss(params, batch, cfg=CFG)
  mdm, _ = objectives.mdm_loss(params, batch, key, cfg=CFG)
  loss, m = objectives.dual_loss(params, batch, key, cfg=CFG, lam=0.25, ar_loss_scale=2.0)
  np.testing.assert_allclose(loss, 0.25 * 2.0 * ar + 0.75 * mdm, rtol=1e-6)
  loss1, m1 = objectives.dual_loss(params, batch, key, cfg=CFG, lam=1.0, ar_loss_scale=2.0)
  np.testing.assert_allclose(loss1, 2.0 * ar, rtol=1e-6)
  assert "mdm_loss" not in m1                       # lam = 1 computes no MDM
  loss0, m0 = objectives.dual_loss(params, batch, key, cfg=CFG, lam=0.0)
  np.testing.assert_allclose(loss0, mdm, rtol=1e-6)
  assert "ar_loss" not in m0
  for lam in (-0.1, 1.5, float("nan")):
    with pytest.raises(ValueError, match="lam .* must be in \\[0, 1\\]"):
      objectives.dual_loss(params, batch, key, cfg=CFG, lam=lam)


def test_bad_batches():
  params = _params()
  good = _batch()
  with pytest.raises(ValueError, match="missing 'segment_ids'"):
    objectives.ar_loss(params, {"tokens": good["tokens"]}, cfg=CFG)
  with pytest.raises(ValueError, match=r"batch\['tokens'\] must be \[B, L\+1\]"):
    objectives.ar_loss(params, {"tokens": good["tokens"][:, :1], "segment_ids": good["segment_ids"][:, :1]},
                       cfg=CFG)
  with pytest.raises(ValueError, match="segment_ids'\\] shape"):
    objectives.mdm_loss(params, {"tokens": good["tokens"], "segment_ids": good["segment_ids"][:, :5]},
                        jax.random.key(0), cfg=CFG)


def _span_draws(noise):
  """`span_reference.corrupt_rows`'s draw(b, start, n) from `objectives.span_noise` arrays: the
  piece at `start` takes the row's draws from `start` on (dualjax's documented layout)."""
  nz = {k: np.asarray(v) for k, v in noise.items()}
  return lambda b, s, n: (nz["lengths"][b, s:], nz["ratio"][b, s:], nz["action"][b, s:],
                          float(nz["round_u"][b, s]), nz["random"][b, s:s + n])


def test_span_mask_is_the_authors_algorithm_on_given_draws():
  """Same draws -> the same corruption as a NumPy port of the authors' code, bit for bit."""
  rng = np.random.default_rng(11)
  b = _batch()
  for tokens, seg in (span_reference.random_rows(rng, 64, 41, CFG.vocab_size),
                      (b["tokens"], b["segment_ids"])):
    B, N = tokens.shape
    keys = jax.random.split(jax.random.key(5), B)
    noise = objectives.span_noise(keys, N, CFG.vocab_size)
    got_in, got_scored, aux = jax.jit(objectives.span_mask_corrupt_from_noise)(tokens, seg, noise)
    want_in, want_scored, want_masked, _, _ = span_reference.corrupt_rows(tokens, seg,
                                                                          _span_draws(noise))
    np.testing.assert_array_equal(aux["masked_BxN"], want_masked)
    np.testing.assert_array_equal(got_in, want_in)
    np.testing.assert_array_equal(got_scored, want_scored)
    assert want_masked.sum() >= B and not want_masked[tokens < NUM_SPECIAL].any()
    # span_mask_corrupt = from_noise with span_noise of the keys
    again = objectives.span_mask_corrupt(tokens, seg, keys, vocab_size=CFG.vocab_size)
    np.testing.assert_array_equal(again[0], got_in)


def _jax_span_stats(tokens, seg, noise, masked, span):
  """Masked spans' lengths and actions, and masked fraction per row, from dualjax's outputs."""
  action, masked, span = np.asarray(noise["action"]), np.asarray(masked), np.asarray(span)
  lens, kinds = [], {"mask": 0, "random": 0, "keep": 0}
  for b in range(len(tokens)):
    for j in np.unique(span[b][masked[b]]):
      lens.append(int(masked[b][span[b] == j].sum()))
      p = action[b, j]
      kinds["random" if p < 0.1 else "mask" if p > 0.2 else "keep"] += 1
  return np.array(lens), kinds


def test_span_mask_statistics_match_the_spec():
  """Over many rows: masked spans of 1-3 tokens (uniform, as drawn), ~10% of each row's tokens,
  80% <mask> / 10% random / 10% kept -- dualjax's draws against an independent NumPy run of the
  authors' algorithm with NumPy's generator (same distribution, different draws)."""
  B, N, V = 1500, 129, CFG.vocab_size
  rng = np.random.default_rng(12)
  tokens, seg = span_reference.random_rows(rng, B, N, V)
  real = (seg != 0).sum(1)
  keys = jax.random.split(jax.random.key(9), B)
  noise = objectives.span_noise(keys, N, V)
  inputs, _, aux = jax.jit(objectives.span_mask_corrupt_from_noise)(tokens, seg, noise)
  got_lens, got_kinds = _jax_span_stats(tokens, seg, noise, aux["masked_BxN"], aux["span_BxN"])
  got_frac = np.asarray(aux["masked_BxN"]).sum(1) / real
  draw = lambda b, s, n: (rng.integers(1, 4, n), rng.random(n), rng.random(n), rng.random(),
                          rng.integers(NUM_SPECIAL, V, n))
  _, _, want_masked, want_lens, want_kinds = span_reference.corrupt_rows(tokens, seg, draw)
  want_frac = want_masked.sum(1) / real
  # span lengths: 1..3, each drawn with p 1/3 (more 1s and 2s masked: spans cut by a piece's end
  # or a special token)
  assert set(got_lens) <= {1, 2, 3}
  for n in (1, 2, 3):
    p_got, p_want = np.mean(got_lens == n), np.mean(want_lens == n)
    se = np.sqrt(p_want * (1 - p_want) * (1 / len(got_lens) + 1 / len(want_lens)))
    assert abs(p_got - p_want) < 4 * se, (n, p_got, p_want)
    assert 0.25 < p_got < 0.42, (n, p_got)
  # ~10% of each row (k = max(1, floor(0.1 n + U)) per piece, plus the overshoot of the last span)
  se = np.sqrt(got_frac.var() / B + want_frac.var() / B)
  assert abs(got_frac.mean() - want_frac.mean()) < 4 * se, (got_frac.mean(), want_frac.mean())
  assert 0.10 < got_frac.mean() < 0.13, got_frac.mean()
  # many short spans per row, not one contiguous span
  assert len(got_lens) / B > 5
  # 80 / 10 / 10 per masked span
  n_got, n_want = sum(got_kinds.values()), sum(want_kinds.values())
  for kind, p in (("mask", 0.8), ("random", 0.1), ("keep", 0.1)):
    se = np.sqrt(p * (1 - p) / n_got)
    assert abs(got_kinds[kind] / n_got - p) < 4 * se, (kind, got_kinds)
    assert abs(want_kinds[kind] / n_want - p) < 4 * np.sqrt(p * (1 - p) / n_want), (kind, want_kinds)
  # and the tokens: <mask> where the action says so, random tokens non-special
  corrupted = np.asarray(aux["corrupted_BxN"])
  m = np.asarray(aux["masked_BxN"])
  act = np.take_along_axis(np.asarray(noise["action"]), np.asarray(aux["span_BxN"]), 1)
  assert (corrupted[m & (act > 0.2)] == MASK).all()
  assert (corrupted[m & (act < 0.1)] >= NUM_SPECIAL).all()
  assert (corrupted[m & (act >= 0.1) & (act <= 0.2)] == tokens[m & (act >= 0.1) & (act <= 0.2)]).all()
  np.testing.assert_array_equal(corrupted[~m], tokens[~m])
  np.testing.assert_array_equal(inputs, corrupted[:, :-1])


def test_span_mask_loss_matches_numpy():
  """The authors' validation loss: mean CE over the targets of the masked tokens."""
  params, batch = _params(), _batch()
  B, N = batch["tokens"].shape
  key = jax.random.key(3)
  noise = objectives.span_noise(jax.random.split(key, B), N, CFG.vocab_size)
  masked, scored, _, _, _ = span_reference.corrupt_rows(batch["tokens"], batch["segment_ids"],
                                                        _span_draws(noise))
  assert scored.sum() > 0
  with jax.default_matmul_precision("highest"):
    loss, metrics = objectives.span_mask_loss(params, batch, key, cfg=CFG)
    logits = model_lib.apply(params, masked, batch["segment_ids"][:, :-1], cfg=CFG,
                             mode="bidirectional")
  ce, _ = _np_ce_lse(logits, batch["tokens"][:, 1:])
  assert metrics["num_scored"] == scored.sum()
  np.testing.assert_allclose(loss, ce[scored].mean(), rtol=1e-5)


def test_cells_equal_the_mean_of_separate_cells():
  """num_cells / keys[C]: the loss is the mean of each cell's loss computed alone (own noise)."""
  params, batch = _params(), _batch()
  halves = [{k: v[i * 2:(i + 1) * 2] for k, v in batch.items()} for i in range(2)]
  keys = jax.random.split(jax.random.key(7), 2)
  with jax.default_matmul_precision("highest"):
    ar, _ = objectives.ar_loss(params, batch, cfg=CFG, num_cells=2)
    ar_each = [objectives.ar_loss(params, h, cfg=CFG)[0] for h in halves]
    mdm, _ = objectives.mdm_loss(params, batch, keys, cfg=CFG)
    mdm_each = [objectives.mdm_loss(params, h, k, cfg=CFG)[0] for h, k in zip(halves, keys)]
  np.testing.assert_allclose(ar, np.mean(ar_each), rtol=1e-6)
  np.testing.assert_allclose(mdm, np.mean(mdm_each), rtol=1e-6)
  with pytest.raises(ValueError, match="num_cells=3"):
    objectives.ar_loss(params, batch, cfg=CFG, num_cells=3)

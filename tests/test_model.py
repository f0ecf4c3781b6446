"""Model (DESIGN.md §2) against a float64 NumPy re-derivation, masking properties, init, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualjax import model as model_lib

CFG = model_lib.ModelConfig(vocab_size=96, num_layers=2, d_model=32, num_heads=2, head_dim=16,
                            mlp_dim=64, max_seq_len=64, compute_dtype="float32",
                            attention_impl="xla")
L = 16
apply = jax.jit(model_lib.apply, static_argnames=("cfg", "mode"))


def _params(cfg=CFG, seed=0, noise=0.2):
  """Init + noise, so that the zero-initialised out/down projections carry signal too."""
  p = model_lib.init(cfg, jax.random.key(seed))
  leaves, tree = jax.tree.flatten(p)
  keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
  return jax.tree.unflatten(tree, [x + noise * jax.random.normal(k, x.shape)
                                   for x, k in zip(leaves, keys)])


def _row(rng, n, doc_starts=()):
  tok = rng.integers(16, CFG.vocab_size, n).astype(np.int32)
  tok[0] = 1
  seg = np.ones(n, np.int32)
  for s in doc_starts:
    tok[s] = 1
    seg[s:] += 1
  return tok, seg


# ------------------------------------------------------------------------------------------------
# Independent float64 NumPy forward pass, written from §2.

def _np_rmsnorm(x, g, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * g


def _np_rope(x_LxNxH, pos_L, theta):
  h = x_LxNxH.shape[-1] // 2
  freq = theta ** (-np.arange(h) * 2.0 / (2 * h))
  rot = np.exp(1j * pos_L[:, None, None] * freq)           # rotate (x_d, x_{d+H/2}) as a complex
  z = (x_LxNxH[..., :h] + 1j * x_LxNxH[..., h:]) * rot
  return np.concatenate([z.real, z.imag], -1)


def _np_forward(p, tok_L, seg_L, bidir_L, cfg, pos_L=None):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  n = len(tok_L)
  pos_L = np.arange(n) if pos_L is None else pos_L
  x = p["embed"][tok_L]
  allowed = np.zeros((n, n), bool)
  for i in range(n):
    for j in range(n):
      allowed[i, j] = seg_L[i] == seg_L[j] and (j <= i or (bidir_L[i] and bidir_L[j]))
  for l in range(cfg.num_layers):
    lp = jax.tree.map(lambda a, l=l: a[l], p["layers"])
    h = _np_rmsnorm(x, lp["attn_norm"], cfg.norm_eps)
    split = lambda w: (h @ w).reshape(n, cfg.num_heads, cfg.head_dim)
    q = _np_rope(split(lp["attn"]["q"]), pos_L, cfg.rope_theta)
    k = _np_rope(split(lp["attn"]["k"]), pos_L, cfg.rope_theta)
    v = split(lp["attn"]["v"])
    out = np.zeros_like(q)
    for hd in range(cfg.num_heads):
      s = q[:, hd] @ k[:, hd].T / math.sqrt(cfg.head_dim)
      s = np.where(allowed, s, -np.inf)
      w = np.exp(s - s.max(-1, keepdims=True))
      out[:, hd] = (w / w.sum(-1, keepdims=True)) @ v[:, hd]
    x = x + out.reshape(n, -1) @ lp["attn"]["o"]
    h = _np_rmsnorm(x, lp["mlp_norm"], cfg.norm_eps)
    g = h @ lp["mlp"]["gate"]
    x = x + ((h @ lp["mlp"]["up"]) * g / (1 + np.exp(-g))) @ lp["mlp"]["down"]
  h = _np_rmsnorm(x, p["head"]["norm"], cfg.norm_eps)
  if cfg.head == "mlp":
    h = h @ p["head"]["proj"]
    h = 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    return h @ p["head"]["out"] + p["head"]["out_bias"]
  return h @ p["head"]["out"]


@pytest.mark.parametrize("head", ["mlp", "linear"])
def test_forward_matches_numpy_in_all_modes(head):
  cfg = model_lib.ModelConfig(**{**CFG.__dict__, "head": head})
  params = _params(cfg)
  rng = np.random.default_rng(0)
  rows = [_row(rng, L, (6, 11)), _row(rng, L, (9,))]
  tok = np.stack([r[0] for r in rows])
  seg = np.stack([r[1] for r in rows])
  seg[1, -3:] = 0  # padding is its own segment
  prefix = np.array([5, 12])
  with jax.default_matmul_precision("highest"):
    for mode, kw, bidir in [
        ("causal", {}, np.zeros((2, L), bool)),
        ("bidirectional", {}, np.ones((2, L), bool)),
        ("prefix", {"prefix_len_B": prefix}, np.arange(L)[None] < prefix[:, None])]:
      got = np.asarray(apply(params, tok, seg, cfg=cfg, mode=mode, **kw))
      assert got.shape == (2, L, cfg.vocab_size) and got.dtype == np.float32
      for b in range(2):
        want = _np_forward(params, tok[b], seg[b], bidir[b], cfg)
        np.testing.assert_allclose(got[b], want, atol=2e-4, rtol=1e-4, err_msg=f"{mode} row {b}")


def _changed(a, b):
  return np.abs(np.asarray(a) - np.asarray(b)).max(-1)  # [B, L]


def test_causal_bidirectional_prefix_and_documents():
  params = _params()
  rng = np.random.default_rng(1)
  tok, seg = _row(rng, L, (10,))          # document 1: 0..9, document 2: 10..15
  tok, seg = tok[None], seg[None]
  i = 4                                   # change the token after i (inside document 1)
  tok2 = tok.copy()
  tok2[0, i + 1] = 16 + (tok[0, i + 1] - 15) % (CFG.vocab_size - 16)
  doc2 = tok.copy()
  doc2[0, 12] = 16 + (tok[0, 12] - 15) % (CFG.vocab_size - 16)
  P = 7
  with jax.default_matmul_precision("highest"):
    run = lambda t, mode, **kw: apply(params, t, seg, cfg=CFG, mode=mode, **kw)
    # causal: positions <= i unchanged, the changed position and after changed
    d = _changed(run(tok, "causal"), run(tok2, "causal"))[0]
    assert d[: i + 1].max() < 1e-5 and d[i + 1:10].min() > 1e-3
    # bidirectional: earlier positions of the same document change too
    d = _changed(run(tok, "bidirectional"), run(tok2, "bidirectional"))[0]
    assert d[:10].min() > 1e-3
    # prefix(P): a change at i+1 < P reaches every position of the prefix
    d = _changed(run(tok, "prefix", prefix_len_B=P), run(tok2, "prefix", prefix_len_B=P))[0]
    assert d[:10].min() > 1e-3
    # prefix(P): a change at P (after the prefix) reaches no earlier position, later ones yes
    tok3 = tok.copy()
    tok3[0, P] = 16 + (tok[0, P] - 15) % (CFG.vocab_size - 16)
    d = _changed(run(tok, "prefix", prefix_len_B=P), run(tok3, "prefix", prefix_len_B=P))[0]
    assert d[:P].max() < 1e-5 and d[P:10].min() > 1e-3
    # another document never influences the logits, in every mode (both directions)
    for mode, kw in [("causal", {}), ("bidirectional", {}), ("prefix", {"prefix_len_B": 14})]:
      d = _changed(run(tok, mode, **kw), run(doc2, mode, **kw))[0]
      assert d[:10].max() < 1e-5, mode
      assert d[12:].min() > 1e-3, mode
      d = _changed(run(tok, mode, **kw), run(tok2, mode, **kw))[0]
      assert d[10:].max() < 1e-5, mode


def test_packed_rows_with_per_token_flags_equal_each_sequence_alone():
  params = _params()
  rng = np.random.default_rng(2)
  a, _ = _row(rng, 7)
  b, _ = _row(rng, 9)
  tok = np.concatenate([a, b])[None]
  seg = np.concatenate([np.ones(7), np.full(9, 2)]).astype(np.int32)[None]
  bidir = np.concatenate([np.arange(7) < 3, np.arange(9) < 5])[None]  # prefixes 3 and 5
  with jax.default_matmul_precision("highest"):
    packed = np.asarray(apply(params, tok, seg, cfg=CFG, mode="causal", bidir_BxL=bidir))
    alone_a = np.asarray(apply(params, a[None], np.ones((1, 7), np.int32), cfg=CFG,
                               mode="prefix", prefix_len_B=3))
    alone_b = np.asarray(apply(params, b[None], np.ones((1, 9), np.int32), cfg=CFG,
                               mode="prefix", prefix_len_B=5))
  np.testing.assert_allclose(packed[0, :7], alone_a[0], atol=2e-4)
  np.testing.assert_allclose(packed[0, 7:], alone_b[0], atol=2e-4)  # RoPE is relative


def test_per_row_prefix_and_positions():
  params = _params()
  rng = np.random.default_rng(3)
  tok = np.stack([_row(rng, L)[0] for _ in range(2)])
  seg = np.ones((2, L), np.int32)
  with jax.default_matmul_precision("highest"):
    both = np.asarray(apply(params, tok, seg, cfg=CFG, mode="prefix", prefix_len_B=np.array([3, 11])))
    r0 = np.asarray(apply(params, tok[:1], seg[:1], cfg=CFG, mode="prefix", prefix_len_B=3))
    r1 = np.asarray(apply(params, tok[1:], seg[1:], cfg=CFG, mode="prefix", prefix_len_B=11))
    shifted = np.asarray(apply(params, tok, seg, cfg=CFG, mode="causal",
                               positions_BxL=np.arange(L)[None].repeat(2, 0) + 100))
    plain = np.asarray(apply(params, tok, seg, cfg=CFG, mode="causal"))
  np.testing.assert_allclose(both[0], r0[0], atol=1e-5)
  np.testing.assert_allclose(both[1], r1[0], atol=1e-5)
  np.testing.assert_allclose(shifted, plain, atol=2e-4)  # relative positions only


def test_unrolled_remat_and_bf16_agree_with_reference_path():
  params = _params()
  rng = np.random.default_rng(4)
  tok, seg = _row(rng, L, (8,))
  tok, seg = tok[None], seg[None]
  with jax.default_matmul_precision("highest"):
    ref = np.asarray(apply(params, tok, seg, cfg=CFG, mode="causal"))
    for kw in [dict(scan_layers=False), dict(remat="full"), dict(remat="dots_saveable")]:
      cfg = model_lib.ModelConfig(**{**CFG.__dict__, **kw})
      np.testing.assert_allclose(apply(params, tok, seg, cfg=cfg, mode="causal"), ref, atol=1e-5)
    g_ref = jax.grad(lambda p: apply(p, tok, seg, cfg=CFG, mode="causal").sum())(params)
    cfg = model_lib.ModelConfig(**{**CFG.__dict__, "remat": "full"})
    g = jax.grad(lambda p: apply(p, tok, seg, cfg=cfg, mode="causal").sum())(params)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
      np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
  bf = model_lib.ModelConfig(**{**CFG.__dict__, "compute_dtype": "bfloat16"})
  out = np.asarray(apply(params, tok, seg, cfg=bf, mode="causal"))
  assert out.dtype == np.float32
  assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()


# ------------------------------------------------------------------------------------------------
# Init.

def _trunc_std(sigma):
  """Std of N(0, sigma^2) truncated at +-2 sigma."""
  a = 2.0
  phi = math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
  Z = math.erf(a / math.sqrt(2))
  return sigma * math.sqrt(1 - 2 * a * phi / Z)


def test_init_statistics():
  cfg = model_lib.ModelConfig(vocab_size=512, num_layers=4, d_model=64, num_heads=4, head_dim=16,
                              mlp_dim=160, max_seq_len=32)
  p = jax.tree.map(np.asarray, model_lib.init(cfg, jax.random.key(7)))
  D, V = 64, 512
  hidden = math.sqrt(2 / (5 * D))
  vocab = math.sqrt(2 / (V + D))

  def check(x, sigma):
    n = x.size
    assert abs(x.mean()) < 4 * sigma / math.sqrt(n)
    want = _trunc_std(sigma)
    assert abs(x.std() / want - 1) < 4 / math.sqrt(2 * n) + 0.01, (x.std(), want)
    assert np.abs(x).max() <= 2 * sigma * (1 + 1e-6)
    assert x.dtype == np.float32

  check(p["embed"], vocab)
  check(p["head"]["out"], vocab)
  check(p["head"]["proj"], hidden)
  for i in range(4):
    for name in ("q", "k", "v"):
      check(p["layers"]["attn"][name][i], hidden)
    for name in ("up", "gate"):
      check(p["layers"]["mlp"][name][i], hidden * math.sqrt(1 / (2 * (i + 1))))
  for zero in (p["layers"]["attn"]["o"], p["layers"]["mlp"]["down"], p["head"]["out_bias"]):
    assert not zero.any()
  for one in (p["layers"]["attn_norm"], p["layers"]["mlp_norm"], p["head"]["norm"]):
    assert (one == 1).all()
  # layers are independent draws
  assert not np.allclose(p["layers"]["attn"]["q"][0], p["layers"]["attn"]["q"][1])
  assert p["layers"]["attn"]["q"].shape == (4, D, D)
  assert p["layers"]["mlp"]["down"].shape == (4, 160, D)


def test_count_params_paper_config():
  cfg = model_lib.ModelConfig()
  D, V, F, N = 1024, 51_200, 3554, 24
  blocks = N * (4 * D * D + 3 * D * F + 2 * D)
  head = D + D * D + D * V + V
  counts = model_lib.count_params(cfg)
  assert counts == {"total": V * D + blocks + head, "non_embedding": blocks + D + D * D}
  assert 465e6 < counts["total"] < 475e6 and 355e6 < counts["non_embedding"] < 365e6
  small = _params()
  assert model_lib.count_params(small) == model_lib.count_params(CFG)


# ------------------------------------------------------------------------------------------------
# Bad input.

def test_bad_input_errors():
  params = model_lib.init(CFG, jax.random.key(0))
  tok = np.full((1, 8), 20, np.int32)
  seg = np.ones((1, 8), np.int32)
  with pytest.raises(ValueError, match="mode must be one of"):
    model_lib.apply(params, tok, seg, cfg=CFG, mode="sideways")
  with pytest.raises(ValueError, match="prefix_len_B must be in"):
    model_lib.apply(params, tok, seg, cfg=CFG, mode="prefix", prefix_len_B=9)
  with pytest.raises(ValueError, match="prefix_len_B must be in"):
    model_lib.apply(params, tok, seg, cfg=CFG, mode="prefix", prefix_len_B=np.array([3, 9])[:1] * 3)
  with pytest.raises(ValueError, match="needs prefix_len_B"):
    model_lib.apply(params, tok, seg, cfg=CFG, mode="prefix")
  with pytest.raises(ValueError, match="max_seq_len=64"):
    model_lib.apply(params, np.full((1, 65), 20, np.int32), np.ones((1, 65), np.int32), cfg=CFG)
  with pytest.raises(ValueError, match="segment_ids_BxL must have shape"):
    model_lib.apply(params, tok, seg[:, :4], cfg=CFG)
  with pytest.raises(ValueError, match="bidir_BxL must have shape"):
    model_lib.apply(params, tok, seg, cfg=CFG, bidir_BxL=np.ones((1, 4), bool))
  for field, value in [("head", "conv"), ("attention_impl", "magic"), ("d_model", 0),
                       ("head_dim", 15), ("compute_dtype", "int8"), ("remat", "no_such_policy")]:
    with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
      model_lib.ModelConfig(**{field: value})

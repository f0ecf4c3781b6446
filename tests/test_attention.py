"""Attention masks and implementations (DESIGN.md §2): reference rule, XLA path, fast paths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualjax import attention

B, L, N, H = 2, 24, 2, 16


def _inputs(dtype=jnp.float32):
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(B, L, N, H)) for _ in range(3))
  seg = np.ones((B, L), np.int32)
  seg[0, 9:] = 2
  seg[0, 20:] = 0                                   # trailing padding
  seg[1, 13:] = 2
  bidir = np.zeros((B, L), bool)
  bidir[0, :4] = bidir[0, 9:15] = True              # two packed sequences, own prefixes
  bidir[1, :13] = True
  return [jnp.asarray(x, dtype) for x in (q, k, v)], seg, bidir


def _np_attention(q, k, v, seg, bidir):
  """float64: i attends j iff same segment and (j <= i or both bidir)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  out = np.zeros_like(q)
  for b in range(B):
    for i in range(L):
      ok = np.array([seg[b, i] == seg[b, j] and (j <= i or (bidir[b, i] and bidir[b, j]))
                     for j in range(L)])
      for n in range(N):
        s = k[b, :, n] @ q[b, i, n] / np.sqrt(H)
        w = np.where(ok, np.exp(s - s[ok].max()), 0.0)
        out[b, i, n] = (w / w.sum()) @ v[b, :, n]
  return out


@pytest.mark.parametrize("kind", ["causal", "bidirectional", "flags"])
def test_xla_matches_numpy(kind):
  (q, k, v), seg, bidir = _inputs()
  flags = {"causal": np.zeros_like(bidir), "bidirectional": np.ones_like(bidir),
           "flags": bidir}[kind]
  with jax.default_matmul_precision("highest"):
    got = attention.attend(q, k, v, seg, bidir, kind=kind, impl="xla")
  np.testing.assert_allclose(got, _np_attention(q, k, v, seg, flags), atol=1e-5)


def test_mask_rule():
  _, seg, bidir = _inputs()
  m = np.asarray(attention.attention_mask(jnp.asarray(seg), jnp.asarray(bidir)))[:, 0]
  for b, i, j in [(0, 3, 0), (0, 0, 3), (0, 10, 14), (1, 2, 12), (1, 14, 13)]:
    assert m[b, i, j], (b, i, j)
  for b, i, j in [(0, 4, 5), (0, 9, 8), (0, 15, 16), (0, 3, 9), (1, 13, 14), (1, 12, 13),
                  (0, 21, 19)]:
    assert not m[b, i, j], (b, i, j)


def test_auto_and_bad_impl():
  if jax.default_backend() == "cpu":
    assert attention.resolve("auto", "causal", jnp.bfloat16) == "xla"
  assert attention.resolve("auto", "flags", jnp.float32) == "xla" or jax.default_backend() == "tpu"
  with pytest.raises(ValueError, match="attention_impl must be one of"):
    attention.resolve("flash3", "causal", jnp.bfloat16)


@pytest.mark.parametrize("kind", ["causal", "bidirectional", "flags"])
def test_fast_path_matches_xla(kind):
  backend = jax.default_backend()
  if backend in ("gpu", "cuda"):
    impl = "cudnn"
  elif backend == "tpu":
    impl = "splash"
    if kind == "flags":
      pytest.skip("splash supports causal/bidirectional rows only (auto uses xla for flags)")
  else:
    pytest.skip(f"no fast attention path on backend {backend!r} (cudnn needs a GPU, splash a TPU)")
  # Shapes a fused kernel accepts: bf16, head dim 64, length a multiple of 128.
  rng = np.random.default_rng(1)
  b, l, n, h = 2, 256, 4, 64
  q, k, v = (jnp.asarray(rng.normal(size=(b, l, n, h)), jnp.bfloat16) for _ in range(3))
  seg = np.ones((b, l), np.int32)
  seg[0, 100:] = 2
  seg[1, 200:] = 0
  bidir = np.zeros((b, l), bool)
  bidir[0, :40] = bidir[0, 100:170] = True
  bidir[1, :150] = True
  ref = attention.attend(q, k, v, seg, bidir, kind=kind, impl="xla").astype(jnp.float32)
  got = jax.jit(lambda *a: attention.attend(*a, kind=kind, impl=impl))(q, k, v, seg, bidir)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref), atol=3e-2)
  # and the gradients
  f = lambda impl: lambda q, k, v: (attention.attend(q, k, v, seg, bidir, kind=kind, impl=impl)
                                    .astype(jnp.float32) ** 2).sum()
  g_ref = jax.grad(f("xla"), argnums=(0, 1, 2))(q, k, v)
  g = jax.jit(jax.grad(f(impl), argnums=(0, 1, 2)))(q, k, v)
  for a, r in zip(g, g_ref):
    a, r = np.asarray(a, np.float32), np.asarray(r, np.float32)
    assert np.abs(a - r).max() < 0.05 * np.abs(r).max() + 1e-2


def _packed_rows(B, L, seed=1):
  rng = np.random.default_rng(seed)
  seg = np.zeros((B, L), np.int32)
  bid = np.zeros((B, L), bool)
  for r in range(B):
    cuts = np.sort(rng.choice(np.arange(1, L - 10), 3, replace=False))
    pos = 0
    for d, c in enumerate(list(cuts) + [L - 10 * (r % 2)]):  # odd rows end in padding
      seg[r, pos:c] = d + 1
      bid[r, pos:pos + rng.integers(0, c - pos + 1)] = True
      pos = c
  return jnp.asarray(seg), jnp.asarray(bid)


@pytest.mark.parametrize("kind", ["causal", "bidirectional", "flags"])
def test_splash_kernel_logic_on_a_mesh_matches_xla(kind):
  """The Splash kernel (Pallas interpret mode: its own logic on CPU) inside the per-device
  shard_map on a (2, 2, 2) mesh, documents, padding and per-token prefixes: output and gradient
  equal the XLA reference."""
  from dualjax import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from dualjax import sharding  # pylint: disable=import-outside-toplevel
  B, L, N, H = 8, 128, 2, 64
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((B, L, N, H)), jnp.float32) for _ in range(3))
  seg, bid = _packed_rows(B, L)
  mesh = mesh_lib.make_mesh(2, 2, 2)

  def splash(q):
    with sharding.activation_rules(mesh, sharding.DEFAULT_RULES):
      return attention.attend(q, k, v, seg, bid, kind=kind, impl="splash_interpret")
  ref = lambda q: attention.attend(q, k, v, seg, bid, kind=kind, impl="xla")
  np.testing.assert_allclose(jax.jit(splash)(q), ref(q), atol=2e-6)
  np.testing.assert_allclose(jax.jit(jax.grad(lambda q: (splash(q) ** 2).sum()))(q),
                             jax.grad(lambda q: (ref(q) ** 2).sum())(q), atol=2e-5)


@pytest.mark.parametrize("mesh_shape,lam", [((2, 2, 2), 0.5), ((4, 2, 1), 0.375)])
def test_splash_inside_the_training_step(mesh_shape, lam):
  """The dual step's gradient with Splash (interpret mode) equals the XLA attention's: in the
  time split's replica vmap with tensor parallelism, and in the device split's shard_map."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  from dualjax import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from dualjax import model as model_lib  # pylint: disable=import-outside-toplevel
  from dualjax import sharding  # pylint: disable=import-outside-toplevel
  from dualjax import split as split_lib  # pylint: disable=import-outside-toplevel
  from dualjax import step as step_lib  # pylint: disable=import-outside-toplevel
  cfg = model_lib.ModelConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=2, head_dim=16,
                              mlp_dim=48, max_seq_len=128, compute_dtype="float32",
                              attention_impl="xla")
  mesh = mesh_lib.make_mesh(*mesh_shape)
  split = split_lib.make_split(lam, 16, mesh_shape[0], whole_microsteps=mesh_shape[2] > 1)
  assert split.program == ("time" if mesh_shape[2] > 1 else "device")
  seg, _ = _packed_rows(16, 129, seed=3)
  tokens = np.random.default_rng(4).integers(16, 64, (16, 129)).astype(np.int32)
  tokens[np.asarray(jnp.diff(seg, axis=1, prepend=0) != 0)] = 1  # <s> at document starts
  batch = mesh_lib.to_global({"tokens": tokens, "segment_ids": np.asarray(seg)}, mesh)
  params = model_lib.init(cfg, jax.random.key(0))
  params = jax.device_put(params, sharding.param_shardings(model_lib.logical_axes(cfg), params,
                                                           mesh))
  out = [jax.jit(step_lib.make_grad_fn(dataclasses.replace(cfg, attention_impl=impl), split, mesh,
                                       ar_loss_scale=2.0, z_loss=1e-4))(
      params, batch, jax.random.key(3)) for impl in ("xla", "splash_interpret")]
  for a, b in zip(jax.tree.leaves(out[0]), jax.tree.leaves(out[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_packed_layout_equals_the_segment_mask(causal):
  """The packed-sequence arguments given to cuDNN, read the way cuDNN reads them (jax's own
  flattening, then attention within each segment; a NumPy re-derivation), equal the explicit
  segment mask: every run of equal ids (padding too) is a segment, nothing is left unwritten."""
  fa = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
  B, L, N, H = 4, 64, 2, 16
  seg = np.zeros((B, L), np.int32)
  seg[0, :20], seg[0, 20:50], seg[0, 50:60] = 1, 2, 3   # + 4 padding
  seg[1, :] = 1                                         # one document
  seg[2, :10], seg[2, 10:11], seg[2, 11:40] = 1, 2, 3   # a 1-token document, 24 padding
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((B, L, N, H)) for _ in range(3))
  seqlen, offsets, runs = attention.packed_segments(jnp.asarray(seg), 6)
  assert np.asarray(runs).tolist() == [4, 1, 4, 1] and offsets.shape == (B, 7)
  ql, _, qo, _ = fa._fix_seqlen_offsets(seqlen, seqlen, offsets, offsets, jnp.zeros((B, L, N, H)),
                                        jnp.zeros((B, L, N, H)))
  ql, qo = np.asarray(ql).ravel(), np.asarray(qo).ravel() // (N * H)
  flat = [x.reshape(B * L, N, H) for x in (q, k, v)]
  out = np.full((B * L, N, H), np.nan)
  for n, o in zip(ql, qo):
    if n <= 0 or o >= B * L:
      continue
    s = np.einsum("qnh,knh->nqk", flat[0][o:o + n], flat[1][o:o + n]) / np.sqrt(H)
    if causal:
      s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    out[o:o + n] = np.einsum("nqk,knh->qnh", w / w.sum(-1, keepdims=True), flat[2][o:o + n])
  bidir = None if causal else jnp.ones((B, L), bool)
  ref = attention._xla(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)),
                       attention.attention_mask(jnp.asarray(seg), bidir))
  assert not np.isnan(out).any()
  np.testing.assert_allclose(out.reshape(B, L, N, H), np.asarray(ref), atol=2e-5)

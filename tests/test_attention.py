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

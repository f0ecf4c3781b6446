"""Attention with document masking and per-token bidirectionality (DESIGN.md §2).

Rule, shared by every implementation: query i may attend key j iff they are in the same segment
and (j <= i or (bidir_i and bidir_j)). Causal = no bidir flags, bidirectional = all flags,
prefix(P) = flags on the first P positions of the row.

Implementations:
  'xla'    reference einsum/softmax path with an explicit boolean mask; runs everywhere.
  'cudnn'  `jax.nn.dot_product_attention(implementation='cudnn')` with the same explicit mask
           (GPU, bf16/fp16 only).
  'splash' the TPU Splash kernel with segment ids; only causal or fully bidirectional rows
           (per-row prefixes are not a static mask, so 'auto' uses xla for them).
  'auto'   splash on TPU, cudnn on GPU (bf16/fp16), xla otherwise.
"""

from typing import Literal

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn", "splash", "auto")
Kind = Literal["causal", "bidirectional", "flags"]


def attention_mask(segment_ids_BxL: jax.Array, bidir_BxL: jax.Array | None) -> jax.Array:
  """Boolean [B, 1, L, L] mask: same segment and (causal or both positions bidirectional)."""
  L = segment_ids_BxL.shape[-1]
  same_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  causal_LxL = jnp.tril(jnp.ones((L, L), bool))
  allowed_BxLxL = causal_LxL[None]
  if bidir_BxL is not None:
    allowed_BxLxL = allowed_BxLxL | (bidir_BxL[:, :, None] & bidir_BxL[:, None, :])
  return (same_BxLxL & allowed_BxLxL)[:, None]


def resolve(impl: str, kind: Kind, dtype: jnp.dtype) -> str:
  """The implementation that `impl` means on this backend for rows of `kind`."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention_impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
  if impl != "auto":
    return impl
  backend = jax.default_backend()
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if backend == "tpu" and kind != "flags":
    return "splash"
  if backend in ("gpu", "cuda", "rocm") and half:
    return "cudnn"
  return "xla"


def _xla(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, mask_Bx1xLxL):
  scale = q_BxLxNxH.shape[-1] ** -0.5
  logits_BxNxLxL = jnp.einsum("bqnh,bknh->bnqk", q_BxLxNxH, k_BxLxNxH,
                              preferred_element_type=jnp.float32) * scale
  logits_BxNxLxL = jnp.where(mask_Bx1xLxL, logits_BxNxLxL, jnp.finfo(jnp.float32).min)
  probs_BxNxLxL = jax.nn.softmax(logits_BxNxLxL, axis=-1).astype(v_BxLxNxH.dtype)
  return jnp.einsum("bnqk,bknh->bqnh", probs_BxNxLxL, v_BxLxNxH,
                    preferred_element_type=jnp.float32).astype(v_BxLxNxH.dtype)


def _splash(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, segment_ids_BxL, kind: Kind):
  # pylint: disable=import-outside-toplevel
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  if kind == "flags":
    raise ValueError("attention_impl='splash' supports only causal or bidirectional rows; "
                     "use 'xla' or 'auto' for prefix / per-token bidirectional rows")
  _, L, N, H = q_BxLxNxH.shape
  base = sm.CausalMask((L, L)) if kind == "causal" else sm.FullMask((L, L))
  kernel = sk.make_splash_mha_single_device(mask=sm.MultiHeadMask([base] * N))
  to_NxLxH = lambda x: jnp.swapaxes(x, 0, 1)

  def one(q, k, v, seg):
    out = kernel(to_NxLxH(q) * H ** -0.5, to_NxLxH(k), to_NxLxH(v),
                 segment_ids=sk.SegmentIds(q=seg, kv=seg))
    return to_NxLxH(out)
  return jax.vmap(one)(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, segment_ids_BxL).astype(v_BxLxNxH.dtype)


def attend(q_BxLxNxH: jax.Array, k_BxLxNxH: jax.Array, v_BxLxNxH: jax.Array,
           segment_ids_BxL: jax.Array, bidir_BxL: jax.Array | None, *, kind: Kind,
           impl: str = "xla") -> jax.Array:
  """Multi-head attention -> [B, L, N, H] in the dtype of v.

  `kind` is 'causal' (bidir_BxL ignored), 'bidirectional' (ditto) or 'flags' (bidir_BxL used).
  """
  impl = resolve(impl, kind, q_BxLxNxH.dtype)
  if impl == "splash":
    return _splash(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, segment_ids_BxL, kind)
  B, L = segment_ids_BxL.shape
  if kind == "causal":
    bidir_BxL = None
  elif kind == "bidirectional":
    bidir_BxL = jnp.ones((B, L), bool)
  mask_Bx1xLxL = attention_mask(segment_ids_BxL, bidir_BxL)
  if impl == "cudnn":
    if q_BxLxNxH.dtype not in (jnp.bfloat16, jnp.float16):
      raise ValueError(f"attention_impl='cudnn' needs compute_dtype bfloat16/float16, "
                       f"got {q_BxLxNxH.dtype}")
    return jax.nn.dot_product_attention(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, mask=mask_Bx1xLxL,
                                        implementation="cudnn")
  return _xla(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, mask_Bx1xLxL)

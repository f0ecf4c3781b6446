"""Attention with document masking and per-token bidirectionality (DESIGN.md §2).

Rule, shared by every implementation: query i may attend key j iff they are in the same segment
and (j <= i or (bidir_i and bidir_j)). Causal = no bidir flags, bidirectional = all flags,
prefix(P) = flags on the first P positions of the row. Segment 0 (padding) is a segment too.

Implementations:
  'xla'     reference einsum/softmax with an explicit boolean mask; runs everywhere.
  'splash'  the TPU Splash kernel with segment ids (document masking at kernel speed): causal and
            bidirectional rows with static block masks; per-token flags (prefix evaluation) with a
            dynamic [L, L] mask per row. Rows of a length that is not a multiple of 128 use 'xla'.
  'cudnn'   GPU (bf16/fp16): cuDNN's packed-sequence flash attention, each run of equal segment
            ids its own sequence (padding included), at most `max_segments` per row; a row with
            more runs takes the explicit-mask cuDNN call instead (`lax.cond`, always exact).
            Per-token flags use the explicit-mask call (evaluation is forward-only).
  'auto'    splash on TPU, cudnn on GPU with a half dtype, xla otherwise.
  'splash_interpret'  the Splash kernel's own logic in Pallas interpret mode, on any backend (a
            test aid: it checks the wrapper and the masks on CPU).
Mosaic and cuDNN kernels cannot be partitioned automatically: they run per device inside a
`shard_map` over the mesh axes the caller leaves automatic (rows over replica x fsdp, heads over
tensor; whole rows per device), on the mesh `sharding.activation_rules` set (`current_mesh`),
also inside the trainer's partial-manual shard_map.
"""

import functools
from typing import Callable, Literal

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec as P

from dualjax import sharding

IMPLEMENTATIONS = ("xla", "cudnn", "splash", "auto", "splash_interpret")
Kind = Literal["causal", "bidirectional", "flags"]
HEAD_AXIS = "tensor"  # heads over this mesh axis; rows over every other automatic axis
MAX_SEGMENTS = 64  # cuDNN packed path: segments (runs of equal ids) per row it takes


def attention_mask(segment_ids_BxL: jax.Array, bidir_BxL: jax.Array | None) -> jax.Array:
  """Boolean [B, 1, L, L] mask: same segment and (causal or both positions bidirectional)."""
  L = segment_ids_BxL.shape[-1]
  same_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  causal_LxL = jnp.tril(jnp.ones((L, L), bool))
  allowed_BxLxL = causal_LxL[None]
  if bidir_BxL is not None:
    allowed_BxLxL = allowed_BxLxL | (bidir_BxL[:, :, None] & bidir_BxL[:, None, :])
  return (same_BxLxL & allowed_BxLxL)[:, None]


def resolve(impl: str, kind: Kind, dtype: jnp.dtype, length: int | None = None,
            platform: str | None = None) -> str:
  """The implementation that `impl` means for rows of `kind` and `length` on `platform`
  (default: the default backend)."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention_impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
  splash_ok = length is None or length % 128 == 0
  if impl in ("splash", "splash_interpret"):
    return impl if splash_ok else "xla"
  if impl != "auto":
    return impl
  platform = platform or jax.default_backend()
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if platform == "tpu":
    return "splash" if splash_ok else "xla"
  if platform in ("gpu", "cuda", "rocm") and half:
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


# ------------------------------------------------------------------------------------------------
# Per-device kernels inside a shard_map over the automatic mesh axes.

LocalFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def per_device(local: LocalFn, q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, segment_ids_BxL, bidir_BxL):
  """`local(q, k, v, seg, bidir)` on each device's whole rows (heads over 'tensor', rows over the
  other automatic axes: replica x fsdp on the training mesh), on `sharding.current_mesh()`;
  directly when there is none (or one device)."""
  mesh = sharding.current_mesh()
  if mesh is None or mesh.size == 1:
    return local(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, segment_ids_BxL, bidir_BxL)
  taken = sharding.vmapped_axes()
  free = [a for a, t in zip(mesh.axis_names, mesh.axis_types)
          if t != AxisType.Manual and a not in taken]
  rows = tuple(a for a in free if a != HEAD_AXIS and mesh.shape[a] > 1) or None
  heads = HEAD_AXIS if HEAD_AXIS in free and mesh.shape[HEAD_AXIS] > 1 else None
  qs, ss = P(rows, None, heads, None), P(rows, None)
  # A surrounding spmd vmap maps its axes onto the batched dimension: they are manual here too.
  return jax.shard_map(local, mesh=mesh, in_specs=(qs, qs, qs, ss, ss), out_specs=qs,
                       axis_names=set(free) | set(taken), check_vma=False)(
                           q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, segment_ids_BxL, bidir_BxL)


def _splash_local(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, segment_ids_BxL, bidir_BxL, *, kind: Kind,
                  interpret: bool):
  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  _, L, N, H = q_BxLxNxH.shape
  b = min(512, L) if L % min(512, L) == 0 else 128
  blocks = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                         block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  to_NxLxH = lambda x: jnp.swapaxes(x, 0, 1)

  def run(kernel, q, k, v, seg):
    out = kernel(to_NxLxH(q) * H ** -0.5, to_NxLxH(k), to_NxLxH(v),
                 segment_ids=sk.SegmentIds(q=seg, kv=seg))
    return to_NxLxH(out)

  if kind == "flags":
    def one(q, k, v, seg, bidir):
      mask_LxL = jnp.tril(jnp.ones((L, L), bool)) | (bidir[:, None] & bidir[None, :])
      kernel = sk.make_splash_mha_single_device(mask=mask_LxL[None], block_sizes=blocks,
                                                interpret=interpret)
      # jax 0.10: the constructor turns MaskInfo.is_dynamic_mask into an array; under jit that
      # is a tracer the kernel then tests with `if` -- restore the Python bool.
      fix = lambda mi: None if mi is None else mi._replace(is_dynamic_mask=True)
      kernel = sk.SplashAttentionKernel(fix(kernel.fwd_mask_info), fix(kernel.dq_mask_info),
                                        fix(kernel.dkv_mask_info), **kernel.kwargs)
      return run(kernel, q, k, v, seg)
    out = jax.vmap(one)(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, segment_ids_BxL, bidir_BxL)
  else:
    base = sm.CausalMask((L, L)) if kind == "causal" else sm.FullMask((L, L))
    kernel = sk.make_splash_mha_single_device(mask=sm.MultiHeadMask([base] * N),
                                              block_sizes=blocks, interpret=interpret)
    out = jax.vmap(functools.partial(run, kernel))(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH,
                                                   segment_ids_BxL)
  return out.astype(v_BxLxNxH.dtype)


def packed_segments(segment_ids_BxL: jax.Array, max_segments: int
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """cuDNN's packed layout: (seqlen [B, M], offsets [B, M+1], runs [B]) int32.

  Every maximal run of equal ids is one segment, the trailing padding run included, so every
  position is written; unused entries are -1; offsets are segment STARTS with one spare column
  (jax's layout, not cu_seqlens with a final end entry).
  """
  B, _ = segment_ids_BxL.shape
  M = max_segments
  start_BxL = jnp.concatenate([jnp.ones((B, 1), bool),
                               segment_ids_BxL[:, 1:] != segment_ids_BxL[:, :-1]], axis=1)
  run_BxL = jnp.cumsum(start_BxL, axis=1) - 1
  runs_B = run_BxL[:, -1] + 1
  lens_BxM = jnp.zeros((B, M), jnp.int32).at[jnp.arange(B)[:, None], run_BxL].add(1, mode="drop")
  starts_BxM = jnp.cumsum(lens_BxM, axis=1) - lens_BxM
  used_BxM = jnp.arange(M)[None, :] < runs_B[:, None]
  seqlen_BxM = jnp.where(used_BxM, lens_BxM, -1).astype(jnp.int32)
  offsets = jnp.concatenate([jnp.where(used_BxM, starts_BxM, -1), jnp.full((B, 1), -1)], axis=1)
  return seqlen_BxM, offsets.astype(jnp.int32), runs_B


def _cudnn_masked(q, k, v, seg, bidir):
  return jax.nn.dot_product_attention(q, k, v, mask=attention_mask(seg, bidir),
                                      implementation="cudnn")


def _cudnn_local(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, segment_ids_BxL, bidir_BxL, *, kind: Kind):
  # pylint: disable=g-import-not-at-top
  from jax._src.cudnn import fused_attention_stablehlo as fa
  if q_BxLxNxH.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"attention_impl='cudnn' needs compute_dtype bfloat16/float16, "
                     f"got {q_BxLxNxH.dtype}")
  if kind == "flags":
    return _cudnn_masked(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, segment_ids_BxL, bidir_BxL)
  bidir = None if kind == "causal" else bidir_BxL

  def packed(q, k, v, seg):
    seqlen, offsets, _ = packed_segments(seg, MAX_SEGMENTS)
    mask_type = fa.MaskType.PADDING_CAUSAL if kind == "causal" else fa.MaskType.NO_MASK
    return fa.dot_product_attention(q, k, v, q_seqlen=seqlen, kv_seqlen=seqlen,
                                    q_offsets=offsets, kv_offsets=offsets,
                                    scale=q.shape[-1] ** -0.5,  # the private API's default is 1
                                    mask_type=mask_type)

  runs_B = packed_segments(segment_ids_BxL, MAX_SEGMENTS)[2]
  return jax.lax.cond(runs_B.max() <= MAX_SEGMENTS, packed,
                      lambda q, k, v, seg: _cudnn_masked(q, k, v, seg, bidir),
                      q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, segment_ids_BxL)


def attend(q_BxLxNxH: jax.Array, k_BxLxNxH: jax.Array, v_BxLxNxH: jax.Array,
           segment_ids_BxL: jax.Array, bidir_BxL: jax.Array | None, *, kind: Kind,
           impl: str = "xla") -> jax.Array:
  """Multi-head attention -> [B, L, N, H] in the dtype of v.

  `kind` is 'causal' (bidir_BxL ignored), 'bidirectional' (ditto) or 'flags' (bidir_BxL used).
  """
  B, L = segment_ids_BxL.shape
  impl = resolve(impl, kind, q_BxLxNxH.dtype, L)
  if kind == "causal":
    bidir_BxL = None
  elif kind == "bidirectional":
    bidir_BxL = jnp.ones((B, L), bool)
  if impl in ("splash", "splash_interpret", "cudnn"):
    flags_BxL = jnp.zeros((B, L), bool) if bidir_BxL is None else bidir_BxL
    local = (functools.partial(_cudnn_local, kind=kind) if impl == "cudnn" else
             functools.partial(_splash_local, kind=kind, interpret=impl == "splash_interpret"))
    return per_device(local, q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, segment_ids_BxL, flags_BxL)
  return _xla(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, attention_mask(segment_ids_BxL, bidir_BxL))

"""The dual-objective transformer (DESIGN.md §2), as pure functions of a plain params pytree.

Pre-norm decoder: h = x + attn(norm(x)); out = h + mlp(norm(h)); separate q/k/v and up/gate
matrices, RoPE (rotate-half, theta 160 000), RMSNorm (eps 1e-7), no biases in blocks, untied
embedding, and the head norm -> Linear(D, D) -> GELU(tanh) -> Linear(D, V) + bias ('mlp') or
norm -> Linear(D, V) ('linear').

Params (kernels are [D_in, D_out], applied as x @ W; the blocks are always stacked on a leading
layer axis, whether or not `scan_layers` is set, so checkpoints do not depend on it):

  embed [V, D]
  layers/attn_norm [N, D]  layers/attn/{q, k, v} [N, D, H*Dh]  layers/attn/o [N, H*Dh, D]
  layers/mlp_norm  [N, D]  layers/mlp/{up, gate} [N, D, F]     layers/mlp/down [N, F, D]
  head/norm [D]  head/proj [D, D] (head='mlp' only)  head/out [D, V]  head/out_bias [V] ('mlp' only)

Precision: parameters fp32; matmul inputs in `compute_dtype` with fp32 accumulation; the
residual stream, norms, RoPE, softmax and logits are fp32 (like torch autocast, the authors'
setting).
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dualjax import attention

Params = dict[str, Any]
MODES = ("causal", "bidirectional", "prefix")
HEADS = ("mlp", "linear")
_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Model hyper-parameters; defaults are the paper's 470M model."""
  vocab_size: int = 51_200
  num_layers: int = 24
  d_model: int = 1024
  num_heads: int = 16
  head_dim: int = 64
  mlp_dim: int = 3554
  max_seq_len: int = 2048
  rope_theta: float = 160_000.0
  norm_eps: float = 1e-7
  head: str = "mlp"
  compute_dtype: str = "bfloat16"
  param_dtype: str = "float32"
  attention_impl: str = "xla"
  scan_layers: bool = True
  remat: bool | str | None = False  # False/None/'none', True/'full', or a jax.checkpoint_policies name

  def __post_init__(self):
    for name in ("vocab_size", "num_layers", "d_model", "num_heads", "head_dim", "mlp_dim",
                 "max_seq_len"):
      v = getattr(self, name)
      if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"ModelConfig.{name} must be a positive integer, got {v!r}")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim must be even for rotate-half RoPE, got {self.head_dim}")
    if not self.rope_theta > 0:
      raise ValueError(f"ModelConfig.rope_theta must be positive, got {self.rope_theta!r}")
    if not self.norm_eps > 0:
      raise ValueError(f"ModelConfig.norm_eps must be positive, got {self.norm_eps!r}")
    if self.head not in HEADS:
      raise ValueError(f"ModelConfig.head must be one of {HEADS}, got {self.head!r}")
    for name in ("compute_dtype", "param_dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ValueError(f"ModelConfig.{name} must be one of {_DTYPES}, got {getattr(self, name)!r}")
    if self.attention_impl not in attention.IMPLEMENTATIONS:
      raise ValueError(f"ModelConfig.attention_impl must be one of {attention.IMPLEMENTATIONS}, "
                       f"got {self.attention_impl!r}")
    _remat_policy(self.remat)  # validates

  @property
  def dtype(self) -> jnp.dtype:
    return jnp.dtype(self.compute_dtype)


def _remat_policy(remat: Any) -> Any:
  """None (no remat), 'full' or a jax.checkpoint_policies callable."""
  if remat in (False, None, "none", ""):
    return None
  if remat in (True, "full"):
    return "full"
  if isinstance(remat, str) and callable(getattr(jax.checkpoint_policies, remat, None)):
    return getattr(jax.checkpoint_policies, remat)
  raise ValueError(f"ModelConfig.remat must be False/'none', True/'full' or a "
                   f"jax.checkpoint_policies name, got {remat!r}")


# ------------------------------------------------------------------------------------------------
# Init.

def _tn(key: jax.Array, shape: tuple[int, ...], std: float, dtype) -> jax.Array:
  """Truncated normal at +-2 std (std of the untruncated normal)."""
  return jax.nn.initializers.truncated_normal(std, lower=-2.0, upper=2.0)(key, shape, dtype)


def init(cfg: ModelConfig, key: jax.Array) -> Params:
  """Parameters with the §2 init (zero out/down projections, per-layer MLP scale)."""
  D, V, F, N = cfg.d_model, cfg.vocab_size, cfg.mlp_dim, cfg.num_layers
  HD = cfg.num_heads * cfg.head_dim
  pd = jnp.dtype(cfg.param_dtype)
  k_embed, k_layers, k_proj, k_out = jax.random.split(key, 4)
  hidden_std = (2.0 / (5 * D)) ** 0.5
  vocab_std = (2.0 / (V + D)) ** 0.5

  def layer(k, i):
    kq, kk, kv, ku, kg = jax.random.split(k, 5)
    mlp_std = hidden_std * jnp.sqrt(1.0 / (2.0 * (i + 1.0)))
    return {
        "attn_norm": jnp.ones((D,), pd),
        "attn": {"q": _tn(kq, (D, HD), hidden_std, pd), "k": _tn(kk, (D, HD), hidden_std, pd),
                 "v": _tn(kv, (D, HD), hidden_std, pd), "o": jnp.zeros((HD, D), pd)},
        "mlp_norm": jnp.ones((D,), pd),
        "mlp": {"up": (_tn(ku, (D, F), 1.0, pd) * mlp_std).astype(pd),
                "gate": (_tn(kg, (D, F), 1.0, pd) * mlp_std).astype(pd),
                "down": jnp.zeros((F, D), pd)},
    }

  layers = jax.vmap(layer)(jax.random.split(k_layers, N), jnp.arange(N, dtype=jnp.float32))
  head = {"norm": jnp.ones((D,), pd), "out": _tn(k_out, (D, V), vocab_std, pd)}
  if cfg.head == "mlp":
    head["proj"] = _tn(k_proj, (D, D), hidden_std, pd)
    head["out_bias"] = jnp.zeros((V,), pd)
  return {"embed": _tn(k_embed, (V, D), vocab_std, pd), "layers": layers, "head": head}


def count_params(params_or_cfg: Params | ModelConfig) -> dict[str, int]:
  """{'total', 'non_embedding'}; non-embedding excludes the vocabulary-sized tensors.

  Excluded: input embedding [V, D], output matrix [D, V] and output bias [V]. For the paper
  config: total 468 700 160, non-embedding 363 791 360 (the paper's ≈470M / ≈360M).
  """
  params = params_or_cfg
  if isinstance(params_or_cfg, ModelConfig):
    params = jax.eval_shape(functools.partial(init, params_or_cfg), jax.random.key(0))
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  vocab = int(np.prod(params["embed"].shape)) + int(np.prod(params["head"]["out"].shape))
  if "out_bias" in params["head"]:
    vocab += int(np.prod(params["head"]["out_bias"].shape))
  return {"total": total, "non_embedding": total - vocab}


# ------------------------------------------------------------------------------------------------
# Forward.

def rms_norm(x_BxLxD: jax.Array, scale_D: jax.Array, eps: float) -> jax.Array:
  """fp32 RMSNorm with a learned scale."""
  x = x_BxLxD.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
  return x * scale_D.astype(jnp.float32)


def rope(x_BxLxNxH: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, rotate-half convention (pairs i and i + H/2), computed in fp32."""
  H = x_BxLxNxH.shape[-1]
  inv_freq = theta ** (-jnp.arange(0, H // 2, dtype=jnp.float32) * 2.0 / H)
  angle_BxLxH2 = positions_BxL.astype(jnp.float32)[..., None] * inv_freq
  cos = jnp.cos(angle_BxLxH2)[:, :, None, :]
  sin = jnp.sin(angle_BxLxH2)[:, :, None, :]
  x = x_BxLxNxH.astype(jnp.float32)
  x1, x2 = x[..., : H // 2], x[..., H // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxNxH.dtype)


def _dense(x: jax.Array, w: jax.Array, dtype) -> jax.Array:
  """x @ w with inputs in `dtype`, fp32 accumulation, fp32 result."""
  return jnp.einsum("...i,io->...o", x.astype(dtype), w.astype(dtype),
                    preferred_element_type=jnp.float32)


def _block(cfg: ModelConfig, kind: str, x_BxLxD, layer, segment_ids_BxL, bidir_BxL, positions_BxL):
  B, L, _ = x_BxLxD.shape
  dt = cfg.dtype
  h = rms_norm(x_BxLxD, layer["attn_norm"], cfg.norm_eps)
  heads = lambda w: _dense(h, w, dt).reshape(B, L, cfg.num_heads, cfg.head_dim).astype(dt)
  q_BxLxNxH = rope(heads(layer["attn"]["q"]), positions_BxL, cfg.rope_theta)
  k_BxLxNxH = rope(heads(layer["attn"]["k"]), positions_BxL, cfg.rope_theta)
  v_BxLxNxH = heads(layer["attn"]["v"])
  a_BxLxNxH = attention.attend(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, segment_ids_BxL, bidir_BxL,
                               kind=kind, impl=cfg.attention_impl)
  x_BxLxD = x_BxLxD + _dense(a_BxLxNxH.reshape(B, L, -1), layer["attn"]["o"], dt)
  h = rms_norm(x_BxLxD, layer["mlp_norm"], cfg.norm_eps)
  up_BxLxF = _dense(h, layer["mlp"]["up"], dt)
  gate_BxLxF = _dense(h, layer["mlp"]["gate"], dt)
  return x_BxLxD + _dense(up_BxLxF * jax.nn.silu(gate_BxLxF), layer["mlp"]["down"], dt)


def _bidir_flags(mode: str, B: int, L: int, prefix_len_B: Any, bidir_BxL: Any):
  """(kind, bidir_BxL) after validating the mode arguments (at trace time)."""
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  if bidir_BxL is not None:
    if tuple(jnp.shape(bidir_BxL)) != (B, L):
      raise ValueError(f"bidir_BxL must have shape {(B, L)}, got {tuple(jnp.shape(bidir_BxL))}")
    return "flags", jnp.asarray(bidir_BxL, bool)
  if mode == "prefix":
    if prefix_len_B is None:
      raise ValueError("mode='prefix' needs prefix_len_B (an int or one length per row)")
    p_B = jnp.broadcast_to(jnp.asarray(prefix_len_B, jnp.int32), (B,))
    try:
      p = np.asarray(prefix_len_B)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
      p = None  # traced: cannot be checked here; lengths > L act as fully bidirectional
    if p is not None:
      if np.any(p < 0) or np.any(p > L):
        raise ValueError(f"prefix_len_B must be in [0, sequence length {L}], got {p.tolist()}")
    return "flags", jnp.arange(L)[None, :] < p_B[:, None]
  if prefix_len_B is not None:
    raise ValueError(f"prefix_len_B is only used with mode='prefix', got mode={mode!r}")
  return mode, None


def apply_hidden(params: Params, tokens_BxL: jax.Array, segment_ids_BxL: jax.Array, *,
                 cfg: ModelConfig, mode: str = "causal", prefix_len_B: Any = None,
                 bidir_BxL: jax.Array | None = None,
                 positions_BxL: jax.Array | None = None) -> jax.Array:
  """Final residual stream [B, L, D] (fp32), before the output head. See `apply`."""
  if jnp.ndim(tokens_BxL) != 2:
    raise ValueError(f"tokens_BxL must be 2-D [batch, length], got shape {jnp.shape(tokens_BxL)}")
  B, L = jnp.shape(tokens_BxL)
  if tuple(jnp.shape(segment_ids_BxL)) != (B, L):
    raise ValueError(f"segment_ids_BxL must have shape {(B, L)}, got {jnp.shape(segment_ids_BxL)}")
  if L > cfg.max_seq_len:
    raise ValueError(f"sequence length {L} exceeds ModelConfig.max_seq_len={cfg.max_seq_len}")
  kind, bidir_BxL = _bidir_flags(mode, B, L, prefix_len_B, bidir_BxL)
  if positions_BxL is None:
    positions_BxL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
  segment_ids_BxL = jnp.asarray(segment_ids_BxL, jnp.int32)

  x_BxLxD = jnp.take(params["embed"], tokens_BxL, axis=0).astype(jnp.float32)

  def body(x, layer):
    return _block(cfg, kind, x, layer, segment_ids_BxL, bidir_BxL, positions_BxL), None

  policy = _remat_policy(cfg.remat)
  if policy is not None:
    body = jax.checkpoint(body, policy=None if policy == "full" else policy)
  if cfg.scan_layers:
    x_BxLxD, _ = jax.lax.scan(body, x_BxLxD, params["layers"])
  else:
    for i in range(cfg.num_layers):
      x_BxLxD, _ = body(x_BxLxD, jax.tree.map(lambda p, i=i: p[i], params["layers"]))
  return x_BxLxD


def head(params: Params, x_BxLxD: jax.Array, *, cfg: ModelConfig) -> jax.Array:
  """Output head: fp32 logits [B, L, V]."""
  hp = params["head"]
  h = rms_norm(x_BxLxD, hp["norm"], cfg.norm_eps)
  if cfg.head == "mlp":
    h = jax.nn.gelu(_dense(h, hp["proj"], cfg.dtype), approximate=True)
  logits_BxLxV = _dense(h, hp["out"], cfg.dtype)
  if "out_bias" in hp:
    logits_BxLxV = logits_BxLxV + hp["out_bias"].astype(jnp.float32)
  return logits_BxLxV


def apply(params: Params, tokens_BxL: jax.Array, segment_ids_BxL: jax.Array, *,
          cfg: ModelConfig, mode: str = "causal", prefix_len_B: Any = None,
          bidir_BxL: jax.Array | None = None,
          positions_BxL: jax.Array | None = None) -> jax.Array:
  """Logits [B, L, V] (fp32). Position i attends j iff same segment and (j <= i or both bidir).

  mode: 'causal' (no bidir), 'bidirectional' (all), 'prefix' (positions < prefix_len_B[b]; an
  int applies to every row). `bidir_BxL` (per-token flags) overrides `mode`. Positions default
  to arange(L) in the packed row.
  """
  x_BxLxD = apply_hidden(params, tokens_BxL, segment_ids_BxL, cfg=cfg, mode=mode,
                         prefix_len_B=prefix_len_B, bidir_BxL=bidir_BxL,
                         positions_BxL=positions_BxL)
  return head(params, x_BxLxD, cfg=cfg)

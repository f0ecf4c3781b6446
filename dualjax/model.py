"""The dual-objective transformer (DESIGN.md §2): a `flax.linen` module used pure-functionally.

Pre-norm decoder: h = x + attn(norm(x)); out = h + mlp(norm(h)); separate q/k/v and up/gate
matrices, RoPE (rotate-half, theta 160 000), RMSNorm (eps 1e-7), no biases in blocks, untied
embedding, and the head norm -> Linear(D, D) -> GELU(tanh) -> Linear(D, V) + bias ('mlp') or
norm -> Linear(D, V) ('linear').

Every parameter is declared once (`_param`): its initializer and its logical axes. The blocks run
under `nn.scan` (stacked on a leading 'layers' axis whatever `scan_layers` says, so checkpoints
do not depend on it) with `nn.remat`. Params (kernels [D_in, D_out], applied as x @ W):

  embed [V, D]
  layers/attn_norm [N, D]  layers/attn/{q, k, v} [N, D, H*Dh]  layers/attn/o [N, H*Dh, D]
  layers/mlp_norm  [N, D]  layers/mlp/{up, gate} [N, D, F]     layers/mlp/down [N, F, D]
  head/norm [D]  head/proj [D, D] (head='mlp' only)  head/out [D, V]  head/out_bias [V] ('mlp' only)

Precision (defaults: param_dtype fp32, compute_dtype bf16):
  fp32  the parameters (cast to bf16 at each matmul), the embedding output and the residual
        stream (x + attn + mlp summed in fp32), RMSNorm and RoPE arithmetic, attention scores
        and softmax, every matmul's accumulation, the head's GELU, the logits (+ bias), losses;
  bf16  the matmul operands, q/k/v (after RoPE), attention probabilities and output, the MLP's
        up/gate intermediates and their SwiGLU product.
The authors use no autocast: they cast the embeddings and the residual stream to bf16
explicitly (each block's sum is rounded to bf16; norms and RoPE run in fp32 and are cast back),
and their head's projection, GELU and logits are bf16 (the logits rounded, then cast to fp32 for
the loss). dualjax keeps the residual stream in fp32 so that the blocks' small updates (`o` and
`down` start at zero) are not rounded to bf16's 8 significant bits at every layer, and the
logits in fp32 so that the losses and the evaluations' log-likelihoods carry no bf16 rounding
of the logits (up to 2^-9 of each: 0.03 nats at a logit of 16). It costs 2 more bytes per
element of the [B, L, D] activations kept for the backward pass; the matmuls, where the time
goes, take bf16 operands as theirs do.

Activations carry logical constraints ('activation_*' names, see dualjax.sharding).

Functional API: `init(cfg, key) -> params` (plain, unboxed), `apply(params, tokens_BxL,
segment_ids_BxL, *, cfg, mode, ...) -> logits_BxLxV`, `logical_axes(cfg)`, `count_params`.
"""

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dualjax import attention

Params = dict[str, Any]
MODES = ("causal", "bidirectional", "prefix")
HEADS = ("mlp", "linear")
_DTYPES = ("float32", "bfloat16", "float16")

# Logical names of activation dimensions (mapped to mesh axes by the config's rules).
BATCH, LENGTH, EMBED, HEADS_ACT, KV, MLP_ACT, VOCAB_ACT = (
    "activation_batch", "activation_length", "activation_embed", "activation_heads",
    "activation_kv", "activation_mlp", "activation_vocab")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Model hyper-parameters; defaults are the paper's 470M model."""
  vocab_size: int = 51_200
  num_layers: int = 24
  d_model: int = 1024
  num_heads: int = 16
  head_dim: int = 64
  mlp_dim: int = 3554
  mlp_multiple: int = 1  # store the FFN width padded to a multiple of this (zero padding, same math)
  max_seq_len: int = 2048
  rope_theta: float = 160_000.0
  norm_eps: float = 1e-7
  head: str = "mlp"
  compute_dtype: str = "bfloat16"
  param_dtype: str = "float32"
  attention_impl: str = "auto"
  scan_layers: bool = True
  remat: bool | str | None = "none"  # False/None/'none', True/'full', or a jax.checkpoint_policies name
  head_chunk: int = 512  # losses run the output head over this many positions at a time (0: all)

  def __post_init__(self):
    for name in ("vocab_size", "num_layers", "d_model", "num_heads", "head_dim", "mlp_dim",
                 "max_seq_len", "mlp_multiple"):
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
    if not isinstance(self.head_chunk, (int, np.integer)) or self.head_chunk < 0:
      raise ValueError(f"ModelConfig.head_chunk must be an integer >= 0, got {self.head_chunk!r}")
    if self.attention_impl not in attention.IMPLEMENTATIONS:
      raise ValueError(f"ModelConfig.attention_impl must be one of {attention.IMPLEMENTATIONS}, "
                       f"got {self.attention_impl!r}")
    remat_policy(self.remat)  # validates

  @property
  def dtype(self) -> jnp.dtype:
    return jnp.dtype(self.compute_dtype)

  @property
  def mlp_padded(self) -> int:
    """The stored FFN width: mlp_dim rounded up to a multiple of mlp_multiple."""
    return -(-self.mlp_dim // self.mlp_multiple) * self.mlp_multiple


def remat_policy(remat: Any) -> Any:
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
# Parameter declarations: initializer + logical axes, in one place.

def _tn(std: float | jax.Array) -> Callable[..., jax.Array]:
  """Truncated normal at +-2 std (std of the untruncated normal)."""
  def init(key, shape, dtype):
    unit = jax.nn.initializers.truncated_normal(1.0, lower=-2.0, upper=2.0)(key, shape, dtype)
    return (unit * std).astype(dtype)
  return init


def _zero_beyond(init: Callable[..., jax.Array], axis: int, n: int) -> Callable[..., jax.Array]:
  """`init` with every index >= n along `axis` zero (the FFN padding)."""
  def padded(key, shape, dtype):
    x = init(key, shape, dtype)
    keep = jnp.arange(shape[axis]) < n
    return jnp.where(keep.reshape([-1 if i == axis % len(shape) else 1
                                   for i in range(len(shape))]), x, 0).astype(dtype)
  return padded


def _hidden_std(d_model: int) -> float:
  return (2.0 / (5 * d_model)) ** 0.5


def _vocab_std(cfg: ModelConfig) -> float:
  return (2.0 / (cfg.vocab_size + cfg.d_model)) ** 0.5


def _param(module: nn.Module, name: str, init: Callable[..., jax.Array], shape: tuple[int, ...],
           axes: tuple[str, ...], dtype: Any) -> jax.Array:
  """Declares a parameter with its initializer and logical axes (one per dimension)."""
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def _constrain(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  """A logical sharding constraint (a no-op unless the caller set mesh rules)."""
  return nn.with_logical_constraint(x, axes)


# ------------------------------------------------------------------------------------------------
# Layers.

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


def dense(x: jax.Array, w: jax.Array, dtype: Any) -> jax.Array:
  """x @ w with inputs in `dtype`, fp32 accumulation, fp32 result."""
  return jnp.einsum("...i,io->...o", x.astype(dtype), w.astype(dtype),
                    preferred_element_type=jnp.float32)


class Attention(nn.Module):
  """Multi-head self-attention with RoPE and document/bidirectional masking."""
  cfg: ModelConfig
  kind: str

  @nn.compact
  def __call__(self, h_BxLxD, segment_ids_BxL, bidir_BxL, positions_BxL):
    cfg, dt = self.cfg, self.cfg.dtype
    B, L, D = h_BxLxD.shape
    HD, pd = cfg.num_heads * cfg.head_dim, jnp.dtype(cfg.param_dtype)
    std = _hidden_std(D)
    w = {n: _param(self, n, _tn(std), (D, HD), ("embed", "heads"), pd) for n in ("q", "k", "v")}
    w_o = _param(self, "o", nn.initializers.zeros, (HD, D), ("heads", "embed"), pd)

    def heads(x):
      x = dense(h_BxLxD, x, dt).reshape(B, L, cfg.num_heads, cfg.head_dim).astype(dt)
      return _constrain(x, (BATCH, LENGTH, HEADS_ACT, KV))
    q_BxLxNxH = rope(heads(w["q"]), positions_BxL, cfg.rope_theta)
    k_BxLxNxH = rope(heads(w["k"]), positions_BxL, cfg.rope_theta)
    v_BxLxNxH = heads(w["v"])
    a_BxLxNxH = attention.attend(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, segment_ids_BxL, bidir_BxL,
                                 kind=self.kind, impl=cfg.attention_impl)
    a_BxLxNxH = _constrain(a_BxLxNxH, (BATCH, LENGTH, HEADS_ACT, KV))
    return dense(a_BxLxNxH.reshape(B, L, HD), w_o, dt)


class Mlp(nn.Module):
  """SwiGLU: down(up(x) * silu(gate(x))); up/gate of layer i scaled by sqrt(1 / (2 (i + 1))).

  Stored F = `mlp_padded`: the padded up/gate columns and down rows are zero, so they add
  nothing, their gradients are zero, and Muon and AdamW keep them zero.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, h_BxLxD, layer):
    cfg, dt = self.cfg, self.cfg.dtype
    D, F, Fp, pd = cfg.d_model, cfg.mlp_dim, cfg.mlp_padded, jnp.dtype(cfg.param_dtype)
    std = _hidden_std(D) * jnp.sqrt(1.0 / (2.0 * (layer.astype(jnp.float32) + 1.0)))
    up = _param(self, "up", _zero_beyond(_tn(std), -1, F), (D, Fp), ("embed", "mlp"), pd)
    gate = _param(self, "gate", _zero_beyond(_tn(std), -1, F), (D, Fp), ("embed", "mlp"), pd)
    down = _param(self, "down", nn.initializers.zeros, (Fp, D), ("mlp", "embed"), pd)
    # The [B, L, F] intermediates (what the backward pass keeps) in the compute dtype.
    up_BxLxF = _constrain(dense(h_BxLxD, up, dt).astype(dt), (BATCH, LENGTH, MLP_ACT))
    gate_BxLxF = _constrain(dense(h_BxLxD, gate, dt).astype(dt), (BATCH, LENGTH, MLP_ACT))
    return dense(up_BxLxF * jax.nn.silu(gate_BxLxF), down, dt)


class Block(nn.Module):
  """One pre-norm decoder block; a scan body: (x, inputs) -> (x, None)."""
  cfg: ModelConfig
  kind: str

  @nn.compact
  def __call__(self, x_BxLxD, segment_ids_BxL, bidir_BxL, positions_BxL, layer):
    cfg = self.cfg
    ones = nn.initializers.ones
    pd = jnp.dtype(cfg.param_dtype)
    attn_norm = _param(self, "attn_norm", ones, (cfg.d_model,), ("norm",), pd)
    mlp_norm = _param(self, "mlp_norm", ones, (cfg.d_model,), ("norm",), pd)
    h = rms_norm(x_BxLxD, attn_norm, cfg.norm_eps)
    x_BxLxD = x_BxLxD + Attention(cfg, self.kind, name="attn")(h, segment_ids_BxL, bidir_BxL,
                                                               positions_BxL)
    x_BxLxD = _constrain(x_BxLxD, (BATCH, LENGTH, EMBED))
    h = rms_norm(x_BxLxD, mlp_norm, cfg.norm_eps)
    x_BxLxD = x_BxLxD + Mlp(cfg, name="mlp")(h, layer)
    return _constrain(x_BxLxD, (BATCH, LENGTH, EMBED)), None


class Head(nn.Module):
  """Output head -> fp32 logits; usable alone: `Head(cfg).apply({'params': params['head']}, x)`."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg, dt = self.cfg, self.cfg.dtype
    D, V, pd = cfg.d_model, cfg.vocab_size, jnp.dtype(cfg.param_dtype)
    norm = _param(self, "norm", nn.initializers.ones, (D,), ("norm",), pd)
    h = rms_norm(x_BxLxD, norm, cfg.norm_eps)
    if cfg.head == "mlp":
      proj = _param(self, "proj", _tn(_hidden_std(D)), (D, D), ("embed", "embed_out"), pd)
      h = jax.nn.gelu(dense(h, proj, dt), approximate=True)
    out = _param(self, "out", _tn(_vocab_std(cfg)), (D, V), ("embed", "vocab"), pd)
    logits_BxLxV = dense(h, out, dt)
    if cfg.head == "mlp":
      bias = _param(self, "out_bias", nn.initializers.zeros, (V,), ("vocab",), pd)
      logits_BxLxV = logits_BxLxV + bias.astype(jnp.float32)
    return _constrain(logits_BxLxV, (BATCH, LENGTH, VOCAB_ACT))


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


class Transformer(nn.Module):
  """Embedding -> scanned blocks -> head. Position i attends j iff same segment and (j <= i or
  both bidir).

  mode: 'causal' (no bidir), 'bidirectional' (all), 'prefix' (positions < prefix_len_B[b]; an int
  applies to every row). `bidir_BxL` (per-token flags) overrides `mode`. Positions default to
  arange(L) in the packed row. `return_hidden` returns the final residual stream [B, L, D] (fp32)
  instead of the logits (then apply `Head`).
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL, segment_ids_BxL, *, mode: str = "causal",
               prefix_len_B: Any = None, bidir_BxL: Any = None, positions_BxL: Any = None,
               return_hidden: bool = False):
    cfg = self.cfg
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

    embed = _param(self, "embed", _tn(_vocab_std(cfg)), (cfg.vocab_size, cfg.d_model),
                   ("vocab", "embed"), jnp.dtype(cfg.param_dtype))
    x_BxLxD = jnp.take(embed, tokens_BxL, axis=0).astype(jnp.float32)
    x_BxLxD = _constrain(x_BxLxD, (BATCH, LENGTH, EMBED))

    block = Block
    policy = remat_policy(cfg.remat)
    if policy is not None:
      block = nn.remat(Block, policy=None if policy == "full" else policy)
    stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                    in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
                    length=cfg.num_layers, unroll=1 if cfg.scan_layers else cfg.num_layers,
                    metadata_params={nn.PARTITION_NAME: "layers"})
    x_BxLxD, _ = stack(cfg, kind, name="layers")(
        x_BxLxD, segment_ids_BxL, bidir_BxL, positions_BxL, jnp.arange(cfg.num_layers))
    if return_hidden:
      return x_BxLxD
    return Head(cfg, name="head")(x_BxLxD)


# ------------------------------------------------------------------------------------------------
# Functional API.

def _dummy_inputs() -> tuple[jax.Array, jax.Array]:
  return jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), jnp.int32)


def init_boxed(cfg: ModelConfig, key: jax.Array) -> Params:
  """Parameters wrapped in their `nn.LogicallyPartitioned` metadata."""
  return Transformer(cfg).init({"params": key}, *_dummy_inputs())["params"]


def init(cfg: ModelConfig, key: jax.Array) -> Params:
  """Parameters with the §2 init (a plain pytree, see the module docstring)."""
  return nn.meta.unbox(init_boxed(cfg, key))


@functools.lru_cache(maxsize=64)
def _logical_axes(cfg: ModelConfig) -> Params:
  boxed = jax.eval_shape(functools.partial(init_boxed, cfg), jax.random.key(0))
  specs = nn.get_partition_spec(boxed)
  return jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def logical_axes(cfg: ModelConfig) -> Params:
  """The params tree with each leaf's logical axis names, e.g. ('layers', 'embed', 'heads')."""
  return _logical_axes(cfg)


def abstract_params(cfg: ModelConfig) -> Params:
  """ShapeDtypeStructs of the parameters as stored (no memory)."""
  return jax.eval_shape(functools.partial(init, cfg), jax.random.key(0))


def logical_shapes(cfg: ModelConfig) -> Params:
  """Each parameter's shape without the FFN padding (what Muon's scale and counts use)."""
  unpadded = abstract_params(dataclasses.replace(cfg, mlp_multiple=1))
  return jax.tree.map(lambda x: tuple(x.shape), unpadded)


def apply(params: Params, tokens_BxL: jax.Array, segment_ids_BxL: jax.Array, *,
          cfg: ModelConfig, mode: str = "causal", prefix_len_B: Any = None,
          bidir_BxL: jax.Array | None = None, positions_BxL: jax.Array | None = None,
          return_hidden: bool = False) -> jax.Array:
  """Logits [B, L, V] (fp32) of `Transformer(cfg)`; see its docstring for the arguments."""
  return Transformer(cfg).apply({"params": params}, tokens_BxL, segment_ids_BxL, mode=mode,
                                prefix_len_B=prefix_len_B, bidir_BxL=bidir_BxL,
                                positions_BxL=positions_BxL, return_hidden=return_hidden)


def head(params: Params, x_BxLxD: jax.Array, *, cfg: ModelConfig) -> jax.Array:
  """The output head on a final residual stream: fp32 logits [B, L, V]."""
  return Head(cfg).apply({"params": params["head"]}, x_BxLxD)


def count_params(params_or_cfg: Params | ModelConfig) -> dict[str, int]:
  """{'total', 'non_embedding'}; non-embedding excludes the vocabulary-sized tensors.

  Excluded: input embedding [V, D], output matrix [D, V] and output bias [V]. For the paper
  config: total 468 700 160, non-embedding 363 791 360 (the paper's ≈470M / ≈360M).
  """
  params = params_or_cfg
  if isinstance(params_or_cfg, ModelConfig):  # logical: without the FFN padding
    params = abstract_params(dataclasses.replace(params_or_cfg, mlp_multiple=1))
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  vocab = int(np.prod(params["embed"].shape)) + int(np.prod(params["head"]["out"].shape))
  if "out_bias" in params["head"]:
    vocab += int(np.prod(params["head"]["out_bias"].shape))
  return {"total": total, "non_embedding": total - vocab}

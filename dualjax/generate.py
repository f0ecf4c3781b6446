"""Sampling from a dualjax model: autoregressive with a KV cache, and masked diffusion.

  python -m dualjax.generate --workdir=DIR --prompt=TEXT [--prompt=TEXT ...] [--prompt_file=F]
      [--mode=ar|diffusion] [--max_new_tokens=64] [--temperature=0] [--top_k=0] [--top_p=1]
      [--steps=N --order=confidence|random --block_size=0]   (diffusion)

Prompt rows. A batch is `tokens_BxP` with `segment_ids_BxP` (nonzero = prompt token, 0 =
padding); each row's prompt is one contiguous run, left- or right-padded (`pad_prompts`), and
starts with `<s>` (`encode_prompts`). The model was trained with RoPE positions of the packed row,
and a document at a row's start sees 0, 1, ...; so a prompt's tokens get positions 0..n-1
wherever the padding puts them, and padding is a segment no prompt token attends. Every row then
computes what it would alone and unpadded (tested against `model.apply` on the unpadded tokens).

AR (`generate_ar`): one prefill over the prompt block fills a per-layer KV cache (keys after
RoPE, in the compute dtype) with a valid flag and position per slot; each decode step feeds the
last sampled token into slot end_b + t (end_b: the slot after row b's last prompt token) at
position n_b + t and attends the valid slots. The cached forward (`forward_cached`) is built from
dualjax.model's pieces (`rms_norm`, `rope`, `dense`, `Mlp`, `head`) and its param tree, with the
xla attention's precision (fp32 logits and softmax). `use_cache=False` recomputes the whole
buffer with `model.apply` at every step (the reference, and the speed baseline).
Sampling (`filter_logits`): greedy if temperature == 0, else logits / temperature, then top-k
(k <= 0: off), then top-p (nucleus, p = 1: off) over the renormalised top-k distribution; tokens
tied with the last kept one are kept. A row stops at its first stop id (eos unless disabled,
plus user ids) and is padded after it; the loop ends when every row has stopped.

Masked diffusion (`generate_diffusion`): the row is `<s> prompt` followed by max_new_tokens
`<mask>` (padding after), bidirectional attention, positions 0.. from the row start. The model is
MNTP: the output at position j - 1 predicts the token at j, so a masked slot j is read from j - 1.
Each of `steps` steps samples every masked slot (greedy or as above; `<mask>`, `<s>` and `<pad>`
are never sampled) and commits a fixed number of them (`diffusion_schedule`): the most confident
(probability of the sampled token under the model) or a random choice; with `block_size` > 0 the
new tokens form semi-autoregressive blocks filled left to right, each over its share of the
steps. Committed tokens and the prompt never change; after the last step no mask is left.
Deterministic for a fixed key.

Bad input (no prompt, a prompt longer than max_seq_len - max_new_tokens, a bad flag or prompt
file) is one line on stderr, exit code 2, before the model is loaded.
"""

import dataclasses
import functools
import json
import math
import pathlib
import sys
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from dualjax import checkpoint as ckpt_lib
from dualjax import cli
from dualjax import config_lib
from dualjax import model as model_lib
from dualjax import tokenizer as tok_lib
from dualjax import trained as trained_lib
from dualjax import workdir as workdir_lib
from dualjax.special_tokens import BOS, MASK, PAD

ORDERS = ("confidence", "random")
_NEG_INF = -jnp.inf


class GenerateError(ValueError):
  """Bad generation input; one line naming the argument, flag or file."""


# ------------------------------------------------------------------------------------------------
# Prompts.

def encode_prompts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
  """`<s>` + the tokens of each text (the tokenizer's own `<s>` id)."""
  bos = int(getattr(tokenizer, "bos_id", BOS))
  return [[bos] + list(tokenizer.encode(t)) for t in texts]


def pad_prompts(prompts: Sequence[Sequence[int]], *, pad_id: int = PAD, side: str = "left",
                length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(tokens_BxP, segment_ids_BxP) int32: each prompt as segment 1, padding as segment 0."""
  if side not in ("left", "right"):
    raise GenerateError(f"side must be 'left' or 'right', got {side!r}")
  if not prompts or any(len(p) == 0 for p in prompts):
    raise GenerateError("every prompt needs at least one token (its <s>)")
  P = max(len(p) for p in prompts) if length is None else length
  if P < max(len(p) for p in prompts):
    raise GenerateError(f"length={length} is shorter than the longest prompt "
                        f"({max(len(p) for p in prompts)} tokens)")
  tokens = np.full((len(prompts), P), pad_id, np.int32)
  seg = np.zeros((len(prompts), P), np.int32)
  for b, p in enumerate(prompts):
    sl = slice(P - len(p), P) if side == "left" else slice(0, len(p))
    tokens[b, sl] = p
    seg[b, sl] = 1
  return tokens, seg


def check_prompts(segment_ids_BxP: Any, max_new_tokens: int, max_seq_len: int) -> None:
  """GenerateError unless every row holds one nonempty contiguous prompt that leaves room for
  `max_new_tokens` within `max_seq_len` (skipped for traced inputs)."""
  try:
    real = np.asarray(segment_ids_BxP) != 0
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return
  if real.ndim != 2:
    raise GenerateError(f"segment_ids must be [batch, length], got shape {real.shape}")
  for b, row in enumerate(real):
    idx = np.flatnonzero(row)
    if len(idx) == 0:
      raise GenerateError(f"prompt {b} is empty (every row needs at least its <s>)")
    if idx[-1] - idx[0] + 1 != len(idx):
      raise GenerateError(f"prompt {b} is not one contiguous run of tokens (pad on one side)")
    if len(idx) + max_new_tokens > max_seq_len:
      raise GenerateError(f"prompt {b} has {len(idx)} tokens; with max_new_tokens="
                          f"{max_new_tokens} that exceeds the model's max_seq_len={max_seq_len}")


def _check_shapes(tokens_BxP: Any, segment_ids_BxP: Any) -> None:
  if np.ndim(tokens_BxP) != 2 or np.shape(tokens_BxP) != np.shape(segment_ids_BxP):
    raise GenerateError(f"tokens and segment_ids must both be [batch, length], got shapes "
                        f"{np.shape(tokens_BxP)} and {np.shape(segment_ids_BxP)}")


def _check_sampling(temperature: float, top_k: int, top_p: float, max_new_tokens: int) -> None:
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise GenerateError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
  if not temperature >= 0:
    raise GenerateError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
  if top_k < 0:
    raise GenerateError(f"top_k must be >= 0 (0 = off), got {top_k!r}")
  if not 0 < top_p <= 1:
    raise GenerateError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")


def row_layout(segment_ids_BxP: jax.Array):
  """(real_BxP, n_B, start_B, end_B, positions_BxP) of contiguous prompt rows."""
  real = segment_ids_BxP != 0
  P = real.shape[1]
  n_B = real.sum(axis=1).astype(jnp.int32)
  start_B = jnp.argmax(real, axis=1).astype(jnp.int32)
  end_B = (P - jnp.argmax(real[:, ::-1], axis=1)).astype(jnp.int32)
  positions_BxP = jnp.maximum(jnp.cumsum(real, axis=1) - 1, 0).astype(jnp.int32)
  return real, n_B, start_B, end_B, positions_BxP


# ------------------------------------------------------------------------------------------------
# Sampling.

def filter_logits(logits_BxV: jax.Array, temperature: Any, top_k: Any, top_p: Any) -> jax.Array:
  """fp32 logits of the sampling distribution (temperature > 0): / temperature, top-k, top-p;
  removed tokens are -inf. top_k <= 0 and top_p >= 1 are off; ties at a cut are kept."""
  V = logits_BxV.shape[-1]
  x = logits_BxV.astype(jnp.float32) / jnp.maximum(jnp.asarray(temperature, jnp.float32), 1e-30)
  sorted_BxV = -jnp.sort(-x, axis=-1)
  k = jnp.where(top_k <= 0, V, jnp.clip(top_k, 1, V)).astype(jnp.int32)
  kth_Bx1 = sorted_BxV[:, k - 1][:, None]
  x = jnp.where(x >= kth_Bx1, x, _NEG_INF)
  sorted_BxV = jnp.where(sorted_BxV >= kth_Bx1, sorted_BxV, _NEG_INF)
  probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # mass of the more probable tokens
  keep_BxV = (before_BxV < top_p) | (jnp.arange(V) == 0) | (top_p >= 1)
  n_keep_B = keep_BxV.sum(axis=-1)
  last_Bx1 = jnp.take_along_axis(sorted_BxV, (n_keep_B - 1)[:, None], axis=-1)
  return jnp.where(x >= last_Bx1, x, _NEG_INF)


def sample_logits(key: jax.Array, logits_BxV: jax.Array, temperature: Any, top_k: Any,
                  top_p: Any) -> jax.Array:
  """int32[B]: argmax if temperature == 0, else a draw from `filter_logits` (whose sort runs only
  when top-k or top-p is on: XLA's CPU sort is slow)."""
  temperature = jnp.asarray(temperature, jnp.float32)

  def draw(x_BxV):
    x_BxV = jax.lax.cond((top_k > 0) | (top_p < 1),
                         lambda x: filter_logits(x, temperature, top_k, top_p),
                         lambda x: x.astype(jnp.float32) / temperature, x_BxV)
    return jax.random.categorical(key, x_BxV).astype(jnp.int32)

  return jax.lax.cond(temperature > 0, draw,
                      lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32), logits_BxV)


# ------------------------------------------------------------------------------------------------
# The cached forward.

class KVCache(NamedTuple):
  """Per-layer keys (after RoPE) and values, and per-slot validity and position."""
  k_NxBxTxHxK: jax.Array
  v_NxBxTxHxK: jax.Array
  valid_BxT: jax.Array
  pos_BxT: jax.Array


def init_cache(cfg: model_lib.ModelConfig, batch: int, length: int) -> KVCache:
  shape = (cfg.num_layers, batch, length, cfg.num_heads, cfg.head_dim)
  return KVCache(jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype),
                 jnp.zeros((batch, length), bool), jnp.zeros((batch, length), jnp.int32))


def _attend_cache(q_BxSxHxK, k_BxTxHxK, v_BxTxHxK, mask_BxSxT):
  """The xla attention's arithmetic (fp32 logits and softmax) over cache slots."""
  scale = q_BxSxHxK.shape[-1] ** -0.5
  logits = jnp.einsum("bshk,bthk->bhst", q_BxSxHxK, k_BxTxHxK,
                      preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mask_BxSxT[:, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_BxTxHxK.dtype)
  return jnp.einsum("bhst,bthk->bshk", probs, v_BxTxHxK,
                    preferred_element_type=jnp.float32).astype(v_BxTxHxK.dtype)


def forward_cached(params: model_lib.Params, cache: KVCache, tokens_BxS: jax.Array,
                   positions_BxS: jax.Array, slots_BxS: jax.Array, valid_BxS: jax.Array, *,
                   cfg: model_lib.ModelConfig) -> tuple[jax.Array, KVCache]:
  """Runs S new tokens (stored in cache slots `slots_BxS`; invalid ones are never attended) and
  returns the final residual stream [B, S, D] (fp32; apply `model.head`) and the new cache.

  A token attends the valid slots whose position is <= its own: with one contiguous prompt per
  row, the causal document attention of `model.apply`.
  """
  dt = cfg.dtype
  B, S = tokens_BxS.shape
  b_Bx1 = jnp.arange(B)[:, None]
  valid_BxT = cache.valid_BxT.at[b_Bx1, slots_BxS].set(valid_BxS)
  pos_BxT = cache.pos_BxT.at[b_Bx1, slots_BxS].set(positions_BxS.astype(jnp.int32))
  mask_BxSxT = valid_BxT[:, None, :] & (pos_BxT[:, None, :] <= positions_BxS[:, :, None])
  x_BxSxD = jnp.take(params["embed"], tokens_BxS, axis=0).astype(jnp.float32)
  mlp = model_lib.Mlp(cfg)

  def layer(x_BxSxD, inputs):
    lp, k_BxTxHxK, v_BxTxHxK, i = inputs
    h = model_lib.rms_norm(x_BxSxD, lp["attn_norm"], cfg.norm_eps)

    def heads(w):
      return model_lib.dense(h, w, dt).reshape(B, S, cfg.num_heads, cfg.head_dim).astype(dt)
    q = model_lib.rope(heads(lp["attn"]["q"]), positions_BxS, cfg.rope_theta)
    k = model_lib.rope(heads(lp["attn"]["k"]), positions_BxS, cfg.rope_theta)
    k_BxTxHxK = k_BxTxHxK.at[b_Bx1, slots_BxS].set(k)
    v_BxTxHxK = v_BxTxHxK.at[b_Bx1, slots_BxS].set(heads(lp["attn"]["v"]))
    a = _attend_cache(q, k_BxTxHxK, v_BxTxHxK, mask_BxSxT)
    x_BxSxD = x_BxSxD + model_lib.dense(a.reshape(B, S, -1), lp["attn"]["o"], dt)
    h = model_lib.rms_norm(x_BxSxD, lp["mlp_norm"], cfg.norm_eps)
    x_BxSxD = x_BxSxD + mlp.apply({"params": lp["mlp"]}, h, i)
    return x_BxSxD, (k_BxTxHxK, v_BxTxHxK)

  x_BxSxD, (k_new, v_new) = jax.lax.scan(
      layer, x_BxSxD, (params["layers"], cache.k_NxBxTxHxK, cache.v_NxBxTxHxK,
                       jnp.arange(cfg.num_layers)))
  return x_BxSxD, KVCache(k_new, v_new, valid_BxT, pos_BxT)


def _gather_rows(x_BxLxD: jax.Array, idx_B: jax.Array) -> jax.Array:
  return jnp.take_along_axis(x_BxLxD, idx_B[:, None, None], axis=1)


# ------------------------------------------------------------------------------------------------
# Autoregressive sampling.

@dataclasses.dataclass
class Generated:
  """tokens_BxN (pad after a stop), lengths_B (tokens produced, incl. the stop token), stopped_B
  (a stop id ended the row); AR with return_logits: logits_BxNxV (what each token was drawn
  from); diffusion: sequence_BxL (each row's prompt moved to the left, its tokens, then padding;
  L = min(P + N, max_seq_len)) and step_BxN (the step that committed each token)."""
  tokens: jax.Array
  lengths: jax.Array
  stopped: jax.Array
  logits: jax.Array | None = None
  sequence: jax.Array | None = None
  step: jax.Array | None = None


def _stop_ids(stop_ids: Sequence[int]) -> jax.Array:
  """The stop ids padded with -1 to a multiple of 8 (fewer compiled shapes)."""
  ids = [int(i) for i in stop_ids]
  return jnp.asarray(ids + [-1] * (-len(ids) % 8 or (0 if ids else 8)), jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "use_cache",
                                             "return_logits"))
def _ar(params, tokens_BxP, seg_BxP, key, temperature, top_k, top_p, stop_S, pad_id, *, cfg,
        max_new_tokens, use_cache, return_logits):
  B, P = tokens_BxP.shape
  N, T = max_new_tokens, tokens_BxP.shape[1] + max_new_tokens
  real, n_B, _, end_B, pos_BxP = row_layout(seg_BxP)
  if use_cache:
    state = init_cache(cfg, B, T)
    h, state = forward_cached(params, state, tokens_BxP, pos_BxP,
                              jnp.broadcast_to(jnp.arange(P), (B, P)), real, cfg=cfg)
  else:
    pad = ((0, 0), (0, N))
    state = (jnp.pad(tokens_BxP, pad), jnp.pad(real.astype(jnp.int32), pad), jnp.pad(pos_BxP, pad))
    h = model_lib.apply(params, *state[:2], cfg=cfg, positions_BxL=state[2], return_hidden=True)
  logits_BxV = model_lib.head(params, _gather_rows(h, end_B - 1), cfg=cfg)[:, 0]

  def feed(state, tok_B, t):
    slot_Bx1, pos_Bx1 = (end_B + t)[:, None], (n_B + t)[:, None]
    if use_cache:
      h, state = forward_cached(params, state, tok_B[:, None], pos_Bx1, slot_Bx1,
                                jnp.ones((B, 1), bool), cfg=cfg)
      h = h[:, 0]
    else:
      b = jnp.arange(B)
      buf_tok, buf_seg, buf_pos = state
      state = (buf_tok.at[b, slot_Bx1[:, 0]].set(tok_B), buf_seg.at[b, slot_Bx1[:, 0]].set(1),
               buf_pos.at[b, slot_Bx1[:, 0]].set(pos_Bx1[:, 0]))
      h = model_lib.apply(params, *state[:2], cfg=cfg, positions_BxL=state[2],
                          return_hidden=True)
      h = _gather_rows(h, slot_Bx1[:, 0])[:, 0]
    return state, model_lib.head(params, h[:, None], cfg=cfg)[:, 0]

  out = {"tokens": jnp.full((B, N), pad_id, jnp.int32), "lengths": jnp.zeros((B,), jnp.int32),
         "stopped": jnp.zeros((B,), bool)}
  if return_logits:
    out["logits"] = jnp.zeros((B, N, cfg.vocab_size), jnp.float32)

  def body(carry):
    t, state, logits_BxV, out = carry
    tok_B = sample_logits(jax.random.fold_in(key, t), logits_BxV, temperature, top_k, top_p)
    live_B = ~out["stopped"]
    out = dict(out, tokens=out["tokens"].at[:, t].set(jnp.where(live_B, tok_B, pad_id)),
               lengths=out["lengths"] + live_B,
               stopped=out["stopped"] | (live_B & jnp.isin(tok_B, stop_S)))
    if return_logits:
      out["logits"] = out["logits"].at[:, t].set(logits_BxV)
    state, logits_BxV = feed(state, jnp.where(live_B, tok_B, pad_id), t)
    return t + 1, state, logits_BxV, out

  def cond(carry):
    return (carry[0] < N) & ~jnp.all(carry[3]["stopped"])

  _, _, _, out = jax.lax.while_loop(cond, body, (jnp.int32(0), state, logits_BxV, out))
  return out


def generate_ar(params: model_lib.Params, cfg: model_lib.ModelConfig, tokens_BxP: Any,
                segment_ids_BxP: Any, *, key: jax.Array, max_new_tokens: int,
                temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                stop_ids: Sequence[int] = (), pad_id: int = PAD, use_cache: bool = True,
                return_logits: bool = False) -> Generated:
  """Samples up to `max_new_tokens` tokens after each prompt row (see the module docstring).

  One compiled function per (cfg, batch, prompt length, max_new_tokens, use_cache,
  return_logits); the sampling settings, stop ids' values and the key are traced.
  """
  _check_sampling(temperature, top_k, top_p, max_new_tokens)
  _check_shapes(tokens_BxP, segment_ids_BxP)
  check_prompts(segment_ids_BxP, max_new_tokens, cfg.max_seq_len)
  if not use_cache and np.shape(tokens_BxP)[1] + max_new_tokens > cfg.max_seq_len:
    raise GenerateError(f"use_cache=False recomputes a buffer of prompt length "
                        f"{np.shape(tokens_BxP)[1]} + max_new_tokens={max_new_tokens}, more than "
                        f"max_seq_len={cfg.max_seq_len}")
  out = _ar(params, jnp.asarray(tokens_BxP, jnp.int32), jnp.asarray(segment_ids_BxP, jnp.int32),
            key, jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p),
            _stop_ids(stop_ids), jnp.int32(pad_id), cfg=cfg, max_new_tokens=int(max_new_tokens),
            use_cache=use_cache, return_logits=return_logits)
  return Generated(out["tokens"], out["lengths"], out["stopped"], out.get("logits"))


# ------------------------------------------------------------------------------------------------
# Masked-diffusion sampling.

def diffusion_schedule(length: int, steps: int, block_size: int = 0
                       ) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(block of each step, tokens committed at each step): blocks of `block_size` new tokens
  (0: one block) left to right; the steps split as evenly as possible between blocks, and each
  block's tokens as evenly as possible between its steps (a step may commit none)."""
  if steps < 1:
    raise GenerateError(f"steps must be >= 1, got {steps}")
  if block_size < 0:
    raise GenerateError(f"block_size must be >= 0 (0 = one block), got {block_size}")
  size = block_size or length
  sizes = [min(size, length - s) for s in range(0, length, size)]
  if steps < len(sizes):
    raise GenerateError(f"steps={steps} is fewer than the {len(sizes)} blocks of block_size="
                        f"{block_size} in {length} new tokens (each block needs a step)")
  blocks, counts = [], []
  for b, m in enumerate(sizes):
    sb = steps // len(sizes) + (b < steps % len(sizes))
    blocks += [b] * sb
    counts += [(i + 1) * m // sb - i * m // sb for i in range(sb)]
  return tuple(blocks), tuple(counts)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "block_size", "schedule",
                                             "order"))
def _diffusion(params, tokens_BxP, seg_BxP, key, temperature, top_k, top_p, mask_id,
               suppress_K, pad_id, *, cfg, max_new_tokens, block_size, schedule, order):
  B, P = tokens_BxP.shape
  N, L = max_new_tokens, min(P + max_new_tokens, cfg.max_seq_len)  # rows are moved to the left
  _, n_B, start_B, _, _ = row_layout(seg_BxP)
  j_L = jnp.arange(L)
  prompt_BxL = jnp.take_along_axis(tokens_BxP, jnp.clip(start_B[:, None] + j_L, 0, P - 1), axis=1)
  in_prompt_BxL = j_L < n_B[:, None]
  in_row_BxL = j_L < (n_B + N)[:, None]
  seq_BxL = jnp.where(in_prompt_BxL, prompt_BxL, jnp.where(in_row_BxL, mask_id, pad_id))
  seg_BxL = in_row_BxL.astype(jnp.int32)
  slots_BxN = n_B[:, None] + jnp.arange(N)
  block_N = jnp.arange(N) // (block_size or N)
  block_of_step, count_of_step = (jnp.asarray(x, jnp.int32) for x in schedule)
  b_Bx1 = jnp.arange(B)[:, None]

  def step(s, carry):
    seq_BxL, masked_BxN, step_BxN = carry
    h = model_lib.apply(params, seq_BxL, seg_BxL, cfg=cfg, mode="bidirectional",
                        return_hidden=True)
    h_BxNxD = jnp.take_along_axis(h, (slots_BxN - 1)[:, :, None], axis=1)  # MNTP: j from j - 1
    logits_BxNxV = model_lib.head(params, h_BxNxD, cfg=cfg).at[:, :, suppress_K].set(_NEG_INF)
    k_sample, k_order = jax.random.split(jax.random.fold_in(key, s))
    flat = logits_BxNxV.reshape(B * N, -1)
    x0_BxN = sample_logits(k_sample, flat, temperature, top_k, top_p).reshape(B, N)
    if order == "confidence":
      probs = jax.nn.softmax(logits_BxNxV, axis=-1)
      conf_BxN = jnp.take_along_axis(probs, x0_BxN[..., None], axis=-1)[..., 0]
    else:
      conf_BxN = jax.random.uniform(k_order, (B, N))
    cand_BxN = masked_BxN & (block_N == block_of_step[s])[None]
    score_BxN = jnp.where(cand_BxN, conf_BxN, _NEG_INF)
    rank_BxN = jnp.argsort(jnp.argsort(-score_BxN, axis=1, stable=True), axis=1, stable=True)
    commit_BxN = cand_BxN & (rank_BxN < count_of_step[s])
    current_BxN = jnp.take_along_axis(seq_BxL, slots_BxN, axis=1)
    seq_BxL = seq_BxL.at[b_Bx1, slots_BxN].set(jnp.where(commit_BxN, x0_BxN, current_BxN))
    return (seq_BxL, masked_BxN & ~commit_BxN, jnp.where(commit_BxN, s, step_BxN))

  seq_BxL, _, step_BxN = jax.lax.fori_loop(
      0, len(schedule[0]), step,
      (seq_BxL, jnp.ones((B, N), bool), jnp.full((B, N), -1, jnp.int32)))
  return seq_BxL, jnp.take_along_axis(seq_BxL, slots_BxN, axis=1), step_BxN


def generate_diffusion(params: model_lib.Params, cfg: model_lib.ModelConfig, tokens_BxP: Any,
                       segment_ids_BxP: Any, *, key: jax.Array, max_new_tokens: int,
                       steps: int | None = None, order: str = "confidence", block_size: int = 0,
                       temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                       mask_id: int = MASK, never_sample: Sequence[int] = (BOS, PAD),
                       stop_ids: Sequence[int] = (), pad_id: int = PAD) -> Generated:
  """Fills `max_new_tokens` masks after each prompt in `steps` (default max_new_tokens) steps.

  `mask_id` is the tokenizer's `<mask>`; it and `never_sample` (its `<s>`, `<pad>`) are never
  sampled. `lengths`/`stopped` mark each row's first stop id (the tokens after it are kept).
  """
  _check_sampling(temperature, top_k, top_p, max_new_tokens)
  if order not in ORDERS:
    raise GenerateError(f"order must be one of {ORDERS}, got {order!r}")
  steps = max_new_tokens if steps is None else steps
  schedule = diffusion_schedule(max_new_tokens, steps, block_size)
  _check_shapes(tokens_BxP, segment_ids_BxP)
  check_prompts(segment_ids_BxP, max_new_tokens, cfg.max_seq_len)
  suppress = jnp.asarray(sorted({int(mask_id), *map(int, never_sample)}), jnp.int32)
  seq, tokens, step = _diffusion(
      params, jnp.asarray(tokens_BxP, jnp.int32), jnp.asarray(segment_ids_BxP, jnp.int32), key,
      jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p), jnp.int32(mask_id),
      suppress, jnp.int32(pad_id), cfg=cfg, max_new_tokens=int(max_new_tokens),
      block_size=int(block_size), schedule=schedule, order=order)
  is_stop = jnp.isin(tokens, _stop_ids(stop_ids))
  stopped = is_stop.any(axis=1)
  lengths = jnp.where(stopped, jnp.argmax(is_stop, axis=1) + 1, max_new_tokens).astype(jnp.int32)
  return Generated(tokens, lengths, stopped, sequence=seq, step=step)


def completions(tokenizer: Any, out: Generated) -> list[str]:
  """The text of each row's tokens before its stop token."""
  tokens, lengths, stopped = (np.asarray(x) for x in (out.tokens, out.lengths, out.stopped))
  return [tokenizer.decode(tokens[b, :lengths[b] - int(stopped[b])].tolist())
          for b in range(len(tokens))]


# ------------------------------------------------------------------------------------------------
# CLI.

FLAGS = flags.FlagValues()
_WORKDIR = flags.DEFINE_string("workdir", None, "the dualjax workdir (or <workdir>/checkpoints/N)",
                               flag_values=FLAGS)
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the newest)",
                             flag_values=FLAGS)
_PROMPT = flags.DEFINE_multi_string("prompt", [], "a prompt (repeat for a batch)",
                                    flag_values=FLAGS)
_PROMPT_FILE = flags.DEFINE_string(
    "prompt_file", None, "prompts: a .jsonl file of {\"prompt\": ...} objects (or JSON strings), "
    "else a text file with one prompt per line (\\n in a line stands for a newline)",
    flag_values=FLAGS)
_MODE = flags.DEFINE_enum("mode", "ar", ["ar", "diffusion"],
                          "ar: causal sampling with a KV cache; diffusion: iterative unmasking",
                          flag_values=FLAGS)
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "tokens to generate per prompt",
                                flag_values=FLAGS)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy", flag_values=FLAGS)
_TOP_K = flags.DEFINE_integer("top_k", 0, "keep the k most likely tokens (0 = off)",
                              flag_values=FLAGS)
_TOP_P = flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass (1 = off)", flag_values=FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed", flag_values=FLAGS)
_STOP_IDS = flags.DEFINE_list("stop_ids", [], "token ids that end a row (besides eos)",
                              flag_values=FLAGS)
_STOP = flags.DEFINE_multi_string("stop", [], "cut each completion's text at this string",
                                  flag_values=FLAGS)
_IGNORE_EOS = flags.DEFINE_bool("ignore_eos", False, "do not stop at the tokenizer's eos",
                                flag_values=FLAGS)
_STEPS = flags.DEFINE_integer("steps", None, "diffusion steps (default: max_new_tokens)",
                              flag_values=FLAGS)
_ORDER = flags.DEFINE_enum("order", "confidence", list(ORDERS),
                           "diffusion: which masks to commit at each step", flag_values=FLAGS)
_BLOCK_SIZE = flags.DEFINE_integer("block_size", 0,
                                   "diffusion: semi-autoregressive block size (0 = one block)",
                                   flag_values=FLAGS)
_BATCH = flags.DEFINE_integer("batch_size", 8, "prompts per device call", flag_values=FLAGS)
_OUTPUT = flags.DEFINE_string("output", None, "also write JSON lines {prompt, completion, tokens, "
                              "stopped} to this file", flag_values=FLAGS)


def read_prompt_file(path: str | pathlib.Path) -> list[str]:
  """Prompts of a .jsonl file ({"prompt": ...} or a JSON string per line) or a text file."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise GenerateError(f"--prompt_file {path} does not exist")
  try:
    lines = path.read_text(encoding="utf-8").splitlines()
  except UnicodeDecodeError as e:
    raise GenerateError(f"{path}: not UTF-8 text ({e.reason})") from None
  out = []
  for i, line in enumerate(lines, 1):
    if not line.strip():
      continue
    if path.suffix != ".jsonl":
      out.append(line.replace("\\n", "\n"))
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise GenerateError(f"{path}:{i}: not JSON ({e.msg})") from None
    if isinstance(obj, dict):
      obj = obj.get("prompt")
    if not isinstance(obj, str):
      raise GenerateError(f"{path}:{i}: expected a JSON string or an object with a string "
                          f"'prompt'")
    out.append(obj)
  return out


def _check_flags() -> tuple[list[str], list[int]]:
  if not _WORKDIR.value:
    raise GenerateError("--workdir is required")
  prompts = list(_PROMPT.value) + (read_prompt_file(_PROMPT_FILE.value)
                                   if _PROMPT_FILE.value else [])
  if not prompts:
    raise GenerateError("no prompt: give --prompt=TEXT or --prompt_file=FILE")
  _check_sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value, _MAX_NEW.value)
  if _BATCH.value < 1:
    raise GenerateError(f"--batch_size must be >= 1, got {_BATCH.value}")
  try:
    stop_ids = [int(i) for i in _STOP_IDS.value]
  except ValueError:
    raise GenerateError(f"--stop_ids must be integers, got {','.join(_STOP_IDS.value)}") from None
  if _MODE.value == "diffusion":
    diffusion_schedule(_MAX_NEW.value, _STEPS.value or _MAX_NEW.value, _BLOCK_SIZE.value)
  if _OUTPUT.value and not pathlib.Path(_OUTPUT.value).resolve().parent.is_dir():
    raise GenerateError(f"--output {_OUTPUT.value}: its directory does not exist")
  return prompts, stop_ids


def check_lengths(prompt_ids: Sequence[Sequence[int]], max_new_tokens: int,
                  max_seq_len: int) -> None:
  """GenerateError naming the first prompt that leaves no room for `max_new_tokens`."""
  for i, p in enumerate(prompt_ids):
    if len(p) + max_new_tokens > max_seq_len:
      raise GenerateError(f"prompt {i} has {len(p)} tokens (with <s>); with max_new_tokens="
                          f"{max_new_tokens} that exceeds the model's max_seq_len={max_seq_len}")


def _bucket(n: int, cap: int) -> int:
  return min(cap, 1 << max(0, math.ceil(math.log2(n)))) if n <= cap else n


def run_prompts(model: trained_lib.Trained, prompts: Sequence[str], *, mode: str,
                max_new_tokens: int, key: jax.Array, batch_size: int = 8,
                stop_ids: Sequence[int] = (), stop: Sequence[str] = (), ignore_eos: bool = False,
                **kw: Any) -> list[dict[str, Any]]:
  """Generates for text prompts in batches (left-padded to a power-of-two length);
  [{prompt, completion, tokens, stopped}]. `kw`: the sampler's settings."""
  tok, cfg = model.tokenizer, model.model_cfg
  ids = encode_prompts(tok, prompts)
  check_lengths(ids, max_new_tokens, cfg.max_seq_len)
  batch_size = min(batch_size, len(ids))
  stops = list(stop_ids) + ([] if ignore_eos else [tok.eos_id])
  results = []
  for c0 in range(0, len(ids), batch_size):
    chunk = ids[c0:c0 + batch_size]
    chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one compiled batch shape
    P = _bucket(max(map(len, chunk)), cfg.max_seq_len - max_new_tokens)
    tokens, seg = pad_prompts(chunk, pad_id=tok.pad_id, length=P)
    k = jax.random.fold_in(key, c0)
    if mode == "ar":
      out = generate_ar(model.params, cfg, tokens, seg, key=k, max_new_tokens=max_new_tokens,
                        stop_ids=stops, pad_id=tok.pad_id, **kw)
    else:
      out = generate_diffusion(model.params, cfg, tokens, seg, key=k,
                               max_new_tokens=max_new_tokens, mask_id=tok.mask_id,
                               never_sample=(tok.bos_id, tok.pad_id), stop_ids=stops,
                               pad_id=tok.pad_id, **kw)
    texts = completions(tok, out)
    toks, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for b in range(min(batch_size, len(ids) - c0)):
      text = texts[b]
      cut = min([text.find(s) for s in stop if s and s in text], default=-1)
      results.append({"prompt": prompts[c0 + b], "completion": text if cut < 0 else text[:cut],
                      "tokens": toks[b, :lengths[b]].tolist(),
                      "stopped": bool(np.asarray(out.stopped)[b]) or cut >= 0})
  return results


def main(argv: list[str]) -> int:
  if cli.parse(argv, __doc__, FLAGS) is None:
    return 0
  try:
    prompts, stop_ids = _check_flags()
    workdir = workdir_lib.split_run_path(_WORKDIR.value)[0]
    model_cfg = config_lib.model_config(workdir_lib.read_config(workdir))
    check_lengths(encode_prompts(workdir_lib.load_tokenizer(workdir), prompts), _MAX_NEW.value,
                  model_cfg.max_seq_len)
  except (GenerateError, ValueError, tok_lib.TokenizerError) as e:
    cli.fail(cli.one_line(e))
  lam = workdir_lib.run_lam(_WORKDIR.value)
  if lam is not None and ((_MODE.value == "ar" and lam <= 0) or
                          (_MODE.value == "diffusion" and lam >= 1)):
    print(f"warning: this model was trained with lam={lam} ("
          f"{'MDM' if lam <= 0 else 'AR'} only); --mode={_MODE.value} is outside its training",
          file=sys.stderr)
  try:
    model = trained_lib.load(_WORKDIR.value, step=_STEP.value)
  except (ValueError, ckpt_lib.CheckpointError, tok_lib.TokenizerError) as e:
    cli.fail(cli.one_line(e))
  kw: dict[str, Any] = {"temperature": _TEMPERATURE.value, "top_k": _TOP_K.value,
                        "top_p": _TOP_P.value}
  if _MODE.value == "diffusion":
    kw.update(steps=_STEPS.value or _MAX_NEW.value, order=_ORDER.value,
              block_size=_BLOCK_SIZE.value)
  try:
    results = run_prompts(model, prompts, mode=_MODE.value, max_new_tokens=_MAX_NEW.value,
                          key=jax.random.key(_SEED.value), batch_size=_BATCH.value,
                          stop_ids=stop_ids, stop=_STOP.value, ignore_eos=_IGNORE_EOS.value,
                          **kw)
  except GenerateError as e:
    cli.fail(str(e))
  for i, r in enumerate(results):
    print(f"=== {i} ===\n{r['prompt']}{r['completion']}")
  if _OUTPUT.value:
    workdir_lib.write_atomic(_OUTPUT.value, "".join(
        json.dumps(r, ensure_ascii=False) + "\n" for r in results))
  return 0


if __name__ == "__main__":
  cli.run(main, (GenerateError,))

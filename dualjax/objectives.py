"""The two objectives and their combination (DESIGN.md §3).

Batch: {'tokens': int[B, L+1], 'segment_ids': int[B, L+1]}; inputs tokens[:, :-1] (attention
segments segment_ids[:, :-1]), targets tokens[:, 1:]. A target is scorable iff it is not `<s>`
and not padding (target segment id 0). Both objectives predict token i+1 at position i (MNTP).

Normalisation:
  AR   mean over the batch's scorable targets: sum(ce) / max(#scorable, 1) (z-loss likewise).
       Per-device means averaged by the trainer weight devices equally, not tokens.
  MDM  weighted sum over scored targets / (B * L), L = input positions per row (z-loss likewise).
"""

from typing import Any

import jax
import jax.numpy as jnp

from dualjax import model as model_lib
from dualjax.special_tokens import BOS, MASK, NUM_SPECIAL

Batch = dict[str, jax.Array]
MIN_RATE = 1e-4  # p = (1 - MIN_RATE) * k / L + MIN_RATE


def split_batch(batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """(inputs_BxL, segment_ids_BxL, targets_BxL, scorable_BxL) after checking the layout."""
  for name in ("tokens", "segment_ids"):
    if name not in batch:
      raise ValueError(f"batch is missing '{name}' (expected keys 'tokens', 'segment_ids')")
  tokens, seg = batch["tokens"], batch["segment_ids"]
  if jnp.ndim(tokens) != 2 or jnp.shape(tokens)[1] < 2:
    raise ValueError(f"batch['tokens'] must be [B, L+1] with L >= 1, got shape {jnp.shape(tokens)}")
  if jnp.shape(seg) != jnp.shape(tokens):
    raise ValueError(f"batch['segment_ids'] shape {jnp.shape(seg)} != batch['tokens'] shape "
                     f"{jnp.shape(tokens)}")
  targets_BxL = tokens[:, 1:]
  scorable_BxL = (targets_BxL != BOS) & (seg[:, 1:] != 0)
  return tokens[:, :-1], seg[:, :-1], targets_BxL, scorable_BxL


def token_losses(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(cross-entropy, logsumexp) per position, fp32."""
  logits_BxLxV = logits_BxLxV.astype(jnp.float32)
  lse_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
  picked_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  return lse_BxL - picked_BxL, lse_BxL


def _chunk(length: int, chunk: int) -> int:
  """The largest divisor of `length` that is at most `chunk` (0: no chunking)."""
  if chunk <= 0 or chunk >= length:
    return length
  return max(c for c in range(1, chunk + 1) if length % c == 0)


def model_token_losses(params: Any, inputs_BxL: jax.Array, seg_BxL: jax.Array,
                       targets_BxL: jax.Array, *, cfg: model_lib.ModelConfig, mode: str
                       ) -> tuple[jax.Array, jax.Array]:
  """`token_losses` of the model's logits, the head run over chunks of `cfg.head_chunk`
  positions under `jax.checkpoint`: the fp32 [B, L, V] logits never exist at once (forward or
  backward), only one chunk's."""
  hidden_BxLxD = model_lib.apply(params, inputs_BxL, seg_BxL, cfg=cfg, mode=mode,
                                 return_hidden=True)
  B, L, D = hidden_BxLxD.shape
  C = _chunk(L, cfg.head_chunk)
  if C == L:
    return token_losses(model_lib.head(params, hidden_BxLxD, cfg=cfg), targets_BxL)

  @jax.checkpoint
  def one(h_BxCxD, t_BxC):
    return token_losses(model_lib.head(params, h_BxCxD, cfg=cfg), t_BxC)

  h_KxBxCxD = hidden_BxLxD.reshape(B, L // C, C, D).swapaxes(0, 1)
  t_KxBxC = targets_BxL.reshape(B, L // C, C).swapaxes(0, 1)
  ce_KxBxC, lse_KxBxC = jax.lax.map(lambda a: one(*a), (h_KxBxCxD, t_KxBxC))
  return ce_KxBxC.swapaxes(0, 1).reshape(B, L), lse_KxBxC.swapaxes(0, 1).reshape(B, L)


def ar_loss(params: Any, batch: Batch, *, cfg: model_lib.ModelConfig,
            z_loss: float = 1e-4, num_cells: int = 1, normalizer: jax.Array | None = None
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Causal next-token loss: mean CE over scorable targets + z_loss * mean lse^2.

  With `num_cells` > 1 the rows form that many equal consecutive cells; the loss is the mean over
  cells of each cell's own loss (what separate devices would average). With `normalizer`, the
  sums over these rows divided by it (a part of a mean over more rows: the trainer's step).
  """
  inputs_BxL, seg_BxL, targets_BxL, scorable_BxL = split_batch(batch)
  ce_BxL, lse_BxL = model_token_losses(params, inputs_BxL, seg_BxL, targets_BxL, cfg=cfg,
                                       mode="causal")
  B, L = targets_BxL.shape
  if normalizer is not None:
    w_BxL = scorable_BxL.astype(jnp.float32)
    ce = (w_BxL * ce_BxL).sum() / normalizer
    z = z_loss * (w_BxL * lse_BxL ** 2).sum() / normalizer
    return ce + z, {"ce": ce, "z_loss": z, "num_scored": w_BxL.sum()}
  if B % num_cells:
    raise ValueError(f"{B} rows do not split into num_cells={num_cells} equal cells")
  w_CxN = scorable_BxL.astype(jnp.float32).reshape(num_cells, -1)
  n_C = jnp.maximum(w_CxN.sum(axis=1), 1.0)
  ce = ((w_CxN * ce_BxL.reshape(num_cells, -1)).sum(axis=1) / n_C).mean()
  z = z_loss * ((w_CxN * lse_BxL.reshape(num_cells, -1) ** 2).sum(axis=1) / n_C).mean()
  return ce + z, {"ce": ce, "z_loss": z, "num_scored": w_CxN.sum()}


def mdm_corrupt_from_uniforms(inputs_BxL: jax.Array, scorable_BxL: jax.Array, t_B: jax.Array,
                              u_B: jax.Array, r_BxL: jax.Array
                              ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """MDM corruption from given uniforms (t, u per row; r per position picks the masked set).

  k = clip(max(1, floor(L t + u)), 0, #maskable); the k maskable inputs (id >= NUM_SPECIAL) with
  the smallest r become <mask>. Target i is scored iff scorable and (input i+1 masked or i is the
  last position), with weight 1/p, p = (1 - 1e-4) k / L + 1e-4.
  Returns (masked_inputs_BxL, target_weights_BxL, {'k_B', 'p_B', 'masked_BxL'}).
  """
  _, L = inputs_BxL.shape
  maskable_BxL = inputs_BxL >= NUM_SPECIAL
  n_B = maskable_BxL.sum(axis=1)
  k_B = jnp.maximum(1, jnp.floor(L * t_B.astype(jnp.float32) + u_B).astype(jnp.int32))
  k_B = jnp.minimum(k_B, n_B)
  r_BxL = jnp.where(maskable_BxL, r_BxL, 2.0)  # non-maskable positions rank last
  rank_BxL = jnp.argsort(jnp.argsort(r_BxL, axis=1), axis=1)
  masked_BxL = (rank_BxL < k_B[:, None]) & maskable_BxL
  masked_inputs_BxL = jnp.where(masked_BxL, MASK, inputs_BxL).astype(inputs_BxL.dtype)
  next_masked_BxL = jnp.concatenate([masked_BxL[:, 1:], jnp.ones_like(masked_BxL[:, :1])], axis=1)
  p_B = (1.0 - MIN_RATE) * k_B.astype(jnp.float32) / L + MIN_RATE
  weights_BxL = jnp.where(next_masked_BxL & scorable_BxL, 1.0 / p_B[:, None], 0.0)
  return masked_inputs_BxL, weights_BxL, {"k_B": k_B, "p_B": p_B, "masked_BxL": masked_BxL}


def mdm_corrupt(key: jax.Array, inputs_BxL: jax.Array, scorable_BxL: jax.Array
                ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """`mdm_corrupt_from_uniforms` with t, u ~ U(0,1) per row and r ~ U(0,1) per position.

  `key` is one key, or keys[C] for C equal consecutive cells of rows, each cell drawing its noise
  from its own key exactly as it would alone.
  """
  B, L = inputs_BxL.shape
  keys_C = key.reshape(-1)
  C = keys_C.shape[0]
  if B % C:
    raise ValueError(f"{B} rows do not split into {C} equal cells (one per key)")

  def draw(k):
    kt, ku, kr = jax.random.split(k, 3)
    return (jax.random.uniform(kt, (B // C,)), jax.random.uniform(ku, (B // C,)),
            jax.random.uniform(kr, (B // C, L)))
  t_CxN, u_CxN, r_CxNxL = jax.vmap(draw)(keys_C)
  return mdm_corrupt_from_uniforms(inputs_BxL, scorable_BxL, t_CxN.reshape(B), u_CxN.reshape(B),
                                   r_CxNxL.reshape(B, L))


def mdm_loss_from_corruption(params: Any, batch: Batch, masked_inputs_BxL: jax.Array,
                             weights_BxL: jax.Array, *, cfg: model_lib.ModelConfig,
                             z_loss: float = 1e-4, normalizer: Any = None
                             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """MDM loss for a given corruption: sum(w * ce) / (B L) + z_loss * sum(w * lse^2) / (B L)
  (`normalizer` instead of B L when given)."""
  _, seg_BxL, targets_BxL, _ = split_batch(batch)
  B, L = targets_BxL.shape
  norm = B * L if normalizer is None else normalizer
  ce_BxL, lse_BxL = model_token_losses(params, masked_inputs_BxL, seg_BxL, targets_BxL, cfg=cfg,
                                       mode="bidirectional")
  ce = (weights_BxL * ce_BxL).sum() / norm
  z = z_loss * (weights_BxL * lse_BxL ** 2).sum() / norm
  return ce + z, {"ce": ce, "z_loss": z, "num_scored": (weights_BxL > 0).sum().astype(jnp.float32)}


def mdm_loss(params: Any, batch: Batch, key: jax.Array, *, cfg: model_lib.ModelConfig,
             z_loss: float = 1e-4, normalizer: Any = None
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Masked-diffusion NELBO estimate with noise from `key` (bidirectional attention).

  `key` may be keys[C]: C equal cells of rows with their own noise (see `mdm_corrupt`; one key
  per row: each row's noise its own); the loss, normalised by B*L (or `normalizer`), is then the
  mean of the cells' losses.
  """
  inputs_BxL, _, _, scorable_BxL = split_batch(batch)
  masked_BxL, w_BxL, aux = mdm_corrupt(key, inputs_BxL, scorable_BxL)
  loss, metrics = mdm_loss_from_corruption(params, batch, masked_BxL, w_BxL, cfg=cfg,
                                           z_loss=z_loss, normalizer=normalizer)
  metrics["mask_rate"] = aux["masked_BxL"].mean()
  return loss, metrics


# The authors' "masked" validation loss (their SpanMaskingStrategy + ValidationMaskedDataset,
# args mask_p_min, mask_random_p, mask_keep_p, max_span_length).
SPAN_RATE = 0.1
SPAN_MAX_LEN = 3
SPAN_RANDOM_P = 0.1
SPAN_KEEP_P = 0.1


def span_noise(keys_B: jax.Array, length: int, vocab_size: int) -> dict[str, jax.Array]:
  """The span masking's random draws for rows of `length` (= L+1) tokens, one key per row.

  {'lengths' int 1..SPAN_MAX_LEN, 'ratio' U(0,1), 'action' U(0,1), 'round_u' U(0,1),
   'random' int in [NUM_SPECIAL, vocab_size)}, each [B, length]: draw j of a row serves the
  span or segment that starts its sequence at position j (see `span_mask_corrupt_from_noise`).
  """
  def draw(key):
    kl, kr, ka, ku, kt = jax.random.split(key, 5)
    return {"lengths": jax.random.randint(kl, (length,), 1, SPAN_MAX_LEN + 1),
            "ratio": jax.random.uniform(kr, (length,)),
            "action": jax.random.uniform(ka, (length,)),
            "round_u": jax.random.uniform(ku, (length,)),
            "random": jax.random.randint(kt, (length,), NUM_SPECIAL, vocab_size)}
  return jax.vmap(draw)(keys_B)


def _span_mask_row(tok_N, seg_N, noise, rate, random_p, keep_p):
  """One row of `span_mask_corrupt_from_noise`: (corrupted_N, masked_N, span_N)."""
  (N,) = tok_N.shape
  pos_N = jnp.arange(N)
  start_N = jnp.concatenate([jnp.ones((1,), bool), seg_N[1:] != seg_N[:-1]])
  s_N = jax.lax.cummax(jnp.where(start_N, pos_N, 0))  # start of each position's segment
  # Spans tile each segment from its start; the segment starting at s takes its lengths from
  # draws s, s+1, ... (each span >= 1 long, so the segments' draws never overlap). Position
  # i's span is the draw index s + m with G[s+m-1] <= i - s + G[s-1] < G[s+m], G = cumsum.
  G_N = jnp.cumsum(noise["lengths"])
  before_N = jnp.where(s_N > 0, G_N[jnp.maximum(s_N - 1, 0)], 0)
  span_N = jnp.searchsorted(G_N, pos_N - s_N + before_N, side="right")
  maskable_N = tok_N >= NUM_SPECIAL
  ratio_N = jnp.where(maskable_N, noise["ratio"][span_N], 2.0)  # 2 > every ratio: never picked
  # k = max(1, floor(rate n + u)) per segment (n its tokens, specials included), at most the
  # segment's maskable tokens; masked: every position whose span ratio is <= the k-th smallest
  # of the segment (so whole spans, the last one may overshoot k).
  n_N = jnp.zeros((N,), jnp.int32).at[s_N].add(1)[s_N]
  m_N = jnp.zeros((N,), jnp.int32).at[s_N].add(maskable_N.astype(jnp.int32))[s_N]
  k_N = jnp.maximum(1, jnp.floor(rate * n_N + noise["round_u"][s_N]).astype(jnp.int32))
  k_N = jnp.minimum(k_N, m_N)
  sorted_N = ratio_N[jnp.lexsort((ratio_N, s_N))]  # by segment, then ratio: segment s at [s, s+n)
  thresh_N = sorted_N[jnp.clip(s_N + k_N - 1, 0, N - 1)]
  masked_N = maskable_N & (k_N > 0) & (ratio_N <= thresh_N)
  a_N = noise["action"][span_N]
  repl_N = jnp.where(a_N < random_p, noise["random"],
                     jnp.where(a_N > random_p + keep_p, MASK, tok_N))
  return jnp.where(masked_N, repl_N, tok_N).astype(tok_N.dtype), masked_N, span_N


def span_mask_corrupt_from_noise(tokens_BxN: jax.Array, seg_BxN: jax.Array,
                                 noise: dict[str, jax.Array], *, rate: float = SPAN_RATE,
                                 random_p: float = SPAN_RANDOM_P, keep_p: float = SPAN_KEEP_P
                                 ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """The authors' span masking of rows of N = L+1 tokens, from given draws (`span_noise`).

  Per segment (document piece) of n tokens, as their SpanMaskingStrategy and apply_mask: spans
  of 1-3 tokens (uniform) tile it from its start; each span has a ratio r ~ U(0,1) (infinite for
  special tokens, id < NUM_SPECIAL) and an action a ~ U(0,1); k = max(1, floor(rate n + U)), and
  every position whose ratio is <= the segment's k-th smallest is masked (whole spans, ~rate of
  the tokens in many short spans). A masked position becomes a random non-special token if
  a < random_p, stays itself if a <= random_p + keep_p, else `<mask>` (80/10/10). Target i
  (token i+1) is scored iff token i+1 is masked; the last token can be masked (its target is
  scored; it is no input). Padding (segment 0) holds only special tokens: never masked.

  Returns (corrupted inputs_BxL, scored_BxL, {'masked_BxN', 'span_BxN', 'corrupted_BxN'}).
  """
  scorable_BxL = (tokens_BxN[:, 1:] != BOS) & (seg_BxN[:, 1:] != 0)
  row = lambda t, s, n: _span_mask_row(t, s, n, rate, random_p, keep_p)
  corrupted_BxN, masked_BxN, span_BxN = jax.vmap(row)(tokens_BxN, seg_BxN, noise)
  aux = {"masked_BxN": masked_BxN, "span_BxN": span_BxN, "corrupted_BxN": corrupted_BxN}
  return corrupted_BxN[:, :-1], masked_BxN[:, 1:] & scorable_BxL, aux


def span_mask_corrupt(tokens_BxN: jax.Array, seg_BxN: jax.Array, keys_B: jax.Array, *,
                      vocab_size: int, rate: float = SPAN_RATE
                      ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """`span_mask_corrupt_from_noise` with each row's draws from its own key (`span_noise`).

  Differs from the authors' sampling in the random draws only, not in their distribution:
  their torch global RNG draws piece by piece (span lengths, ratios, actions, the rounding
  uniform, random tokens), here each row's draws come from its key, the draws of a segment
  from the row's draws at the segment's positions. Two corner cases differ: a piece with fewer
  non-special tokens than k is masked entirely by theirs, special tokens included (an infinite
  threshold), here only its non-special tokens are; and floor(rate n + U) is taken in float32
  (theirs in float64). Random tokens are drawn from [NUM_SPECIAL, vocab_size) with the model's
  vocabulary (theirs: the tokenizer's, the same size).
  """
  noise = span_noise(keys_B, tokens_BxN.shape[1], vocab_size)
  return span_mask_corrupt_from_noise(tokens_BxN, seg_BxN, noise, rate=rate)


def span_mask_loss(params: Any, batch: Batch, key: jax.Array, *, cfg: model_lib.ModelConfig,
                   rate: float = SPAN_RATE) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The authors' "masked" validation loss: mean CE over the targets of the masked tokens
  (`span_mask_corrupt`, row b's draws from split(key, B)[b]); bidirectional attention.

  Not the diffusion NELBO (DESIGN.md §3); comparable with the authors' reported numbers.
  """
  split_batch(batch)  # checks the layout
  tokens_BxN, seg_BxN = batch["tokens"], batch["segment_ids"]
  B = tokens_BxN.shape[0]
  inputs_BxL, scored_BxL, _ = span_mask_corrupt(tokens_BxN, seg_BxN, jax.random.split(key, B),
                                                vocab_size=cfg.vocab_size, rate=rate)
  ce_BxL, _ = model_token_losses(params, inputs_BxL, seg_BxN[:, :-1], tokens_BxN[:, 1:], cfg=cfg,
                                 mode="bidirectional")
  w_BxL = scored_BxL.astype(jnp.float32)
  return (w_BxL * ce_BxL).sum() / jnp.maximum(w_BxL.sum(), 1.0), {"num_scored": w_BxL.sum()}


def dual_loss(params: Any, batch: Batch, key: jax.Array, *, cfg: model_lib.ModelConfig,
              lam: float, ar_loss_scale: float = 1.0, z_loss: float = 1e-4
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Reference dual loss on the same rows: lam * ar_loss_scale * L_AR + (1 - lam) * L_MDM.

  lam = 1 and lam = 0 compute only one objective.
  """
  if not 0.0 <= lam <= 1.0:
    raise ValueError(f"lam (the AR share) must be in [0, 1], got {lam!r}")
  if not ar_loss_scale >= 0.0:
    raise ValueError(f"ar_loss_scale must be >= 0, got {ar_loss_scale!r}")
  loss = jnp.zeros((), jnp.float32)
  metrics = {}
  if lam > 0:
    ar, _ = ar_loss(params, batch, cfg=cfg, z_loss=z_loss)
    loss = loss + lam * ar_loss_scale * ar
    metrics["ar_loss"] = ar
  if lam < 1:
    mdm, _ = mdm_loss(params, batch, key, cfg=cfg, z_loss=z_loss)
    loss = loss + (1.0 - lam) * mdm
    metrics["mdm_loss"] = mdm
  metrics["loss"] = loss
  return loss, metrics

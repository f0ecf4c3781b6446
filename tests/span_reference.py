"""The authors' span-mask validation corruption, ported to NumPy from their code (not from ours).

ltgoslo/dual-language-models, dual_language_models/pretraining/dataset.py:
SpanMaskingStrategy.__call__ and ValidationMaskedDataset.apply_mask (mask_p_min 0.1,
mask_random_p 0.1, mask_keep_p 0.1, max_span_length 3), applied to each document piece of a row
(their `_getitem` masks every piece on its own), then the MNTP shift (inputs = row[:-1],
target i scored iff token i+1 masked). One deliberate change, as in dualjax: k is capped at the
piece's non-special tokens (theirs: an infinite threshold then masks the whole piece).
"""

import numpy as np

from dualjax.special_tokens import BOS, MASK, NUM_SPECIAL, PAD

RATE, RANDOM_P, KEEP_P, MAX_SPAN = 0.1, 0.1, 0.1, 3


def authors_piece(tokens, span_lengths, r1, r2, u, random_tokens):
  """One piece of n tokens from its draws (span lengths, per-span r1/r2, the rounding uniform u,
  per-position random tokens): (corrupted tokens, mask, span index of each position)."""
  n = tokens.shape[0]
  span_lengths = np.asarray(span_lengths[:n])
  cumsum = np.cumsum(span_lengths)
  indices = np.zeros(cumsum[-1], np.int64)
  indices[cumsum - span_lengths] = np.arange(n)
  indices = np.maximum.accumulate(indices)[:n]           # torch.cummax
  max_index = indices[-1]
  mask_ratios = np.asarray(r1[:max_index + 1], np.float64)[indices]
  mask_ratios[tokens < NUM_SPECIAL] = np.inf
  replacement_p = np.asarray(r2[:max_index + 1], np.float64)[indices]
  replacement = tokens.copy()
  random_mask = replacement_p < RANDOM_P
  replacement[random_mask] = np.asarray(random_tokens[:n])[random_mask]
  replacement[replacement_p > RANDOM_P + KEEP_P] = MASK
  k = max(1, int(n * RATE + u))
  k = min(k, int((tokens >= NUM_SPECIAL).sum()))
  if k == 0:
    mask = np.zeros(n, bool)
  else:
    mask_p = np.sort(mask_ratios)[:k].max()              # torch.topk(largest=False).values.max()
    mask = mask_ratios <= mask_p
  return np.where(mask, replacement, tokens), mask, indices


def pieces(seg):
  """(start, end) of each run of equal segment ids."""
  cut = np.flatnonzero(np.diff(seg)) + 1
  bounds = np.concatenate([[0], cut, [len(seg)]])
  return list(zip(bounds[:-1], bounds[1:]))


def corrupt_rows(tokens, seg, draw):
  """Rows [B, N] piece by piece; `draw(b, start, n)` gives a piece's draws
  (span_lengths, r1, r2, u, random_tokens). Returns (inputs [B, N-1], scored [B, N-1],
  masked [B, N], span lengths of the masked spans, actions {'mask','random','keep'} counts)."""
  B, N = tokens.shape
  out, masked = tokens.copy(), np.zeros((B, N), bool)
  span_lens, kinds = [], {"mask": 0, "random": 0, "keep": 0}
  for b in range(B):
    for s, e in pieces(seg[b]):
      if seg[b, s] == 0:
        continue  # padding: added after masking by the authors
      lengths, r1, r2, u, rnd = draw(b, s, e - s)
      o, m, idx = authors_piece(tokens[b, s:e], lengths, r1, r2, u, rnd)
      out[b, s:e], masked[b, s:e] = o, m
      for j in np.unique(idx[m]):
        span_lens.append(int(m[idx == j].sum()))
        p = r2[j]
        kinds["random" if p < RANDOM_P else "mask" if p > RANDOM_P + KEEP_P else "keep"] += 1
  scorable = (tokens[:, 1:] != BOS) & (seg[:, 1:] != 0)
  return out[:, :-1], masked[:, 1:] & scorable, masked, np.array(span_lens), kinds


def random_rows(rng, B, N, vocab_size, pad_rows=0.3):
  """Packed-looking rows: several documents (each from <s>; the first may be a continuation),
  a few special tokens inside, padding (segment 0) at the end of some rows."""
  tokens = rng.integers(NUM_SPECIAL, vocab_size, (B, N)).astype(np.int32)
  seg = np.zeros((B, N), np.int32)
  for b in range(B):
    end = N - (int(rng.integers(1, N // 3)) if rng.random() < pad_rows else 0)
    pos, sid = 0, 1
    if rng.random() < 0.5:
      tokens[b, 0] = BOS
    while pos < end:
      n = min(int(rng.integers(2, N)), end - pos)
      if pos > 0:
        tokens[b, pos] = BOS
      seg[b, pos:pos + n] = sid
      pos, sid = pos + n, sid + 1
    special = (rng.random(N) < 0.03) & (np.arange(N) < end) & (tokens[b] != BOS)
    tokens[b, special] = rng.integers(2, NUM_SPECIAL, special.sum())
    tokens[b, end:] = PAD
  return tokens, seg

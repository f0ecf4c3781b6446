"""Log-likelihood of completions in four scoring modes, packed and batched (DESIGN.md §7).

A request is (context ids, completion ids); its sequence is `<s> context completion`, with c
context and n completion tokens (c may be 0: BLiMP); `<s>` and `<mask>` are the tokenizer's ids
(`Scorer(bos_id=, mask_id=)`; default dualjax's own 1 and 4). The hidden state at position p
predicts token p+1 in every mode (MNTP). Modes, each a sum over the completion tokens c_0..c_{n-1}:

- `ar`: causal attention over `<s> ctx c_<n-1`; Σ_i log p(c_i | <s> ctx c_<i).
- `prefix`: the same inputs; `<s>`+context attend each other bidirectionally, the completion
  causally (per-token bidirectional flags: i may attend j iff j ≤ i or both are in the prefix).
- `pll<k>` (semi-autoregressive PLL): for each i one sequence `<s> ctx c_<i` + m `<mask>`,
  m = min(k, n − i) (the masks never run past the completion's end), bidirectional; c_i is read
  at the position just before the first mask. With k ≥ n − i all remaining tokens are masked.
- `mc` (masked-diffusion ELBO of the completion given the context, Appendix D / Eq. 4):
    log p(c | ctx) ≥ ∫₀¹ (1/t) E_{m ~ Bernoulli(t)^n} [Σ_{i ∈ m} log p(c_i | ctx, c_{¬m})] dt.
  The t-integral is replaced by the midpoint grid t_g = (g + ½)/G, g = 0..G−1; at each t_g one
  mask m_g is drawn (each completion token masked independently with probability t_g; context and
  `<s>` never), so the estimate is (1/G) Σ_g (1/t_g) Σ_{i ∈ m_g} log p(c_i | …), with fully
  bidirectional attention. It is unbiased for the midpoint rule of the exact ELBO and converges to
  it as G grows. Grid points whose mask is empty contribute 0 and are not run. Masks are drawn
  from a generator seeded by (seed, CRC32 of the request's ids), so a request's estimate does not
  depend on what else is scored with it.

Every scoring sequence is one document (segment) of a packed row (see packing.py); one jitted
function per attention kind returns log p(target) at every row position, gathered on device
(B×L floats come back, never B×L×V logits). Rows are sharded over all devices of a mesh.
"""

import dataclasses
import re
import zlib
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from dualjax import mesh as mesh_lib
from dualjax import model as model_lib
from dualjax import objectives
from dualjax import sharding
from dualjax.evaluation import packing
from dualjax.special_tokens import BOS, MASK


@dataclasses.dataclass(frozen=True)
class Request:
  """A scoring request: context and completion token ids (no specials)."""
  ctx: tuple[int, ...]
  comp: tuple[int, ...]

  def seq(self, bos_id: int = BOS) -> np.ndarray:
    """`<s> ctx comp` as int32 ids."""
    return np.array((bos_id,) + self.ctx + self.comp, np.int32)


def special_ids(tokenizer: Any) -> tuple[int, int]:
  """(bos_id, mask_id) of `tokenizer` (dualjax's own BOS/MASK for one without them)."""
  return int(getattr(tokenizer, "bos_id", BOS)), int(getattr(tokenizer, "mask_id", MASK))


# ----------------------------------------------------------------------------------------------
# Joint tokenisation split at the character boundary.


def encode_with_char_spans(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
  """Token ids of `text` and each token's [begin, end) character span
  (`Tokenizer.encode_with_offsets`); TypeError for a tokenizer without offsets."""
  if not hasattr(tokenizer, "encode_with_offsets"):
    raise TypeError("tokenizer has no encode_with_offsets")
  ids, spans = tokenizer.encode_with_offsets(text)
  return list(ids), [tuple(x) for x in spans]


def split_encode(tokenizer: Any, context: str, completion: str) -> Request:
  """Encodes context+completion jointly and splits the ids at the character boundary.

  A token belongs to the completion iff its span reaches past the boundary; zero-width pieces
  (SentencePiece's dummy prefix, the leading bytes of a byte-fallback character) go with the
  token that follows them. Without offsets, falls back to lm-eval's rule: the completion is what
  follows the tokens of the context encoded alone (correct whenever those are a prefix of the
  joint encoding, as with whitespace-prefixed SentencePiece pieces).
  """
  if not context:
    return Request((), tuple(tokenizer.encode(completion)))
  text = context + completion
  try:
    ids, spans = encode_with_char_spans(tokenizer, text)
  except TypeError:
    ids = list(tokenizer.encode(text))
    ctx = list(tokenizer.encode(context))
    k = 0
    while k < min(len(ctx), len(ids)) and ctx[k] == ids[k]:
      k += 1
    return Request(tuple(ids[:k]), tuple(ids[k:]))
  boundary = len(context)
  split = next((j for j, (_, e) in enumerate(spans) if e > boundary), len(ids))
  while split > 0 and spans[split - 1][0] == spans[split - 1][1] and spans[split - 1][0] >= boundary:
    split -= 1
  return Request(tuple(ids[:split]), tuple(ids[split:]))


def fit(req: Request, max_len: int) -> Request:
  """Drops the oldest context tokens (then the completion's tail) so `<s>`+ctx+comp ≤ max_len."""
  if 1 + len(req.ctx) + len(req.comp) <= max_len:
    return req
  comp = req.comp[:max_len - 1]
  keep = max_len - 1 - len(comp)
  return Request(req.ctx[len(req.ctx) - keep:] if keep else (), comp)


# ----------------------------------------------------------------------------------------------
# Modes: scoring units (one packed document each) and how to write them into a row.


def parse_mode(mode: str) -> tuple[str, int]:
  """'ar' | 'prefix' | 'mc' | 'pll<k>' -> (kind, k)."""
  if mode in ("ar", "prefix", "mc"):
    return mode, 0
  m = re.fullmatch(r"pll(\d+)", mode)
  if m and int(m.group(1)) >= 1:
    return "pll", int(m.group(1))
  raise ValueError(f"unknown scoring mode '{mode}' (ar, prefix, pll<k> with k ≥ 1, mc)")


def mc_grid(grid: int) -> np.ndarray:
  """The midpoint grid t_g = (g + ½)/G."""
  return (np.arange(grid) + 0.5) / grid


def mc_masks(req: Request, grid: int, seed: int) -> np.ndarray:
  """bool[G, n]: completion token i is masked at grid point g (probability t_g, independent)."""
  crc = zlib.crc32(np.array(req.ctx + (-1,) + req.comp, np.int64).tobytes())
  u = np.random.default_rng([seed, crc]).random((grid, len(req.comp)))
  return u < mc_grid(grid)[:, None]


@dataclasses.dataclass
class _Units:
  req: np.ndarray  # int64[U]
  aux: np.ndarray  # int64[U]: PLL token index i / MC grid index g / 0
  length: np.ndarray  # int64[U]


def _units(kind: str, k: int, reqs: Sequence[Request], masks: list[np.ndarray] | None) -> _Units:
  c = np.array([len(r.ctx) for r in reqs], np.int64)
  n = np.array([len(r.comp) for r in reqs], np.int64)
  if kind in ("ar", "prefix"):
    sel = np.flatnonzero(n > 0)
    return _Units(sel, np.zeros_like(sel), c[sel] + n[sel])
  if kind == "pll":
    req = np.repeat(np.arange(len(reqs)), n)
    i = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    return _Units(req, i, 1 + c[req] + i + np.minimum(k, n[req] - i))
  req_l, g_l = [], []
  for r, m in enumerate(masks):
    g = np.flatnonzero(m.any(axis=1))
    req_l.append(np.full(len(g), r))
    g_l.append(g)
  req = np.concatenate(req_l) if req_l else np.zeros(0, np.int64)
  aux = np.concatenate(g_l) if g_l else np.zeros(0, np.int64)
  return _Units(req, aux, 1 + c[req] + n[req])


def _fill(kind: str, k: int, req: Request, seq: np.ndarray, aux: int, tok: np.ndarray,
          bidir: np.ndarray, tgt: np.ndarray, off: int, masks: np.ndarray | None,
          t: np.ndarray | None, mask_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Writes one unit at `off` of a row; returns (scored row positions, weights)."""
  c, n = len(req.ctx), len(req.comp)
  if kind in ("ar", "prefix"):
    s = c + n
    tok[off:off + s] = seq[:-1]
    tgt[off:off + s] = seq[1:]
    if kind == "prefix":
      bidir[off:off + c + 1] = True
    return off + c + np.arange(n), np.ones(n)
  if kind == "pll":
    i = aux
    tok[off:off + 1 + c + i] = seq[:1 + c + i]
    tok[off + 1 + c + i:off + 1 + c + i + min(k, n - i)] = mask_id
    tgt[off + c + i] = seq[1 + c + i]
    return np.array([off + c + i]), np.ones(1)
  g = aux
  j = np.flatnonzero(masks[g])
  s = 1 + c + n
  tok[off:off + s] = seq
  tok[off + 1 + c + j] = mask_id
  tgt[off + c + j] = seq[1 + c + j]
  return off + c + j, np.full(len(j), 1.0 / (len(t) * t[g]))


# ----------------------------------------------------------------------------------------------
# The batched scorer.

ApplyFn = Callable[..., jax.Array]


def attention_kind(kind: str) -> str:
  """How a mode's rows are run: 'causal', 'bidirectional', or 'flags' (per-token bidir)."""
  return {"ar": "causal", "prefix": "flags", "pll": "bidirectional", "mc": "bidirectional"}[kind]


def logprob_fn(cfg: Any, attn: str, apply_fn: ApplyFn | None = None, mesh: Mesh | None = None
               ) -> Callable[..., jax.Array]:
  """`fn(params, tokens_BxL, seg_BxL, bidir_BxL, tgt_BxL) -> log p(target) [B, L]` for rows of
  one attention kind ('causal', 'bidirectional' or 'flags'); what a Scorer jits. `mesh`: the
  mesh the rows are sharded over (per-device attention kernels run on it)."""
  apply_fn = apply_fn or model_lib.apply

  def score(params, tokens_BxL, seg_BxL, bidir_BxL, tgt_BxL):
    with sharding.activation_rules(mesh, ()):
      if attn == "flags":
        logits_BxLxV = apply_fn(params, tokens_BxL, seg_BxL, cfg=cfg, mode="causal",
                                bidir_BxL=bidir_BxL)
      else:
        logits_BxLxV = apply_fn(params, tokens_BxL, seg_BxL, cfg=cfg, mode=attn)
    ce_BxL, _ = objectives.token_losses(logits_BxLxV, tgt_BxL)
    return -ce_BxL
  return score


def rows_per_batch(batch_tokens: int, row_len: int, num_devices: int) -> int:
  """Rows per scoring call: batch_tokens // row_len, rounded down to a multiple of the devices
  (at least one row per device)."""
  return max(1, batch_tokens // row_len // num_devices) * num_devices


class Scorer:
  """Scores requests in any mode with fixed-shape packed batches, rows sharded over a mesh.

  Args:
    params: model parameters (kept as they are if already on `mesh`, else replicated over it);
      `with_params` swaps them without recompiling.
    model_cfg: the model's ModelConfig (needs `max_seq_len`).
    mesh: the mesh whose devices all shard the rows (default: every device, `mesh.make_mesh`),
      e.g. the training mesh.
    row_len: row length for units that fit (longer ones get power-of-two buckets).
    batch_tokens: tokens per device call (rows per batch = batch_tokens // row length, rounded
      down to a multiple of the device count, at least one row per device).
    apply_fn: `apply(params, tokens, segment_ids, *, cfg, mode, bidir_BxL=None) -> logits`
      (default dualjax.model.apply).
    bos_id, mask_id: the tokenizer's `<s>` and `<mask>` ids (`special_ids(tokenizer)`;
      `with_special_ids` changes them without recompiling).
  """

  def __init__(self, params: Any, model_cfg: Any, *, mesh: Mesh | None = None,
               row_len: int = 512, batch_tokens: int = 16384,
               apply_fn: ApplyFn | None = None, bos_id: int = BOS, mask_id: int = MASK):
    self.cfg = model_cfg
    self.max_len = int(model_cfg.max_seq_len)
    self.row_len = min(row_len, self.max_len)
    self.batch_tokens = batch_tokens
    if mesh is None:
      mesh = mesh_lib.make_mesh(-1, 1, 1)
    elif any(t != AxisType.Auto for t in mesh.axis_types):
      mesh = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * mesh.devices.ndim)
    self.mesh = mesh
    self.n_dev = self.mesh.size
    self.data_sharding = NamedSharding(self.mesh, P(tuple(self.mesh.axis_names)))
    self.apply_fn = apply_fn or model_lib.apply
    self._fns: dict[str, Any] = {}
    self.stats = {"units": 0, "unit_tokens": 0, "row_tokens": 0, "calls": 0}
    self.with_params(params)
    self.with_special_ids(bos_id, mask_id)

  def with_special_ids(self, bos_id: int, mask_id: int) -> "Scorer":
    """Builds sequences with these `<s>` and `<mask>` ids from now on."""
    vocab = getattr(self.cfg, "vocab_size", None)
    for name, i in (("bos_id", bos_id), ("mask_id", mask_id)):
      if int(i) < 0 or (vocab is not None and int(i) >= vocab):
        raise ValueError(f"{name}={i} is outside the model's vocabulary of {vocab}")
    self.bos_id, self.mask_id = int(bos_id), int(mask_id)
    return self

  def with_params(self, params: Any) -> "Scorer":
    """Scores with `params` from now on (the compiled functions are kept)."""
    on_mesh = all(isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding)
                  and x.sharding.mesh == self.mesh for x in jax.tree.leaves(params))
    self.params = params if on_mesh else jax.device_put(params, NamedSharding(self.mesh, P()))
    return self

  def _fn(self, attn: str) -> Any:
    if attn not in self._fns:
      d = self.data_sharding
      self._fns[attn] = jax.jit(logprob_fn(self.cfg, attn, self.apply_fn, self.mesh),
                                in_shardings=(None, d, d, d, d), out_shardings=d)
    return self._fns[attn]

  def rows_per_batch(self, row_len: int) -> int:
    return rows_per_batch(self.batch_tokens, row_len, self.n_dev)

  def score(self, requests: Sequence[Request], mode: str, *, mc_grid_size: int = 32,
            mc_seed: int = 0) -> np.ndarray:
    """float64[R]: each request's log-likelihood estimate of its completion in `mode`."""
    return self._score(requests, mode, mc_grid_size, mc_seed, per_token=False)[0]

  def score_tokens(self, requests: Sequence[Request], mode: str, *, mc_grid_size: int = 32,
                   mc_seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """`score` and, per request, float64[n] per completion token: its log-probability (ar,
    prefix, pll<k>) or its share of the estimate (mc: Σ_g w_g·log p over the grid points where
    it is masked); each request's values sum to its score. n counts the completion tokens kept
    by `fit`. Costs one index array per batch more than `score`."""
    return self._score(requests, mode, mc_grid_size, mc_seed, per_token=True)

  def _score(self, requests: Sequence[Request], mode: str, mc_grid_size: int, mc_seed: int,
             per_token: bool) -> tuple[np.ndarray, list[np.ndarray] | None]:
    kind, k = parse_mode(mode)
    reqs = [fit(r, self.max_len) for r in requests]
    masks = [mc_masks(r, mc_grid_size, mc_seed) for r in reqs] if kind == "mc" else None
    t = mc_grid(mc_grid_size) if kind == "mc" else None
    units = _units(kind, k, reqs, masks)
    pk = packing.pack(units.length, self.row_len, self.max_len)
    seqs: dict[int, np.ndarray] = {}
    scores = np.zeros(len(reqs), np.float64)
    if per_token:  # Completion token i of request r is entry first[r] + i.
      n = np.array([len(r.comp) for r in reqs], np.int64)
      first = np.cumsum(n) - n
      tokens = np.zeros(int(n.sum()), np.float64)
    fn = self._fn(attention_kind(kind))
    self.stats["units"] += len(units.length)
    self.stats["unit_tokens"] += int(units.length.sum())
    pending = None
    for bucket in sorted(pk.num_rows):
      rows = pk.rows(bucket)
      nb = self.rows_per_batch(bucket)
      for b0 in range(0, len(rows), nb):
        tok = np.zeros((nb, bucket), np.int32)
        seg = np.zeros((nb, bucket), np.int32)
        bidir = np.zeros((nb, bucket), bool)
        tgt = np.zeros((nb, bucket), np.int32)
        flat, req_ids, weights, tok_ids = [], [], [], []
        for b, row in enumerate(rows[b0:b0 + nb]):
          for s, u in enumerate(row, 1):
            r = int(units.req[u])
            if r not in seqs:
              seqs[r] = reqs[r].seq(self.bos_id)
            off, length = int(pk.offset[u]), int(units.length[u])
            seg[b, off:off + length] = s
            pos, w = _fill(kind, k, reqs[r], seqs[r], int(units.aux[u]), tok[b], bidir[b],
                           tgt[b], off, None if masks is None else masks[r], t,
                           self.mask_id)
            flat.append(b * bucket + pos)
            req_ids.append(np.full(len(pos), r))
            weights.append(w)
            if per_token:  # Every mode scores completion token i at row position off + c + i.
              tok_ids.append(first[r] + pos - (off + len(reqs[r].ctx)))
        out = fn(self.params, *(jax.device_put(a, self.data_sharding)
                                for a in (tok, seg, bidir, tgt)))
        self.stats["row_tokens"] += nb * bucket
        self.stats["calls"] += 1
        if pending is not None:
          self._consume(scores, *pending)
        pending = (out, np.concatenate(flat), np.concatenate(req_ids), np.concatenate(weights),
                   (tokens, np.concatenate(tok_ids)) if per_token else None)
    if pending is not None:
      self._consume(scores, *pending)
    if not per_token:
      return scores, None
    return scores, [tokens[f:f + m] for f, m in zip(first, n)]

  @staticmethod
  def _consume(scores: np.ndarray, out: jax.Array, flat: np.ndarray, req_ids: np.ndarray,
               weights: np.ndarray, tokens: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    wlogp = weights * np.asarray(out, np.float64).reshape(-1)[flat]
    scores += np.bincount(req_ids, weights=wlogp, minlength=len(scores))
    if tokens is not None:
      per_token, tok_ids = tokens
      np.add.at(per_token, tok_ids, wlogp)

"""Packing many short scoring sequences into a few fixed-shape rows (DESIGN.md §7).

Each scoring sequence ("unit") becomes one document of a row (its own segment id), so attention
never crosses units. Units no longer than `row_len` go into rows of `row_len` tokens; longer ones
into rows of the next power of two (a few buckets, hence a few compiled shapes). Inside a bucket
rows are filled greedily with the longest unit that still fits (best-fit decreasing over a
length histogram, many equal lengths placed at once), which leaves almost no padding.
"""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Packing:
  """Where every unit goes: `bucket_len[u]`, `row[u]` (within its bucket), `offset[u]`."""
  bucket_len: np.ndarray  # int64[U]
  row: np.ndarray  # int64[U]
  offset: np.ndarray  # int64[U]
  num_rows: dict[int, int]  # bucket length -> number of rows

  def rows(self, bucket: int) -> list[np.ndarray]:
    """Unit indices of every row of `bucket`, in row order."""
    sel = np.flatnonzero(self.bucket_len == bucket)
    order = sel[np.lexsort((self.offset[sel], self.row[sel]))]
    bounds = np.searchsorted(self.row[order], np.arange(self.num_rows[bucket] + 1))
    return [order[bounds[i]:bounds[i + 1]] for i in range(self.num_rows[bucket])]


def bucket_lengths(lengths: np.ndarray, row_len: int, max_len: int) -> np.ndarray:
  """Row length for each unit: `row_len`, or the next power of two (at most `max_len`)."""
  lengths = np.asarray(lengths, np.int64)
  if lengths.size and lengths.max() > max_len:
    raise ValueError(f"a scoring sequence of {lengths.max()} tokens exceeds max_len={max_len}")
  pow2 = 2 ** np.ceil(np.log2(np.maximum(lengths, 1))).astype(np.int64)
  return np.where(lengths <= row_len, row_len, np.minimum(pow2, max_len))


def _pack_bucket(idx: np.ndarray, lengths: np.ndarray, cap: int, row: np.ndarray,
                 offset: np.ndarray) -> int:
  """Packs units `idx` (lengths ≤ cap) into rows of `cap`; writes row/offset; returns #rows."""
  lens = lengths[idx]
  order = np.argsort(-lens, kind="stable")
  idx, lens = idx[order], lens[order]
  count = np.bincount(lens, minlength=cap + 1)
  start = np.zeros(cap + 2, np.int64)  # Units of length l are idx[start[l]:start[l]+count[l]],
  for l in range(cap, -1, -1):  # in descending-length order.
    start[l] = start[l + 1] + (count[l + 1] if l + 1 <= cap else 0)
  taken = np.zeros(cap + 1, np.int64)
  left = int(count.sum())
  n_rows = 0
  while left:
    room, off = cap, 0
    while room:
      fits = np.flatnonzero(count[1:room + 1]) + 1
      if not fits.size:
        break
      l = int(fits[-1])
      m = int(min(count[l], room // l))
      units = idx[start[l] + taken[l]:start[l] + taken[l] + m]
      row[units] = n_rows
      offset[units] = off + l * np.arange(m)
      taken[l] += m
      count[l] -= m
      room -= m * l
      off += m * l
      left -= m
    n_rows += 1
  return n_rows


def pack(lengths: np.ndarray, row_len: int, max_len: int) -> Packing:
  """Packs units of the given lengths (all ≥ 1) into bucketed rows."""
  lengths = np.asarray(lengths, np.int64)
  if lengths.size and lengths.min() < 1:
    raise ValueError("every scoring sequence needs at least one token")
  buckets = bucket_lengths(lengths, row_len, max_len)
  row = np.zeros(len(lengths), np.int64)
  offset = np.zeros(len(lengths), np.int64)
  num_rows = {}
  for b in np.unique(buckets):
    num_rows[int(b)] = _pack_bucket(np.flatnonzero(buckets == b), lengths, int(b), row, offset)
  return Packing(buckets, row, offset, num_rows)

"""Grain input pipeline: unique subset, repetition, shuffle, packing, host sharding (DESIGN.md §6).

Semantics for (token budget D, repetitions r, seed):
- One fixed order of all training documents is drawn once from the seed; the unique subset is
  its shortest prefix holding >= ceil(D / r) tokens (so subsets are nested across r and never
  change between epochs, hosts or a resume).
- The stream is r epochs back to back; epoch e is a fresh shuffle of the subset seeded by
  (seed, e). Each epoch holds every subset token exactly once.
- The stream is cut into rows of seq_len + 1 tokens (documents are split across rows, and a row
  may hold the end of one epoch and the start of the next); only the very last row of the stream
  is padded (PAD, segment 0). Segment ids number the document pieces of a row from 1.
- Global batch i is rows [i*G, (i+1)*G); process p reads only its rows
  [i*G + p*B, i*G + (p+1)*B), B = G / process_count (host sharding after shuffle + repeat).
  A last global batch with fewer than G rows of the stream is filled with padding rows.
Permutations come from a splitmix64 hash argsort (exact and stable across numpy versions).

The Grain structure is a random-access `MapDataset` of per-host batches (element i is computed
from the token span of this host's rows, vectorised with NumPy, reading documents from the
ArrayRecord shards) followed by `to_iter_dataset` with thread prefetch; the output does not
depend on the number of threads. The iterator's `get_state()` is `{'next_index': i}` (JSON) and
works with `grain.checkpoint.CheckpointSave/CheckpointRestore` (Orbax).
"""

import dataclasses
import os
import pathlib
import threading
from typing import Any

import grain
import numpy as np

from dualjax import prepare as prepare_lib
from dualjax.errors import ConfigError
from dualjax.special_tokens import PAD


class PipelineError(ValueError):
  """A pipeline setting that cannot work; the message is one line naming the field."""


DATA_ERRORS = prepare_lib.DATA_ERRORS + (PipelineError,)

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(x: np.ndarray) -> np.ndarray:
  """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
  x = np.asarray(x, np.uint64)
  with np.errstate(over="ignore"):
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def permutation(n: int, *key: int) -> np.ndarray:
  """A permutation of range(n) determined by the integers `key` (version-stable)."""
  h = np.uint64(0)
  for k in key:
    h = _mix64(np.asarray([h ^ np.uint64(k & 0xFFFFFFFFFFFFFFFF)], np.uint64))[0]
  with np.errstate(over="ignore"):
    return np.argsort(_mix64(np.arange(n, dtype=np.uint64) ^ h), kind="stable")


def document_order(num_docs: int, seed: int) -> np.ndarray:
  """The fixed order of all training documents for `seed` (subsets are its prefixes)."""
  return permutation(num_docs, seed, 0)


def epoch_order(subset_size: int, seed: int, epoch: int) -> np.ndarray:
  """Positions into the subset, in the order epoch `epoch` visits them."""
  return permutation(subset_size, seed, 1, epoch)


@dataclasses.dataclass(frozen=True)
class TrainPlan:
  """What a (budget, repetitions, seed) setting means on a prepared directory."""
  seq_len: int
  global_batch: int
  local_batch: int
  process_index: int
  process_count: int
  token_budget: int
  repetitions: int
  seed: int
  subset_docs: int        # documents in the unique subset
  subset_tokens: int      # tokens in the unique subset (one epoch)
  train_docs: int
  train_tokens: int
  stream_tokens: int      # repetitions * subset_tokens
  num_batches: int        # global batches the iterator yields (the last may hold padding)
  num_full_batches: int   # global batches without any padding (check train.steps against this)


def _check_positive(**kw: int) -> None:
  for k, v in kw.items():
    if not isinstance(v, (int, np.integer)) or v < 1:
      raise PipelineError(f"{k}={v!r} must be a positive integer")


def check_config(data: Any, max_seq_len: int, process_count: int) -> None:
  """The checks of a run's `data` section that the pipeline owns (shapes, hosts)."""
  if not 1 <= data.seq_len <= max_seq_len:
    raise ConfigError(f"data.seq_len={data.seq_len} must be in [1, model.max_seq_len={max_seq_len}]")
  for name in ("repetitions", "global_batch"):
    if getattr(data, name) < 1:
      raise ConfigError(f"data.{name} must be >= 1, got {getattr(data, name)}")
  if data.global_batch % process_count:
    raise ConfigError(f"data.global_batch={data.global_batch} is not divisible by the "
                        f"{process_count} processes")


def _hosts(global_batch: int, process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise PipelineError(f"process_index={process_index} not in [0, process_count={process_count})")
  if global_batch % process_count:
    raise PipelineError(f"global_batch={global_batch} is not divisible by process_count={process_count}")
  return process_index, process_count


class _Stream:
  """Random access to token spans of the concatenated (shuffled) epochs of a document set."""

  def __init__(self, prepared_dir: pathlib.Path, split: str, docs: np.ndarray, lengths: np.ndarray,
               epochs: int, seed: int | None):
    m = prepare_lib.read_manifest(prepared_dir)
    self._dtype = np.dtype(m["dtype"])
    paths = [str(prepared_dir / f) for f in m[split]["shards"]]
    for p in paths:
      if not os.path.isfile(p):
        raise PipelineError(f"prepared shard {p} is missing")
    self._dir, self._manifest = prepared_dir, m
    self._paths = paths
    self._source = grain.sources.ArrayRecordDataSource(paths)
    self.docs = docs                       # record indices of the document set (fixed order)
    self.lengths = lengths[docs].astype(np.int64)
    self.epoch_tokens = int(self.lengths.sum())
    self.epochs = epochs
    self.total = self.epoch_tokens * epochs
    self._seed = seed
    self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    self._lock = threading.Lock()

  def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
    """(record indices in visiting order, exclusive token starts [n+1]) of epoch e."""
    with self._lock:
      if e not in self._cache:
        if self._seed is None:
          pos = np.arange(len(self.docs))
        else:
          pos = epoch_order(len(self.docs), self._seed, e)
        starts = np.zeros(len(pos) + 1, np.int64)
        np.cumsum(self.lengths[pos], out=starts[1:])
        if len(self._cache) >= 2:
          self._cache.pop(min(self._cache))
        self._cache[e] = (self.docs[pos], starts)
      return self._cache[e]

  def _read(self, indices: list[int]) -> list[bytes]:
    """Records by index; a damaged shard is a one-line PipelineError naming it."""
    try:
      return self._source.__getitems__(indices)
    except Exception as e:  # pylint: disable=broad-except
      counts = [self._manifest.get("files", {}).get(pathlib.Path(p).name, {}).get("records")
                for p in self._paths]
      where = self._dir
      if indices and all(isinstance(c, int) for c in counts):
        shard = int(np.searchsorted(np.cumsum(counts), indices[0], "right"))
        where = self._paths[min(shard, len(self._paths) - 1)]
      raise PipelineError(
          f"prepared data {where} is damaged ({type(e).__name__}: "
          f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}); find the bad file "
          f"with: python -m dualjax.prepare --verify --config.data.prepared_dir={self._dir}, "
          "then rebuild it") from None

  def span(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens int32[b-a] of stream positions [a, b) (PAD past the end) and a document-piece
    counter int64[b-a] that increases exactly where a document (piece) starts; -1 = padding."""
    n = b - a
    tokens = np.full(n, PAD, np.int32)
    piece = np.full(n, -1, np.int64)
    pos, counter = a, 0
    end = min(b, self.total)
    while pos < end:
      e, o = divmod(pos, self.epoch_tokens)
      order, starts = self.epoch(e)
      stop = min(end - e * self.epoch_tokens, self.epoch_tokens)
      j0 = int(np.searchsorted(starts, o, "right")) - 1
      j1 = int(np.searchsorted(starts, stop, "left"))
      recs = self._read([int(i) for i in order[j0:j1]])
      cat = np.frombuffer(b"".join(recs), self._dtype)
      lens = starts[j0 + 1:j1 + 1] - starts[j0:j1]
      lo, hi = o - starts[j0], stop - starts[j0]
      out = slice(pos - a, pos - a + (hi - lo))
      tokens[out] = cat[lo:hi]
      piece[out] = np.repeat(np.arange(counter, counter + len(lens)), lens)[lo:hi]
      counter += len(lens)
      pos = e * self.epoch_tokens + stop
    return tokens, piece


class PackedBatches(grain.MapDataset):
  """Element i: this process's rows of global batch i, as {'tokens', 'segment_ids'} int32[B, L+1]."""

  def __init__(self, stream: _Stream, *, seq_len: int, global_batch: int, process_index: int,
               process_count: int, num_batches: int):
    super().__init__()
    self._stream = stream
    self._row = seq_len + 1
    self._global, self._local = global_batch, global_batch // process_count
    self._first = process_index * self._local
    self._n = num_batches

  def __len__(self) -> int:
    return self._n

  def __str__(self) -> str:
    return f"PackedBatches(rows={self._local}x{self._row}, batches={self._n})"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    if not -self._n <= index < self._n:
      raise IndexError(f"batch {index} out of range [0, {self._n})")
    index %= self._n
    row0 = index * self._global + self._first
    tokens, piece = self._stream.span(row0 * self._row, (row0 + self._local) * self._row)
    tokens = tokens.reshape(self._local, self._row)
    piece = piece.reshape(self._local, self._row)
    seg = (piece - piece[:, :1] + 1).astype(np.int32)
    seg[piece < 0] = 0
    return {"tokens": tokens, "segment_ids": seg}


def _read_lengths(prepared_dir: pathlib.Path, m: dict[str, Any], split: str) -> np.ndarray:
  path = prepared_dir / m[split]["lengths"]
  if not path.is_file():
    raise PipelineError(f"prepared file {path} is missing")
  try:
    lengths = np.load(path)
  except (ValueError, OSError, EOFError) as e:
    raise PipelineError(f"prepared file {path} is unreadable ({str(e).splitlines()[0][:160]}); "
                        "rebuild it with python -m dualjax.prepare") from None
  if lengths.ndim != 1 or len(lengths) != m[split]["documents"]:
    raise PipelineError(f"prepared file {path} has {lengths.size} entries, the manifest says "
                        f"{m[split]['documents']} documents; rebuild it with python -m dualjax.prepare")
  return lengths


def check_subset(*, token_budget: int, repetitions: int, seq_len: int, global_batch: int) -> None:
  """The unique subset (budget / r tokens) must hold at least one global batch (needs no data)."""
  batch_tokens = global_batch * (seq_len + 1)
  target = -(-token_budget // repetitions)
  if target < batch_tokens:
    raise PipelineError(
        f"repetitions={repetitions} leaves a unique subset of {target:,} tokens (token budget "
        f"{token_budget:,} / {repetitions}), less than one global batch of {batch_tokens:,} tokens")


def plan_train(prepared_dir: str | os.PathLike, *, seq_len: int, global_batch: int,
               token_budget: int, repetitions: int, seed: int, process_index: int | None = None,
               process_count: int | None = None) -> tuple[TrainPlan, np.ndarray]:
  """Checks the setting and picks the unique subset; returns (plan, subset record indices)."""
  _check_positive(seq_len=seq_len, global_batch=global_batch, token_budget=token_budget,
                  repetitions=repetitions)
  pi, pc = _hosts(global_batch, process_index, process_count)
  d = pathlib.Path(prepared_dir)
  m = prepare_lib.read_manifest(d)
  lengths = _read_lengths(d, m, "train")
  check_subset(token_budget=token_budget, repetitions=repetitions, seq_len=seq_len,
               global_batch=global_batch)
  batch_tokens = global_batch * (seq_len + 1)
  target = -(-token_budget // repetitions)
  order = document_order(len(lengths), seed)
  cum = np.cumsum(lengths[order])
  total = int(cum[-1]) if len(cum) else 0
  if total < target:
    need = -(-token_budget // max(total, 1))
    raise PipelineError(
        f"repetitions={repetitions}: the unique subset needs {target:,} tokens but {d} holds only "
        f"{total:,} training tokens (use repetitions >= {need} or a larger source)")
  k = int(np.searchsorted(cum, target, "left")) + 1
  subset = order[:k]
  sub_tokens = int(cum[k - 1])
  stream = sub_tokens * repetitions
  rows = -(-stream // (seq_len + 1))
  plan = TrainPlan(seq_len=seq_len, global_batch=global_batch, local_batch=global_batch // pc,
                   process_index=pi, process_count=pc, token_budget=token_budget,
                   repetitions=repetitions, seed=seed, subset_docs=k, subset_tokens=sub_tokens,
                   train_docs=len(lengths), train_tokens=total, stream_tokens=stream,
                   num_batches=-(-rows // global_batch),
                   num_full_batches=stream // batch_tokens)
  return plan, subset


def _read_options(num_threads: int, prefetch: int) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)


def make_train_dataset(prepared_dir: str | os.PathLike, *, seq_len: int, global_batch: int,
                       token_budget: int, repetitions: int, seed: int,
                       process_index: int | None = None, process_count: int | None = None,
                       num_threads: int = 4, prefetch: int = 8) -> grain.IterDataset:
  """The training `grain.IterDataset` of this process's batches (see the module docstring).

  The returned dataset has a `.plan` (TrainPlan: subset size, `num_batches`, `num_full_batches`).
  `iter(ds)` gives a `grain.DatasetIterator`; save `it.get_state()` / `it.set_state(state)`.
  """
  plan, subset = plan_train(prepared_dir, seq_len=seq_len, global_batch=global_batch,
                            token_budget=token_budget, repetitions=repetitions, seed=seed,
                            process_index=process_index, process_count=process_count)
  d = pathlib.Path(prepared_dir)
  m = prepare_lib.read_manifest(d)
  stream = _Stream(d, "train", subset, _read_lengths(d, m, "train"), repetitions, seed)
  batches = PackedBatches(stream, seq_len=seq_len, global_batch=global_batch,
                          process_index=plan.process_index, process_count=plan.process_count,
                          num_batches=plan.num_batches)
  ds = batches.to_iter_dataset(_read_options(num_threads, prefetch))
  ds.plan = plan
  return ds


def make_val_dataset(prepared_dir: str | os.PathLike, *, seq_len: int, batch_size: int,
                     process_index: int | None = None, process_count: int | None = None,
                     max_batches: int | None = None, num_threads: int = 2,
                     prefetch: int = 4) -> grain.IterDataset:
  """The held-out documents, in prepared order, packed like training (one pass, no shuffle).

  `batch_size` is global (rows over all processes); the last batch is filled with padding rows.
  """
  _check_positive(seq_len=seq_len, batch_size=batch_size)
  pi, pc = _hosts(batch_size, process_index, process_count)
  d = pathlib.Path(prepared_dir)
  m = prepare_lib.read_manifest(d)
  lengths = _read_lengths(d, m, "val")
  if len(lengths) == 0:
    raise PipelineError(f"{d} has no validation documents (prepare with a larger val_fraction)")
  stream = _Stream(d, "val", np.arange(len(lengths)), lengths, 1, None)
  rows = -(-stream.total // (seq_len + 1))
  n = -(-rows // batch_size)
  if max_batches:
    n = min(n, max_batches)
  batches = PackedBatches(stream, seq_len=seq_len, global_batch=batch_size, process_index=pi,
                          process_count=pc, num_batches=n)
  return batches.to_iter_dataset(_read_options(num_threads, prefetch))

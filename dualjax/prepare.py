"""Tokenize a text source into ArrayRecord shards plus a JSON manifest (DESIGN.md §6).

  python -m dualjax.prepare --config.data.source=embedded --config.data.prepared_dir=/tmp/prep \
      --config.model.vocab_size=2048
  python -m dualjax.prepare --config=configs/rep1.py:tiny --config.data.prepared_dir=DIR
      (exactly the data that training with that config would prepare)
  python -m dualjax.prepare --config.data.source='/data/hplt2/*.jsonl.zst' \
      --config.data.prepared_dir=DIR --config.data.tokenizer=sp.model

The fields are the run config's: data.source, data.prepared_dir (the output), data.tokenizer (a
SentencePiece model; empty = train a BPE tokenizer of model.vocab_size), data.num_workers,
data.val_fraction.

Output directory:
  manifest.json          counts, tokenizer checksum, source description and input fingerprint
  tokenizer.model        the tokenizer used (trained here on the training documents if not given)
  train-NNNNN.array_record, val-NNNNN.array_record
                         one record per document: its token ids (manifest `dtype`, little endian)
                         with <s> prepended, in source order
  train_lengths.npy, val_lengths.npy   tokens per record (int64), for the pipeline
Validation documents: the source's own split for the embedded corpus; otherwise a document is
held out iff blake2b(text) / 2^64 < val_fraction (so identical texts always land on one side).
The output is built in a temporary directory and renamed into place: a failed run never damages
an existing output, and re-running on unchanged input (same fingerprint, tokenizer and settings)
does nothing.
"""

import hashlib
import json
import multiprocessing
import os
import pathlib
import shutil
import tempfile
import time
from typing import Any, Iterable, Iterator

import numpy as np
import tqdm
from absl import flags
from array_record.python import array_record_module

from dualjax import cli
from dualjax import sources as sources_lib
from dualjax.errors import ConfigError
from dualjax import tokenizer as tok_lib
from dualjax.sources import SourceError
from dualjax.tokenizer import TokenizerError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"
_WRITER_OPTIONS = "group_size:1,uncompressed"
_CHUNK_CHARS = 1 << 20  # characters per tokenisation task


class PrepareError(ValueError):
  """Bad prepare input or output directory; the message is one line naming the field or file."""


DATA_ERRORS = (SourceError, TokenizerError, PrepareError)


def _is_val(text: str, val_fraction: float) -> bool:
  h = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
  return int.from_bytes(h, "big") / 2**64 < val_fraction


# Worker side (spawned processes: module-level, picklable).
_WORKER_TOK: tok_lib.SentencePieceTokenizer | None = None


def _worker_init(model_file: str) -> None:
  global _WORKER_TOK
  _WORKER_TOK = tok_lib.SentencePieceTokenizer(model_file)


def _encode_chunk(args: tuple[list[str], list[str], float, str]) -> tuple[list[bool], list[bytes], int]:
  """Texts -> (is_val flags, record bytes with <s> prepended, characters)."""
  texts, fixed, val_fraction, dtype = args
  assert _WORKER_TOK is not None
  ids = _WORKER_TOK.encode_batch(texts)
  flags = [f == "val" if f else _is_val(t, val_fraction) for t, f in zip(texts, fixed)]
  recs = []
  for x in ids:
    a = np.empty(len(x) + 1, dtype)
    a[0] = tok_lib.BOS
    a[1:] = x
    recs.append(a.tobytes())
  return flags, recs, sum(len(t) for t in texts)


def _chunks(docs: Iterable[tuple[str, str, str]], val_fraction: float, dtype: str
            ) -> Iterator[tuple[list[str], list[str], float, str]]:
  texts, fixed, n = [], [], 0
  for _, text, split in docs:
    if not text:
      continue
    texts.append(text)
    fixed.append(split)
    n += len(text)
    if n >= _CHUNK_CHARS:
      yield texts, fixed, val_fraction, dtype
      texts, fixed, n = [], [], 0
  if texts:
    yield texts, fixed, val_fraction, dtype


class _ShardWriter:
  """Rolls ArrayRecord shards `{prefix}-NNNNN.array_record` every `shard_bytes`."""

  def __init__(self, directory: pathlib.Path, prefix: str, shard_bytes: int):
    self.directory, self.prefix, self.shard_bytes = directory, prefix, shard_bytes
    self.files: list[str] = []
    self.lengths: list[int] = []
    self.tokens = 0
    self._writer = None
    self._bytes = 0

  def write(self, rec: bytes, n_tokens: int) -> None:
    if self._writer is None or self._bytes >= self.shard_bytes:
      self._close()
      name = f"{self.prefix}-{len(self.files):05d}.array_record"
      self.files.append(name)
      self._writer = array_record_module.ArrayRecordWriter(str(self.directory / name), _WRITER_OPTIONS)
      self._bytes = 0
    self._writer.write(rec)
    self._bytes += len(rec)
    self.lengths.append(n_tokens)
    self.tokens += n_tokens

  def _close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def finish(self) -> dict[str, Any]:
    self._close()
    np.save(self.directory / f"{self.prefix}_lengths.npy", np.asarray(self.lengths, np.int64))
    return {"documents": len(self.lengths), "tokens": int(self.tokens), "shards": self.files,
            "lengths": f"{self.prefix}_lengths.npy"}


def _settings_key(source: sources_lib.Source, tokenizer_id: str, val_fraction: float,
                  max_tokenizer_chars: int) -> str:
  blob = json.dumps([FORMAT_VERSION, source.fingerprint(), tokenizer_id, val_fraction,
                     max_tokenizer_chars], sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()


def read_manifest(prepared_dir: str | os.PathLike) -> dict[str, Any]:
  """The manifest of a prepared directory (PrepareError if there is none)."""
  path = pathlib.Path(prepared_dir) / MANIFEST
  if not path.is_file():
    raise PrepareError(f"prepared_dir {prepared_dir} has no {MANIFEST} (run python -m dualjax.prepare)")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise PrepareError(f"{path}: malformed manifest ({e.msg})") from None


def load_tokenizer(prepared_dir: str | os.PathLike) -> tok_lib.Tokenizer:
  """The tokenizer a directory was prepared with (its checksum is checked against the manifest)."""
  m = read_manifest(prepared_dir)
  tok = tok_lib.load_tokenizer(pathlib.Path(prepared_dir) / m["tokenizer"]["file"])
  if tok.checksum != m["tokenizer"]["checksum"]:
    raise PrepareError(f"{prepared_dir}/{m['tokenizer']['file']}: checksum differs from the manifest")
  return tok


def check_vocab(tok: tok_lib.Tokenizer, vocab_size: int, where: Any) -> None:
  """The model's vocabulary must hold every id of the tokenizer."""
  if tok.vocab_size > vocab_size:
    raise ConfigError(f"model.vocab_size={vocab_size} is smaller than the tokenizer's "
                       f"{tok.vocab_size} ({where})")


def check_config(data: Any, vocab_size: int) -> None:
  """The checks of a run's `data` section that need no work: source spec, tokenizer, vocab."""
  if not data.source and not data.prepared_dir:
    raise ConfigError("data.source is empty: give a file/glob/dir, 'embedded' or 'tfds:...'")
  if vocab_size < tok_lib.NUM_SPECIAL:
    raise ConfigError(f"model.vocab_size={vocab_size} is smaller than the "
                       f"{tok_lib.NUM_SPECIAL} special tokens")
  if data.tokenizer and not pathlib.Path(data.tokenizer).is_file():
    raise ConfigError(f"data.tokenizer: file not found: {data.tokenizer}")
  prepared = pathlib.Path(data.prepared_dir) if data.prepared_dir else None
  if data.tokenizer or (prepared and (prepared / MANIFEST).is_file()):
    tok = tok_lib.load_tokenizer(data.tokenizer) if data.tokenizer else load_tokenizer(prepared)
    check_vocab(tok, vocab_size, data.tokenizer or prepared)
  if data.source:
    sources_lib.open_source(data.source)  # a bad source fails here, before anything is written


def prepare(source: str, out_dir: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
            vocab_size: int = 51_200, num_workers: int = 0, val_fraction: float = 0.005,
            shard_bytes: int = 256 << 20, max_tokenizer_chars: int = 200_000_000,
            verbose: bool = True) -> dict[str, Any]:
  """Tokenizes `source` into `out_dir`; returns the manifest. Does nothing if up to date.

  Args:
    source: a source spec (see dualjax.sources), e.g. 'embedded' or '/data/*.jsonl.zst'.
    out_dir: the prepared directory (created or replaced atomically).
    tokenizer: a SentencePiece model file; None trains a BPE tokenizer of `vocab_size` on the
      training documents (at most `max_tokenizer_chars` characters of them, in source order).
    num_workers: tokenizer processes (0 = all cores, 1 = in this process).
    val_fraction: share of documents held out for validation (not for the embedded corpus,
      which has its own split).
  """
  out = pathlib.Path(out_dir)
  # --- all checks before any work ---
  if not 0.0 <= val_fraction < 1.0:
    raise PrepareError(f"val_fraction={val_fraction} must be in [0, 1)")
  if num_workers < 0:
    raise PrepareError(f"num_workers={num_workers} must be >= 0")
  if tokenizer:
    tok = tok_lib.load_tokenizer(tokenizer)
    tokenizer_id = tok.checksum
  else:
    tok = None
    tok_lib.check_vocab_size(vocab_size)
    tokenizer_id = f"train:bpe:{vocab_size}"
  src = sources_lib.open_source(source)
  if out.exists() and not out.is_dir():
    raise PrepareError(f"out {out} exists and is not a directory")
  if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
    raise PrepareError(f"out {out} is a non-empty directory without a {MANIFEST}; refusing to replace it")
  key = _settings_key(src, tokenizer_id, val_fraction if not src.has_fixed_split else -1.0,
                      max_tokenizer_chars)
  if (out / MANIFEST).is_file():
    try:
      old = json.loads((out / MANIFEST).read_text())
    except json.JSONDecodeError:
      old = {}
    if old.get("key") == key:
      if verbose:
        print(f"prepare: {out} is up to date ({old['train']['tokens']:,} training tokens)")
      return old

  # --- work, in a temporary directory next to the output ---
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
  try:
    tmp.chmod(0o755)
    manifest = _prepare_into(src, tmp, tok, tokenizer, vocab_size, num_workers, val_fraction,
                             shard_bytes, max_tokenizer_chars, verbose)
    manifest["key"] = key
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    _swap_into_place(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if verbose:
    print(f"prepare: wrote {out}: {manifest['train']['documents']:,} train documents "
          f"({manifest['train']['tokens']:,} tokens), {manifest['val']['documents']:,} validation "
          f"documents ({manifest['val']['tokens']:,} tokens)")
  return manifest


def _swap_into_place(tmp: pathlib.Path, out: pathlib.Path) -> None:
  if out.exists():
    old = out.with_name(f".{out.name}.old-{os.getpid()}-{time.time_ns()}")
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.rename(tmp, out)


def _prepare_into(src: sources_lib.Source, tmp: pathlib.Path, tok, tokenizer_path, vocab_size: int,
                  num_workers: int, val_fraction: float, shard_bytes: int, max_tokenizer_chars: int,
                  verbose: bool) -> dict[str, Any]:
  t0 = time.time()
  model_file = tmp / TOKENIZER_FILE
  if tok is None:
    train_texts = (t for _, t, split in src.documents(split="train")
                   if split == "train" or (not split and not _is_val(t, val_fraction)))
    tok = tok_lib.train_sentencepiece(train_texts, model_file, vocab_size=vocab_size,
                                      max_chars=max_tokenizer_chars)
    trained = True
  else:
    shutil.copyfile(tokenizer_path, model_file)
    tok = tok_lib.SentencePieceTokenizer(model_file)
    trained = False
  t_tok = time.time() - t0
  dtype = "<u2" if tok.vocab_size <= 1 << 16 else "<i4"
  workers = num_workers or os.cpu_count() or 1
  writers = {"train": _ShardWriter(tmp, "train", shard_bytes), "val": _ShardWriter(tmp, "val", shard_bytes)}
  chunks = _chunks(src.documents(), val_fraction, dtype)
  chars = 0
  t1 = time.time()
  bar = tqdm.tqdm(desc="prepare", unit=" docs", disable=None if verbose else True)
  pool = None
  try:
    if workers == 1:
      _worker_init(str(model_file))
      results = map(_encode_chunk, chunks)
    else:
      pool = multiprocessing.get_context("spawn").Pool(workers, _worker_init, (str(model_file),))
      results = pool.imap(_encode_chunk, chunks)
    itemsize = np.dtype(dtype).itemsize
    for is_val_flags, recs, n_chars in results:
      chars += n_chars
      for is_val, rec in zip(is_val_flags, recs):
        writers["val" if is_val else "train"].write(rec, len(rec) // itemsize)
      bar.update(len(recs))
  finally:
    bar.close()
    if pool is not None:
      pool.terminate()
      pool.join()
  elapsed = time.time() - t1
  train, val = writers["train"].finish(), writers["val"].finish()
  if train["documents"] == 0:
    raise SourceError(f"source {src.spec!r} has no training documents")
  return {
      "format": FORMAT_VERSION,
      "source": src.spec,
      "source_description": src.description,
      "fingerprint": src.fingerprint(),
      "tokenizer": {"file": TOKENIZER_FILE, "checksum": tok.checksum, "vocab_size": tok.vocab_size,
                    "trained_here": trained, "given": str(tokenizer_path) if tokenizer_path else None,
                    "training_seconds": round(t_tok, 2) if trained else None},
      "dtype": dtype,
      "bos_prepended": True,
      "val_split": ("the source's own split" if src.has_fixed_split
                    else f"blake2b(text) < val_fraction={val_fraction}"),
      "val_fraction": val_fraction,
      "train": train,
      "val": val,
      "stats": {"characters": chars, "workers": workers, "tokenize_seconds": round(elapsed, 3),
                "tokens_per_second": round((train["tokens"] + val["tokens"]) / max(elapsed, 1e-9))},
      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
  }


FLAGS = flags.FlagValues()
_SHARD_MB = flags.DEFINE_integer("shard_mb", 256, "ArrayRecord shard size in MB", flag_values=FLAGS)


def main(argv: list[str]) -> int:
  args = cli.parse(argv, __doc__ + "\nSources: " + sources_lib.__doc__.split("\n", 1)[1], FLAGS,
                   config="optional")
  if args is None:
    return 0
  cfg = args.config
  d = cfg.data
  if not d.prepared_dir:
    cli.fail("--config.data.prepared_dir is required (the output directory)")
  if not d.source:
    cli.fail("--config.data.source is required ('embedded', a file/glob/dir, or tfds:...)")
  prepare(d.source, d.prepared_dir, tokenizer=d.tokenizer or None, vocab_size=cfg.model.vocab_size,
          num_workers=d.num_workers, val_fraction=d.val_fraction, shard_bytes=_SHARD_MB.value << 20)
  return 0


if __name__ == "__main__":
  cli.run(main, DATA_ERRORS)

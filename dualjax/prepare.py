"""Tokenize a text source into ArrayRecord shards plus a JSON manifest (DESIGN.md §6).

  python -m dualjax.prepare --config.data.source=embedded --config.data.prepared_dir=/tmp/prep \
      --config.model.vocab_size=2048
  python -m dualjax.prepare --config=configs/rep1.py:tiny --config.data.prepared_dir=DIR
      (exactly the data that training with that config would prepare)
  python -m dualjax.prepare --config.data.source='/data/hplt2/*.jsonl.zst' \
      --config.data.prepared_dir=DIR --config.data.tokenizer=sp.model

  python -m dualjax.prepare --verify --config.data.prepared_dir=DIR
      (re-reads every file and checks its size and sha256 against the manifest)

The fields are the run config's: data.source, data.text_field (the JSONL/Parquet field),
data.prepared_dir (the output), data.tokenizer (a SentencePiece model; empty = train a BPE
tokenizer of model.vocab_size), data.num_workers, data.val_fraction.

Output directory:
  manifest.json          counts, the settings it was made with (source, text field, tokenizer,
                         val_fraction), input fingerprint, and every file's size, sha256 and
                         (shards) record count; its own sha256 in `checksum`
  tokenizer.model        the tokenizer used (trained here on the training documents if not given)
  train-NNNNN.array_record, val-NNNNN.array_record
                         one record per document: its token ids (manifest `dtype`, little endian)
                         with <s> prepended, in source order
  train_lengths.npy, val_lengths.npy   tokens per record (int64), for the pipeline
Validation documents: the source's own split for the embedded corpus; otherwise a document is
held out iff blake2b(text) / 2^64 < val_fraction (so identical texts always land on one side).
The output is built in a temporary directory and renamed into place: a failed run never damages
an existing output. Re-running on unchanged input (same fingerprint, tokenizer and settings)
verifies the checksums and does nothing (or rebuilds a damaged output); changed input of the
same source is rebuilt; a directory prepared from another source or tokenizer is never replaced
unless --replace is given. Format-1 manifests (no checksums, before 2026-12) are rebuilt by
prepare and refused by training, which names the command.
"""

import errno
import hashlib
import json
import logging
import multiprocessing
import os
import pathlib
import shutil
import shlex
import sys
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

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: settings, file sizes/sha256/records and the manifest's own checksum
DEFAULT_VAL_FRACTION = 0.005  # the one default of prepare and the run configs
DEFAULT_MAX_TOKENIZER_CHARS = 200_000_000
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
    self.records: list[int] = []  # per closed shard
    self._writer = None
    self._bytes = 0
    self._records = 0

  def write(self, rec: bytes, n_tokens: int) -> None:
    if self._writer is None or self._bytes >= self.shard_bytes:
      self._close()
      name = f"{self.prefix}-{len(self.files):05d}.array_record"
      self.files.append(name)
      self._writer = array_record_module.ArrayRecordWriter(str(self.directory / name), _WRITER_OPTIONS)
      self._bytes = 0
    self._writer.write(rec)
    self._bytes += len(rec)
    self._records += 1
    self.lengths.append(n_tokens)
    self.tokens += n_tokens

  def _close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None
      self.records.append(self._records)
    self._records = 0

  def finish(self) -> dict[str, Any]:
    self._close()
    np.save(self.directory / f"{self.prefix}_lengths.npy", np.asarray(self.lengths, np.int64))
    return {"documents": len(self.lengths), "tokens": int(self.tokens), "shards": self.files,
            "lengths": f"{self.prefix}_lengths.npy"}


def tokenizer_id(tokenizer: str | os.PathLike | None, vocab_size: int) -> str:
  """What a prepared directory's tokenizer is: `file:<sha256>` of a given one, or the request for
  a trained one, `train:bpe:<vocab_size>`."""
  if tokenizer:
    return "file:" + tok_lib.file_checksum(tokenizer)
  return f"train:bpe:{vocab_size}"


def _settings(src: sources_lib.Source, text_field: str, tok_id: str, val_fraction: float,
              max_tokenizer_chars: int) -> dict[str, Any]:
  return {"source": src.spec, "text_field": text_field, "tokenizer": tok_id,
          "val_fraction": None if src.has_fixed_split else val_fraction,
          "max_tokenizer_chars": max_tokenizer_chars}


def _key(src: sources_lib.Source, settings: dict[str, Any]) -> str:
  blob = json.dumps([FORMAT_VERSION, src.fingerprint(), settings], sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()


def _manifest_checksum(m: dict[str, Any]) -> str:
  body = {k: v for k, v in m.items() if k != "checksum"}
  return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _sha256_file(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def _num_records(path: pathlib.Path, hint: str) -> int:
  reader = None
  try:
    reader = array_record_module.ArrayRecordReader(str(path))
    return reader.num_records()
  except Exception as e:  # pylint: disable=broad-except
    raise PrepareError(f"{path} is not a readable ArrayRecord file ({cli.one_line(e)[:160]}); "
                       f"{hint}") from None
  finally:
    if reader is not None:
      try:
        reader.close()
      except Exception:  # pylint: disable=broad-except
        pass  # closing a reader over a damaged file raises again; the error above says it


def read_manifest(prepared_dir: str | os.PathLike) -> dict[str, Any]:
  """The manifest of a prepared directory (PrepareError if there is none)."""
  path = pathlib.Path(prepared_dir) / MANIFEST
  if not path.is_file():
    raise PrepareError(f"prepared_dir {prepared_dir} has no {MANIFEST} (run python -m dualjax.prepare)")
  try:
    m = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise PrepareError(f"{path}: malformed manifest ({getattr(e, 'msg', e)})") from None
  if not isinstance(m, dict):
    raise PrepareError(f"{path}: malformed manifest (not a JSON object)")
  return m


def rebuild_command(prepared_dir: str | os.PathLike, m: dict[str, Any]) -> str:
  """The prepare command line that rebuilds `prepared_dir` with the settings its manifest names."""
  st = m.get("settings") or {}
  args = ["python -m dualjax.prepare", f"--config.data.source={m.get('source', '?')}"]
  if st.get("text_field", "text") != "text":
    args.append(f"--config.data.text_field={st['text_field']}")
  tok = m.get("tokenizer") or {}
  if tok.get("given"):
    args.append(f"--config.data.tokenizer={tok['given']}")
  else:
    requested = tok.get("requested_vocab_size", tok.get("vocab_size"))
    if requested:
      args.append(f"--config.model.vocab_size={requested}")
  if st.get("val_fraction") is not None:
    args.append(f"--config.data.val_fraction={st['val_fraction']}")
  args.append(f"--config.data.prepared_dir={prepared_dir}")
  return " ".join(shlex.quote(a) if i else a for i, a in enumerate(args))


def check_integrity(prepared_dir: str | os.PathLike, *, checksums: bool = False
                    ) -> dict[str, Any]:
  """Checks a prepared directory against its manifest; returns the manifest.

  Always (cheap, every training start): the manifest's own checksum, every file present with its
  recorded size, each shard's record count, the lengths files' counts and sums. With `checksums`
  also every file's sha256 (reads everything: `prepare --verify`, and prepare's up-to-date check).
  PrepareError names the first bad file and the command that rebuilds the directory.
  """
  d = pathlib.Path(prepared_dir)
  m = read_manifest(d)
  hint = f"rebuild it with: {rebuild_command(d, m)}"
  if m.get("format") != FORMAT_VERSION:
    raise PrepareError(f"{d} was prepared by an older dualjax (manifest format {m.get('format')}, "
                       f"without checksums); {hint}")
  if m.get("checksum") != _manifest_checksum(m):
    raise PrepareError(f"{d / MANIFEST} was edited or damaged (its checksum does not match); {hint}")
  try:
    files = m["files"]
    for name, rec in files.items():
      p = d / name
      if not p.is_file():
        raise PrepareError(f"{p} is missing; {hint}")
      size = p.stat().st_size
      if size != rec["bytes"]:
        raise PrepareError(f"{p} has {size:,} bytes, the manifest says {rec['bytes']:,} "
                           f"(truncated or replaced); {hint}")
    for split in ("train", "val"):
      sm = m[split]
      for name in sm["shards"]:
        n = _num_records(d / name, hint)
        if n != files[name]["records"]:
          raise PrepareError(f"{d / name} holds {n:,} records, the manifest says "
                             f"{files[name]['records']:,} (damaged); {hint}")
      p = d / sm["lengths"]
      try:
        lengths = np.load(p, mmap_mode="r")
        ok = lengths.ndim == 1 and len(lengths) == sm["documents"] and \
            int(np.sum(lengths, dtype=np.int64)) == sm["tokens"]
      except (ValueError, OSError, EOFError) as e:
        raise PrepareError(f"{p} is unreadable ({cli.one_line(e)}); {hint}") from None
      if not ok:
        raise PrepareError(f"{p} does not match the manifest's {sm['documents']:,} documents / "
                           f"{sm['tokens']:,} tokens; {hint}")
  except (KeyError, TypeError) as e:
    raise PrepareError(f"{d / MANIFEST} lacks a field ({e}); {hint}") from None
  if checksums:
    for name, rec in files.items():
      if _sha256_file(d / name) != rec["sha256"]:
        raise PrepareError(f"{d / name}: sha256 differs from the manifest (damaged); {hint}")
  return m


def verify(prepared_dir: str | os.PathLike) -> dict[str, Any]:
  """`check_integrity` with every checksum (PrepareError naming the first bad file)."""
  return check_integrity(prepared_dir, checksums=True)


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


def _describe_made(m: dict[str, Any]) -> str:
  st = m.get("settings") or {}
  field = st.get("text_field", "text")
  tok = m.get("tokenizer") or {}
  made = (f"tokenizer {tok['given']}" if tok.get("given") else
          f"a trained {tok.get('requested_vocab_size', tok.get('vocab_size'))}-token tokenizer")
  return f"source {m.get('source')!r}" + (f" (field {field!r})" if field != "text" else "") + \
      f" with {made}"


def status(out: str | os.PathLike, source: str, *, tokenizer: str | os.PathLike | None,
           vocab_size: int, val_fraction: float, text_field: str = sources_lib.DEFAULT_TEXT_FIELD,
           max_tokenizer_chars: int = DEFAULT_MAX_TOKENIZER_CHARS) -> tuple[str, str]:
  """What preparing `source` into `out` would do, without writing: (state, reason).

  state: 'absent' (nothing there: build it), 'ready' (prepared with exactly these settings from
  unchanged input), 'stale' (same source and tokenizer, other settings or changed input files),
  'other' (another source or tokenizer). PrepareError for a directory that is not ours (files
  without a manifest, a malformed manifest).
  """
  out = pathlib.Path(out)
  if out.exists() and not out.is_dir():
    raise PrepareError(f"prepared_dir {out} exists and is not a directory")
  if not out.exists() or not any(out.iterdir()):
    return "absent", ""
  if not (out / MANIFEST).is_file():
    raise PrepareError(f"prepared_dir {out} is a non-empty directory without a {MANIFEST}; "
                       "refusing to use or replace it")
  m = read_manifest(out)
  src = sources_lib.open_source(source, text_field)
  tok_id = tokenizer_id(tokenizer, vocab_size)
  new = _settings(src, text_field, tok_id, val_fraction, max_tokenizer_chars)
  old = m.get("settings")
  if old is None:  # format 1: source spec and tokenizer only
    t = m.get("tokenizer") or {}
    old_tok = "file:" + t.get("checksum", "") if t.get("given") else None
    if m.get("source") != src.spec or (old_tok and old_tok != tok_id) or \
        (not old_tok and tokenizer):
      return "other", f"{out} holds data prepared from {_describe_made(m)}"
    return "stale", f"{out} was prepared by an older dualjax (manifest format {m.get('format')})"
  for k in ("source", "text_field", "tokenizer"):
    if old.get(k) != new[k]:
      return "other", f"{out} holds data prepared from {_describe_made(m)}"
  if m.get("key") == _key(src, new):
    return "ready", ""
  diff = [f"{k} {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k]]
  return "stale", f"{out} was prepared " + (
      f"with other settings ({', '.join(diff)})" if diff else
      f"from an older version of the files of {src.spec!r}")


def check_config(data: Any, vocab_size: int) -> None:
  """The checks of a run's `data` section that need no work: source spec, tokenizer, vocab."""
  if not data.source and not data.prepared_dir:
    raise ConfigError("data.source is empty: give a file/glob/dir, 'embedded' or 'tfds:...'")
  if vocab_size < tok_lib.NUM_SPECIAL:
    raise ConfigError(f"model.vocab_size={vocab_size} is smaller than the "
                       f"{tok_lib.NUM_SPECIAL} special tokens")
  if data.tokenizer and not pathlib.Path(data.tokenizer).is_file():
    raise ConfigError(f"data.tokenizer: file not found: {data.tokenizer}")
  if not 0.0 <= data.val_fraction < 1.0:
    raise ConfigError(f"data.val_fraction={data.val_fraction} must be in [0, 1)")
  prepared = pathlib.Path(data.prepared_dir) if data.prepared_dir else None
  if data.tokenizer or (prepared and (prepared / MANIFEST).is_file()):
    tok = tok_lib.load_tokenizer(data.tokenizer) if data.tokenizer else load_tokenizer(prepared)
    check_vocab(tok, vocab_size, data.tokenizer or prepared)
  if data.source:
    # A bad source fails here, before anything is written.
    sources_lib.open_source(data.source, data.get("text_field", sources_lib.DEFAULT_TEXT_FIELD))


def _is_disk_full(e: BaseException) -> bool:
  if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
    return True
  return "No space left on device" in str(e) or "Disk quota exceeded" in str(e)


def _tree_bytes(d: pathlib.Path) -> int:
  return sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) if d.is_dir() else 0


def prepare(source: str, out_dir: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
            vocab_size: int = 51_200, num_workers: int = 0,
            val_fraction: float = DEFAULT_VAL_FRACTION,
            text_field: str = sources_lib.DEFAULT_TEXT_FIELD, shard_bytes: int = 256 << 20,
            max_tokenizer_chars: int = DEFAULT_MAX_TOKENIZER_CHARS, replace: bool = False,
            verbose: bool = True) -> dict[str, Any]:
  """Tokenizes `source` into `out_dir`; returns the manifest. Does nothing if up to date.

  Args:
    source: a source spec (see dualjax.sources), e.g. 'embedded' or '/data/*.jsonl.zst'.
    out_dir: the prepared directory (created, or replaced atomically: see `status`).
    tokenizer: a SentencePiece model file; None trains a BPE tokenizer of `vocab_size` on the
      training documents (at most `max_tokenizer_chars` characters of them, in source order).
    num_workers: tokenizer processes (0 = all cores, 1 = in this process).
    val_fraction: share of documents held out for validation (not for the embedded corpus,
      which has its own split).
    text_field: the field of JSONL/Parquet/TFDS items that name none (`ITEM#FIELD`).
    replace: replace a directory prepared from another source or tokenizer (else PrepareError).
  An up-to-date output is verified (every sha256) and rebuilt if damaged. A full disk is one
  PrepareError naming the directory; the temporary output is removed and `out_dir` untouched.
  """
  out = pathlib.Path(out_dir)
  # --- all checks before any work ---
  if not 0.0 <= val_fraction < 1.0:
    raise PrepareError(f"val_fraction={val_fraction} must be in [0, 1)")
  if num_workers < 0:
    raise PrepareError(f"num_workers={num_workers} must be >= 0")
  if tokenizer:
    tok = tok_lib.load_tokenizer(tokenizer)
  else:
    tok = None
    tok_lib.check_vocab_size(vocab_size)
  src = sources_lib.open_source(source, text_field)
  try:
    state, why = status(out, source, tokenizer=tokenizer, vocab_size=vocab_size,
                        val_fraction=val_fraction, text_field=text_field,
                        max_tokenizer_chars=max_tokenizer_chars)
  except PrepareError:
    if not (replace and (out / MANIFEST).is_file()):
      raise
    state, why = "other", f"{out} has a malformed {MANIFEST}"
  if state == "ready":
    try:
      old = verify(out)
    except PrepareError as e:
      print(f"prepare: {out} is damaged ({cli.one_line(e).split('; rebuild')[0]}); rebuilding",
            file=sys.stderr)
    else:
      if verbose:
        print(f"prepare: {out} is up to date ({old['train']['tokens']:,} training tokens; "
              "checksums verified)")
      return old
  elif state == "other" and not replace:
    raise PrepareError(f"{why}; refusing to replace it (choose another prepared_dir, or pass "
                       "--replace to rebuild it from this source)")
  settings = _settings(src, text_field, tokenizer_id(tokenizer, vocab_size), val_fraction,
                       max_tokenizer_chars)
  key = _key(src, settings)

  # --- work, in a temporary directory next to the output ---
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
  try:
    tmp.chmod(0o755)
    manifest = _prepare_into(src, tmp, tok, tokenizer, vocab_size, num_workers, val_fraction,
                             shard_bytes, max_tokenizer_chars, verbose)
    manifest["settings"] = settings
    manifest["key"] = key
    manifest["checksum"] = _manifest_checksum(manifest)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    _swap_into_place(tmp, out)
  except BaseException as e:
    written = _tree_bytes(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    if _is_disk_full(e):
      free = shutil.disk_usage(out.parent).free
      raise PrepareError(
          f"no space left on device writing {out}: the disk filled after {written:,} bytes of "
          f"output ({free:,} bytes free now); preparing this source needs more than "
          f"{written:,} bytes: free space or set data.prepared_dir elsewhere") from None
    raise
  if manifest["val"]["documents"] == 0:
    log.warning("prepare: %s has no validation documents (val_fraction=%s); training needs "
                "some unless log.val_every=0", out, val_fraction)
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
    if tok.vocab_size < vocab_size:
      log.warning("prepare: the trained tokenizer has %d tokens, fewer than the %d asked for "
                  "(the corpus allows no more merges); model.vocab_size=%d keeps unused rows",
                  tok.vocab_size, vocab_size, vocab_size)
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
  files = {}
  for w, split in ((writers["train"], train), (writers["val"], val)):
    for name, n in zip(w.files, w.records):
      files[name] = {"records": n}
    files[split["lengths"]] = {}
  files[TOKENIZER_FILE] = {}
  for name, rec in files.items():
    rec.update(bytes=(tmp / name).stat().st_size, sha256=_sha256_file(tmp / name))
  return {
      "format": FORMAT_VERSION,
      "source": src.spec,
      "source_description": src.description,
      "fingerprint": src.fingerprint(),
      "tokenizer": {"file": TOKENIZER_FILE, "checksum": tok.checksum, "vocab_size": tok.vocab_size,
                    "requested_vocab_size": vocab_size if trained else None,
                    "trained_here": trained, "given": str(tokenizer_path) if tokenizer_path else None,
                    "training_seconds": round(t_tok, 2) if trained else None},
      "dtype": dtype,
      "bos_prepended": True,
      "val_split": ("the source's own split" if src.has_fixed_split
                    else f"blake2b(text) < val_fraction={val_fraction}"),
      "val_fraction": val_fraction,
      "train": train,
      "val": val,
      "files": files,
      "stats": {"characters": chars, "workers": workers, "tokenize_seconds": round(elapsed, 3),
                "tokens_per_second": round((train["tokens"] + val["tokens"]) / max(elapsed, 1e-9))},
      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
  }


FLAGS = flags.FlagValues()
_SHARD_MB = flags.DEFINE_integer("shard_mb", 256, "ArrayRecord shard size in MB", flag_values=FLAGS)
_VERIFY = flags.DEFINE_bool(
    "verify", False, "check every file of --config.data.prepared_dir against the manifest's sizes "
    "and sha256 (reads everything); writes nothing", flag_values=FLAGS)
_REPLACE = flags.DEFINE_bool(
    "replace", False, "replace a prepared directory made from another source or tokenizer",
    flag_values=FLAGS)


def main(argv: list[str]) -> int:
  args = cli.parse(argv, __doc__ + "\nSources: " + sources_lib.__doc__.split("\n", 1)[1], FLAGS,
                   config="optional")
  if args is None:
    return 0
  cfg = args.config
  d = cfg.data
  if not d.prepared_dir:
    cli.fail("--config.data.prepared_dir is required (the output directory)")
  if _VERIFY.value:
    m = verify(d.prepared_dir)
    total = sum(f["bytes"] for f in m["files"].values())
    print(f"prepare: {d.prepared_dir} verified: {len(m['files'])} files, {total:,} bytes; sizes, "
          "record counts and sha256 match the manifest")
    return 0
  if not d.source:
    cli.fail("--config.data.source is required ('embedded', a file/glob/dir, or tfds:...)")
  prepare(d.source, d.prepared_dir, tokenizer=d.tokenizer or None, vocab_size=cfg.model.vocab_size,
          num_workers=d.num_workers, val_fraction=d.val_fraction,
          text_field=d.get("text_field", sources_lib.DEFAULT_TEXT_FIELD),
          shard_bytes=_SHARD_MB.value << 20, replace=_REPLACE.value)
  return 0


if __name__ == "__main__":
  cli.run(main, DATA_ERRORS)

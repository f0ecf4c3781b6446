"""Text sources for `prepare` (DESIGN.md §6): files, globs, directories, TFDS, the embedded corpus.

A source spec is one of
  embedded | embedded:kjv,jargon   the corpus shipped in dualjax/corpus (its own train/val split)
  tfds:NAME[/CONFIG][:VERSION][@DATA_DIR][#FIELD]   split 'train' of a prepared TFDS dataset
                                   (ArrayRecord format; FIELD defaults to 'text')
  a file, a glob, a directory (recursive), or several of these joined with ','.
Files by name: `*.jsonl` / `*.jsonl.zst` / `*.json.zst` (one JSON object per line, HPLT v2),
`*.parquet`, anything else is plain UTF-8 text with ONE DOCUMENT PER FILE.
The text field of JSONL/Parquet/TFDS is `text_field` (`--config.data.text_field`, default
`text`); `ITEM#FIELD` names it for one item, e.g. `/data/*.jsonl.zst#content,b.parquet#body`
(plain text and the embedded corpus have no fields). Documents are yielded as
`(location, text)` with location `file:line`, `file#row`, ...
"""

import dataclasses
import glob
import hashlib
import importlib.resources
import io
import json
import os
import pathlib
from typing import Iterator

import zstandard

EMBEDDED_SOURCES = ("kjv", "jargon", "devil", "botchan")
_JSONL = (".jsonl", ".jsonl.zst", ".json.zst", ".ndjson")
_PARQUET = (".parquet",)


class SourceError(ValueError):
  """Bad source input; the message is one line naming the file or field."""


@dataclasses.dataclass(frozen=True)
class Part:
  """One readable unit: a file, an embedded split, or a TFDS split (picklable)."""
  kind: str          # 'text' | 'jsonl' | 'parquet' | 'embedded' | 'tfds'
  path: str
  split: str = ""    # 'train'/'val' when the part has a fixed split (embedded), else ''
  field: str = "text"
  select: tuple[str, ...] = ()  # embedded: which sub-corpora


@dataclasses.dataclass(frozen=True)
class Source:
  spec: str
  description: str
  parts: tuple[Part, ...]

  @property
  def has_fixed_split(self) -> bool:
    return any(p.split for p in self.parts)

  def fingerprint(self) -> str:
    """sha256 over (path, size, mtime) of every input file: changes when the input changes."""
    h = hashlib.sha256(self.spec.encode())
    for p in self.parts:
      for f in _files_of(p):
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
      h.update(f"{p.kind}\0{p.split}\0{p.field}\0{','.join(p.select)}\n".encode())
    return h.hexdigest()

  def documents(self, split: str | None = None) -> Iterator[tuple[str, str, str]]:
    """Yields (location, text, fixed_split) for every document, in a fixed order."""
    for p in self.parts:
      if split is not None and p.split and p.split != split:
        continue
      for loc, text in read_part(p):
        yield loc, text, p.split


def _files_of(p: Part) -> list[str]:
  if p.kind == "tfds":
    d = pathlib.Path(p.path)
    return sorted(str(f) for f in d.rglob("*") if f.is_file())
  return [p.path]


def _corpus_dir() -> pathlib.Path:
  return pathlib.Path(str(importlib.resources.files("dualjax") / "corpus"))


DEFAULT_TEXT_FIELD = "text"


def _split_field(item: str, text_field: str) -> tuple[str, str | None]:
  """`ITEM#FIELD` -> (ITEM, FIELD); (item, None) when no field is named (a path may hold '#')."""
  if "#" in item and not os.path.exists(item):
    path, field = item.rsplit("#", 1)
    if not field or "/" in field:
      raise SourceError(f"source item {item!r}: '#' must be followed by a field name")
    return path, field
  return item, None


def open_source(spec: str, text_field: str = DEFAULT_TEXT_FIELD) -> Source:
  """Parses and checks a source spec (files exist and are non-empty) without reading documents.

  `text_field` is the field/column read from JSONL, Parquet and TFDS items that name none.
  """
  spec = spec.strip()
  if not spec:
    raise SourceError("source: empty source spec")
  if not text_field:
    raise SourceError("data.text_field is empty (the JSONL/Parquet field holding the text)")
  if spec.split("#", 1)[0] == "embedded" or spec.startswith("embedded:"):
    if "#" in spec:
      raise SourceError(f"source {spec!r}: the embedded corpus has no fields to choose")
    names = tuple(spec.split(":", 1)[1].split(",")) if ":" in spec else EMBEDDED_SOURCES
    bad = [n for n in names if n not in EMBEDDED_SOURCES]
    if bad:
      raise SourceError(f"source {spec!r}: unknown embedded corpus {bad[0]!r} "
                        f"(known: {', '.join(EMBEDDED_SOURCES)})")
    d = _corpus_dir()
    parts = tuple(Part("embedded", str(d / f"{s}.jsonl.zst"), split=s, select=names)
                  for s in ("train", "val"))
    for p in parts:
      if not os.path.isfile(p.path):
        raise SourceError(f"embedded corpus file {p.path} is missing (broken install?)")
    return Source(spec, f"embedded corpus ({', '.join(names)}; dualjax/corpus/PROVENANCE.md)", parts)
  if spec.startswith("tfds:"):
    return _open_tfds(spec, text_field)
  if spec.split(":", 1)[0].isalpha() and ":" in spec and not os.path.exists(spec):
    raise SourceError(f"source {spec!r}: unknown source scheme {spec.split(':', 1)[0]!r} "
                      "(use a path/glob, 'embedded[:name,...]' or 'tfds:...')")
  parts = []
  for item in spec.split(","):
    item, field = _split_field(item.strip(), text_field)
    for f in _expand(item):
      if os.path.getsize(f) == 0:
        raise SourceError(f"source file {f} is empty")
      kind = _kind_of(f)
      if kind == "text" and field is not None:
        raise SourceError(f"source item {item}#{field}: plain text files have no fields "
                          "(one document per file)")
      parts.append(Part(kind, f, field="text" if kind == "text" else field or text_field))
  fields = sorted({p.field for p in parts if p.kind != "text"})
  what = f"; field {', '.join(fields)}" if fields else ""
  return Source(spec, f"{len(parts)} file(s) from {spec}{what}", tuple(parts))


def _kind_of(f: str) -> str:
  if f.endswith(_JSONL):
    return "jsonl"
  if f.endswith(_PARQUET):
    return "parquet"
  return "text"


def _expand(item: str) -> list[str]:
  if not item:
    raise SourceError("source: empty item in a ','-separated source list")
  if os.path.isdir(item):
    out = sorted(str(p) for p in pathlib.Path(item).rglob("*")
                 if p.is_file() and not p.name.startswith("."))
    if not out:
      raise SourceError(f"source directory {item} has no files")
    return out
  if glob.has_magic(item):
    out = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
    if not out:
      raise SourceError(f"source glob {item} matches no files")
    return out
  if not os.path.exists(item):
    raise SourceError(f"source file {item} does not exist")
  return [item]


def _open_tfds(spec: str, text_field: str = DEFAULT_TEXT_FIELD) -> Source:
  rest = spec[len("tfds:"):]
  field = text_field
  if "#" in rest:
    rest, field = rest.rsplit("#", 1)
  data_dir = None
  if "@" in rest:
    rest, data_dir = rest.split("@", 1)
  if not rest:
    raise SourceError(f"source {spec!r}: no TFDS dataset name")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(rest, data_dir=data_dir)
    info = builder.info
  except Exception as e:  # pylint: disable=broad-except
    raise SourceError(f"source {spec!r}: TFDS dataset not found "
                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
  if "train" not in info.splits:
    raise SourceError(f"source {spec!r}: TFDS dataset has no 'train' split "
                      f"(has {', '.join(info.splits.keys())})")
  if field not in info.features:
    raise SourceError(f"source {spec!r}: TFDS dataset has no field {field!r} "
                      f"(has {', '.join(info.features.keys())})")
  if info.splits["train"].num_examples == 0:
    raise SourceError(f"source {spec!r}: TFDS split 'train' is empty")
  part = Part("tfds", str(builder.data_dir), field=field, select=(rest, data_dir or ""))
  return Source(spec, f"TFDS {rest} (split train, field {field}) in {builder.data_dir}", (part,))


def read_part(p: Part) -> Iterator[tuple[str, str]]:
  """Yields (location, text) of every document of one part; SourceError names file:line."""
  if p.kind == "text":
    try:
      text = pathlib.Path(p.path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
      raise SourceError(f"{p.path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    yield p.path, text
  elif p.kind in ("jsonl", "embedded"):
    yield from _read_jsonl(p)
  elif p.kind == "parquet":
    yield from _read_parquet(p)
  elif p.kind == "tfds":
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    name, data_dir = p.select
    ds = tfds.data_source(name, split="train", data_dir=data_dir or None)
    for i in range(len(ds)):
      v = ds[i][p.field]
      yield f"{name}[train][{i}]", v.decode("utf-8") if isinstance(v, bytes) else str(v)
  else:
    raise SourceError(f"{p.path}: unknown part kind {p.kind!r}")


def _open_text(path: str) -> io.TextIOBase:
  raw = open(path, "rb")  # pylint: disable=consider-using-with
  if path.endswith(".zst"):
    raw = zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
  return io.TextIOWrapper(raw, encoding="utf-8")


def _read_jsonl(p: Part) -> Iterator[tuple[str, str]]:
  with _open_text(p.path) as f:
    lineno = 0
    while True:
      try:
        line = f.readline()
      except UnicodeDecodeError as e:
        raise SourceError(f"{p.path}:{lineno + 1}: not UTF-8 ({e.reason})") from None
      except zstandard.ZstdError as e:
        raise SourceError(f"{p.path}: corrupt zstd stream ({e})") from None
      if not line:
        break
      lineno += 1
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise SourceError(f"{p.path}:{lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
      if not isinstance(obj, dict) or not isinstance(obj.get(p.field), str):
        raise SourceError(f"{p.path}:{lineno}: no string field {p.field!r}")
      if p.select and obj.get("source") not in p.select:
        continue
      yield f"{p.path}:{lineno}", obj[p.field]


def _read_parquet(p: Part) -> Iterator[tuple[str, str]]:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  try:
    f = pq.ParquetFile(p.path)
  except Exception as e:  # pylint: disable=broad-except
    raise SourceError(f"{p.path}: not a Parquet file ({str(e).splitlines()[0]})") from None
  if p.field not in f.schema_arrow.names:
    raise SourceError(f"{p.path}: no column {p.field!r} (has {', '.join(f.schema_arrow.names)})")
  row = 0
  for batch in f.iter_batches(columns=[p.field], batch_size=4096):
    for v in batch.column(0).to_pylist():
      if not isinstance(v, str):
        raise SourceError(f"{p.path}#{row}: column {p.field!r} is not a string ({v!r:.40})")
      yield f"{p.path}#{row}", v
      row += 1

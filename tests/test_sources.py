"""Sources: every file format, globs, directories, TFDS, embedded; bad input in one line."""


import numpy as np

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from dualjax import sources


def _texts(spec):
  return [t for _, t, _ in sources.open_source(spec).documents()]


@pytest.fixture
def files(tmp_path):
  (tmp_path / "a.txt").write_text("first document\n\nwith a blank line\n")
  (tmp_path / "d.jsonl").write_text('{"text": "j1", "id": 1}\n\n{"text": "j2"}\n')
  (tmp_path / "e.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
      b'{"text": "z1", "lang": "en"}\n{"text": "z2\\nline"}\n'))
  pq.write_table(pa.table({"text": ["p1", "p2", "p3"], "n": [1, 2, 3]}), tmp_path / "f.parquet")
  return tmp_path


def test_formats_globs_and_directories(files):
  assert _texts(str(files / "a.txt")) == ["first document\n\nwith a blank line\n"]  # one doc per file
  assert _texts(str(files / "d.jsonl")) == ["j1", "j2"]
  assert _texts(str(files / "e.jsonl.zst")) == ["z1", "z2\nline"]
  assert _texts(str(files / "f.parquet")) == ["p1", "p2", "p3"]
  assert _texts(str(files / "*.json*")) == ["j1", "j2", "z1", "z2\nline"]
  assert len(_texts(str(files))) == 1 + 2 + 2 + 3
  assert _texts(f"{files}/d.jsonl,{files}/f.parquet") == ["j1", "j2", "p1", "p2", "p3"]
  locs = [loc for loc, _, _ in sources.open_source(str(files / "d.jsonl")).documents()]
  assert locs == [f"{files}/d.jsonl:1", f"{files}/d.jsonl:3"]


def test_fingerprint_changes_with_input(files):
  f1 = sources.open_source(str(files)).fingerprint()
  assert sources.open_source(str(files)).fingerprint() == f1
  (files / "a.txt").write_text("changed")
  assert sources.open_source(str(files)).fingerprint() != f1


def test_embedded_by_name():
  src = sources.open_source("embedded:devil")
  docs = list(src.documents())
  assert docs and all(s in ("train", "val") for _, _, s in docs)
  assert {s for _, _, s in docs} == {"train", "val"}
  assert "ABASEMENT" in "".join(t for _, t, _ in docs)
  assert "In the beginning" not in "".join(t for _, t, _ in docs)
  n_all = sum(1 for _ in sources.open_source("embedded").documents())
  assert n_all > len(docs)


@pytest.mark.parametrize("spec_fn, pattern", [
    (lambda p: str(p / "missing.txt"), r"missing.txt does not exist"),
    (lambda p: str(p / "empty.txt"), r"empty.txt is empty"),
    (lambda p: str(p / "*.nothing"), r"matches no files"),
    (lambda p: "embedded:nope", r"unknown embedded corpus 'nope'"),
    (lambda p: "hf:some/dataset", r"unknown source scheme 'hf'"),
    (lambda p: str(p / "emptydir"), r"emptydir has no files"),
])
def test_bad_specs(tmp_path, spec_fn, pattern):
  (tmp_path / "empty.txt").write_text("")
  (tmp_path / "emptydir").mkdir()
  with pytest.raises(sources.SourceError, match=pattern) as e:
    sources.open_source(spec_fn(tmp_path))
  assert "\n" not in str(e.value)


def test_bad_content_names_file_and_line(tmp_path):
  (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": "ok2"}\n{"text": broken\n')
  with pytest.raises(sources.SourceError, match=r"bad.jsonl:3: malformed JSON") as e:
    _texts(str(tmp_path / "bad.jsonl"))
  assert "\n" not in str(e.value)
  (tmp_path / "nofield.jsonl").write_text('{"content": "x"}\n')
  with pytest.raises(sources.SourceError, match=r"nofield.jsonl:1: no string field 'text'"):
    _texts(str(tmp_path / "nofield.jsonl"))
  pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
  with pytest.raises(sources.SourceError, match=r"nocol.parquet: no column 'text'"):
    _texts(str(tmp_path / "nocol.parquet"))


_BUILDER = []


def make_tfds(data_dir) -> None:
  """A tiny real TFDS dataset (ArrayRecord format) built with TFDS's own builder machinery."""
  if not _BUILDER:
    _BUILDER.append(_define_builder())
  _BUILDER[0](data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def _define_builder():
  """Defined once per process (TFDS registers builder classes by name)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class DualjaxTinyText(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"text": tfds.features.Text(), "n": tfds.features.Scalar(np.int32)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(12)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {"text": f"tfds document {i}: " + "word " * (i + 1), "n": i}

  return DualjaxTinyText


def test_tfds_source(tmp_path):
  make_tfds(tmp_path / "tfds")
  texts = _texts(f"tfds:dualjax_tiny_text:1.0.0@{tmp_path / 'tfds'}")
  assert sorted(texts) == sorted(f"tfds document {i}: " + "word " * (i + 1) for i in range(12))
  with pytest.raises(sources.SourceError, match="no field 'body'"):
    sources.open_source(f"tfds:dualjax_tiny_text@{tmp_path / 'tfds'}#body")
  with pytest.raises(sources.SourceError, match="TFDS dataset not found"):
    sources.open_source(f"tfds:no_such_dataset_xyz@{tmp_path / 'tfds'}")


def test_text_field_for_every_structured_kind(tmp_path):
  (tmp_path / "c.jsonl").write_text('{"content": "c1", "text": "t1"}\n{"content": "c2", "text": "t2"}\n')
  pq.write_table(pa.table({"body": ["b1", "b2"], "text": ["x1", "x2"]}), tmp_path / "b.parquet")
  (tmp_path / "a.txt").write_text("plain")
  c, b = tmp_path / "c.jsonl", tmp_path / "b.parquet"
  assert _texts(str(c)) == ["t1", "t2"]  # default field: text
  docs = sources.open_source(str(c), text_field="content").documents()
  assert [t for _, t, _ in docs] == ["c1", "c2"]
  assert _texts(f"{c}#content,{b}#body,{tmp_path / 'a.txt'}") == ["c1", "c2", "b1", "b2", "plain"]
  assert sources.open_source(f"{c}#content").fingerprint() != sources.open_source(str(c)).fingerprint()
  # A plain-text source does not change with data.text_field.
  a = str(tmp_path / "a.txt")
  assert sources.open_source(a, "body").fingerprint() == sources.open_source(a).fingerprint()
  with pytest.raises(sources.SourceError, match=r"a\.txt#x: plain text files have no fields"):
    sources.open_source(f"{a}#x")
  with pytest.raises(sources.SourceError, match="the embedded corpus has no fields"):
    sources.open_source("embedded#text")
  with pytest.raises(sources.SourceError, match=r"c\.jsonl:1: no string field 'nope'"):
    _texts(f"{c}#nope")
  with pytest.raises(sources.SourceError, match=r"b\.parquet: no column 'nope'"):
    _texts(f"{b}#nope")
  with pytest.raises(sources.SourceError, match="data.text_field is empty"):
    sources.open_source(str(c), text_field="")

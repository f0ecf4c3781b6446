"""Embedded corpus: present, small, four public-domain sources, disjoint validation part."""

import hashlib
import json
import pathlib

import zstandard

CORPUS = pathlib.Path(__file__).resolve().parents[1] / "dualjax" / "corpus"


def _docs(name):
  raw = zstandard.ZstdDecompressor().stream_reader(open(CORPUS / name, "rb")).read()
  return [json.loads(l) for l in raw.decode().splitlines()]


def test_files_small_and_complete():
  total = sum(f.stat().st_size for f in CORPUS.iterdir() if f.is_file())
  assert total <= 3 * 2**20
  train, val = _docs("train.jsonl.zst"), _docs("val.jsonl.zst")
  assert {d["source"] for d in train} == {"kjv", "jargon", "devil", "botchan"}
  assert 50 <= len(val) <= 0.05 * len(train)
  assert sum(d["source"] == "kjv" for d in train + val) == 1189  # every chapter
  for d in train + val:
    assert set(d) == {"source", "id", "text"} and d["text"].strip()


def test_validation_disjoint_and_rule():
  train, val = _docs("train.jsonl.zst"), _docs("val.jsonl.zst")
  key = lambda d: (d["source"], d["id"])  # noqa: E731
  assert not {key(d) for d in train} & {key(d) for d in val}
  assert not {d["text"] for d in train} & {d["text"] for d in val}
  assert len({key(d) for d in train}) == len(train)
  for d in train + val:  # the documented hash rule, recomputed
    h = int.from_bytes(hashlib.sha256(f"{d['source']}/{d['id']}".encode()).digest()[:8], "big")
    assert (h / 2**64 < 0.02) == (d in val)


def test_markup_stripped_and_provenance():
  train = _docs("train.jsonl.zst")
  jargon = [d["text"] for d in train if d["source"] == "jargon"]
  assert not any("{" in t or "}" in t or "\xa0" in t for t in jargon)
  botchan = "".join(d["text"] for d in train if d["source"] == "botchan")
  assert "PROJECT GUTENBERG" not in botchan.upper() or "Produced by" in botchan
  assert "*** START" not in botchan and "[A: Insitent]" not in botchan
  prov = (CORPUS / "PROVENANCE.md").read_text()
  for s in ("bible-kjv-text", "4.38", "jargon-text", "4.4.7", "dict-devil", "1.0-13.1", "botchan.txt",
            "public domain"):
    assert s in prov

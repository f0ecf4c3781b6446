"""prepare: records decode to the source documents, manifest counts, split rule, idempotence,
worker-count independence, and the CLI's bad-input contract (exit 2, one line, nothing touched)."""

import hashlib
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from dualjax import prepare as prepare_lib
from dualjax import tokenizer as tok_lib
from data_fixtures import read_records
from test_sources import make_tfds

REPO = pathlib.Path(__file__).resolve().parents[1]


def _corpus(tmp_path, n=60):
  rng = np.random.default_rng(0)
  words = ["alpha", "beta", "gamma", "delta", "  ", "\n", "ünï", "🎉", "the", "of", "and"]
  docs = [" ".join(rng.choice(words, size=int(rng.integers(3, 80)))) for _ in range(n)]
  src = tmp_path / "src"
  src.mkdir()
  (src / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[: n // 2]))
  for i, d in enumerate(docs[n // 2:]):
    (src / f"t{i:03d}.txt").write_text(d)
  return src, docs


def _is_val(text, frac):  # the documented rule, recomputed
  return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") / 2**64 < frac


def _snapshot(d: pathlib.Path):
  return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.iterdir())}


def test_records_manifest_split_and_idempotence(tmp_path, capsys):
  src, docs = _corpus(tmp_path)
  out = tmp_path / "out"
  m = prepare_lib.prepare(str(src), out, vocab_size=400, num_workers=1, val_fraction=0.2)
  tok = prepare_lib.load_tokenizer(out)
  assert m["tokenizer"]["checksum"] == hashlib.sha256((out / "tokenizer.model").read_bytes()).hexdigest()
  train, val = read_records(out, "train"), read_records(out, "val")
  want_val = [d for d in docs if _is_val(d, 0.2)]
  want_train = [d for d in docs if not _is_val(d, 0.2)]
  assert 0 < len(want_val) < len(docs)
  for recs, want in ((train, want_train), (val, want_val)):
    assert [tok.decode(r[1:]) for r in recs] == want       # source order, exact text
    assert all(r[0] == tok_lib.BOS and (r[1:] >= tok_lib.NUM_SPECIAL).all() for r in recs)
  assert m["train"]["documents"] == len(train) and m["val"]["documents"] == len(val)
  assert m["train"]["tokens"] == sum(map(len, train)) and m["val"]["tokens"] == sum(map(len, val))
  np.testing.assert_array_equal(np.load(out / "train_lengths.npy"), [len(r) for r in train])
  assert m["source"] == str(src) and m["fingerprint"] and m["source_description"]
  on_disk = json.loads((out / "manifest.json").read_text())
  assert on_disk["train"] == m["train"]

  before = _snapshot(out)
  capsys.readouterr()
  again = prepare_lib.prepare(str(src), out, vocab_size=400, num_workers=1, val_fraction=0.2)
  assert "up to date" in capsys.readouterr().out
  assert again == on_disk and _snapshot(out) == before       # nothing rewritten
  (src / "t000.txt").write_text("a changed document")
  m3 = prepare_lib.prepare(str(src), out, vocab_size=400, num_workers=1, val_fraction=0.2)
  assert m3["key"] != m["key"]
  tok = prepare_lib.load_tokenizer(out)  # retrained on the changed input
  assert "a changed document" in [tok.decode(r[1:]) for r in read_records(out, "train") + read_records(out, "val")]


def test_workers_and_given_tokenizer(tmp_path):
  src, _ = _corpus(tmp_path)
  a = prepare_lib.prepare(str(src), tmp_path / "a", vocab_size=400, num_workers=1, verbose=False)
  b = prepare_lib.prepare(str(src), tmp_path / "b", tokenizer=tmp_path / "a" / "tokenizer.model",
                          num_workers=2, verbose=False)
  assert b["tokenizer"]["checksum"] == a["tokenizer"]["checksum"] and not b["tokenizer"]["trained_here"]
  for split in ("train", "val"):
    for fa, fb in zip(a[split]["shards"], b[split]["shards"]):
      assert (tmp_path / "a" / fa).read_bytes() == (tmp_path / "b" / fb).read_bytes()


def test_tfds_source_through_cli(tmp_path):
  """A fresh process reads the TFDS dataset from its data_dir alone (no builder code)."""
  make_tfds(tmp_path / "tfds")
  r = _cli(f"--config.data.source=tfds:dualjax_tiny_text@{tmp_path / 'tfds'}",
           f"--config.data.prepared_dir={tmp_path / 'o'}", "--config.model.vocab_size=300",
           "--config.data.num_workers=1", "--config.data.val_fraction=0")
  assert r.returncode == 0, r.stderr
  m = json.loads((tmp_path / "o" / "manifest.json").read_text())
  assert m["train"]["documents"] == 12 and "TFDS" in m["source_description"]


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "dualjax.prepare", *args], capture_output=True,
                        text=True, cwd=REPO, timeout=120)


def test_cli_help():
  r = _cli("--help")
  assert r.returncode == 0 and "--config.data.source" in r.stdout
  assert "--config.model.vocab_size" in r.stdout


@pytest.fixture
def existing(tmp_path):
  """A good prepared output that every bad run below must leave untouched."""
  src, _ = _corpus(tmp_path, n=10)
  out = tmp_path / "out"
  prepare_lib.prepare(str(src), out, vocab_size=300, num_workers=1, verbose=False)
  return tmp_path, out, _snapshot(out)


@pytest.mark.parametrize("make, field", [
    (lambda d: [f"--config.data.source={d / 'nope.jsonl'}"], "nope.jsonl"),
    (lambda d: [f"--config.data.source={d / 'empty.txt'}"], "empty.txt"),
    (lambda d: [f"--config.data.source={d / 'bad.jsonl'}"], "bad.jsonl:2"),
    (lambda d: ["--config.data.source=embedded:shakespeare"], "shakespeare"),
    (lambda d: ["--config.data.source=s3://bucket/x"], "s3"),
    (lambda d: [f"--config.data.source={d / 'src'}", "--config.model.vocab_size=10"],
     "vocab_size=10"),
    (lambda d: [f"--config.data.source={d / 'src'}", f"--config.data.tokenizer={d / 'no.model'}"],
     "no.model"),
])
def test_cli_bad_input(existing, make, field):
  d, out, before = existing
  (d / "empty.txt").write_text("")
  (d / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "unterminated\n')
  # --replace: even when told to replace `out`, bad input leaves it untouched.
  r = _cli(*make(d), f"--config.data.prepared_dir={out}", "--config.data.num_workers=1",
           "--replace")
  assert r.returncode == 2, r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and field in lines[0], r.stderr
  assert _snapshot(out) == before
  assert sorted(p.name for p in d.iterdir() if p.name.startswith(".out")) == []  # no temp left


def test_manifest_records_sizes_checksums_and_settings(tmp_path):
  src, _ = _corpus(tmp_path)
  out = tmp_path / "out"
  m = prepare_lib.prepare(str(src), out, vocab_size=400, num_workers=1, val_fraction=0.2,
                          verbose=False)
  names = m["train"]["shards"] + m["val"]["shards"] + ["train_lengths.npy", "val_lengths.npy",
                                                         "tokenizer.model"]
  assert sorted(m["files"]) == sorted(names)
  for name in names:
    data = (out / name).read_bytes()
    assert m["files"][name]["bytes"] == len(data)
    assert m["files"][name]["sha256"] == hashlib.sha256(data).hexdigest()
  assert sum(m["files"][n]["records"] for n in m["train"]["shards"]) == m["train"]["documents"]
  assert m["settings"] == {"source": str(src), "text_field": "text", "tokenizer": "train:bpe:400",
                           "val_fraction": 0.2, "max_tokenizer_chars": 200_000_000}
  body = {k: v for k, v in m.items() if k != "checksum"}
  assert m["checksum"] == hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
  assert prepare_lib.verify(out) == m
  assert prepare_lib.status(out, str(src), tokenizer=None, vocab_size=400,
                            val_fraction=0.2) == ("ready", "")
  state, why = prepare_lib.status(out, str(src), tokenizer=None, vocab_size=400, val_fraction=0.3)
  assert state == "stale" and "val_fraction 0.2 -> 0.3" in why
  state, why = prepare_lib.status(out, "embedded", tokenizer=None, vocab_size=400, val_fraction=0.2)
  assert state == "other" and f"holds data prepared from source '{src}'" in why
  assert prepare_lib.status(tmp_path / "none", "embedded", tokenizer=None, vocab_size=400,
                            val_fraction=0.2)[0] == "absent"


def test_another_source_is_refused_unless_replace(tmp_path):
  src, _ = _corpus(tmp_path)
  out = tmp_path / "out"
  prepare_lib.prepare(str(src), out, vocab_size=300, num_workers=1, verbose=False)
  before = _snapshot(out)
  other = tmp_path / "other.jsonl"
  other.write_text("".join(json.dumps({"body": f"other text {i} " * 20}) + "\n" for i in range(40)))
  with pytest.raises(prepare_lib.PrepareError, match="refusing to replace it"):
    prepare_lib.prepare(str(other), out, vocab_size=300, num_workers=1, text_field="body",
                        verbose=False)
  assert _snapshot(out) == before
  m = prepare_lib.prepare(str(other), out, vocab_size=300, num_workers=1, text_field="body",
                          val_fraction=0.1, replace=True, verbose=False)
  assert m["settings"]["text_field"] == "body" and m["source"] == str(other)
  tok = prepare_lib.load_tokenizer(out)
  assert tok.decode(read_records(out, "train")[0][1:]).startswith("other text")


def test_warns_about_a_small_vocabulary_and_an_empty_split(tmp_path, caplog):
  src = tmp_path / "tiny.jsonl"
  src.write_text("".join(json.dumps({"text": f"short {i}"}) + "\n" for i in range(5)))
  with caplog.at_level("WARNING"):
    m = prepare_lib.prepare(str(src), tmp_path / "o", vocab_size=2048, num_workers=1,
                            val_fraction=0.0, verbose=False)
  assert m["tokenizer"]["vocab_size"] < 2048 == m["tokenizer"]["requested_vocab_size"]
  assert f"the trained tokenizer has {m['tokenizer']['vocab_size']} tokens, fewer than the 2048" \
      in caplog.text
  assert "has no validation documents (val_fraction=0.0)" in caplog.text


def test_an_old_manifest_is_refused_by_training_and_rebuilt_by_prepare(tmp_path):
  src, _ = _corpus(tmp_path, n=10)
  out = tmp_path / "out"
  prepare_lib.prepare(str(src), out, vocab_size=300, num_workers=1, verbose=False)
  m = json.loads((out / "manifest.json").read_text())
  for k in ("files", "settings", "checksum"):
    del m[k]
  m["format"] = 1
  (out / "manifest.json").write_text(json.dumps(m))
  with pytest.raises(prepare_lib.PrepareError, match=r"older dualjax \(manifest format 1.*rebuild "
                                                     r"it with: python -m dualjax.prepare"):
    prepare_lib.check_integrity(out)
  assert prepare_lib.status(out, str(src), tokenizer=None, vocab_size=300,
                            val_fraction=0.005)[0] == "stale"
  m2 = prepare_lib.prepare(str(src), out, vocab_size=300, num_workers=1, verbose=False)
  assert m2["format"] == 2 and prepare_lib.verify(out)

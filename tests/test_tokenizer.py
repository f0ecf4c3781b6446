"""Tokenizer: §6 special ids, exact UTF-8 round trip, offsets, checksum, bad input."""

import hashlib
import io
import random

import pytest
import sentencepiece as spm

from dualjax import tokenizer as tok_lib
from data_fixtures import embedded_prepared  # noqa: F401  pylint: disable=unused-import

from dualjax import prepare as prepare_lib


@pytest.fixture(scope="module")
def tok(embedded_prepared):  # noqa: F811
  return prepare_lib.load_tokenizer(embedded_prepared)


def test_special_ids_and_protocol(tok):
  assert isinstance(tok, tok_lib.Tokenizer)
  want = ["<unk>", "<s>", "</s>", "<pad>", "<mask>"] + [f"<special_{i}>" for i in range(11)]
  assert [tok.id_to_piece(i) for i in range(16)] == want
  assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id) == (0, 1, 2, 3, 4)
  assert tok_lib.NUM_SPECIAL == 16 and tok.vocab_size == 1024
  # Byte fallback pieces exist for all 256 bytes.
  assert all(tok.sp.piece_to_id(f"<0x{b:02X}>") >= 16 for b in range(256))


def _random_text(rng: random.Random, n: int) -> str:
  pools = [" ", "  ", "\n", "\n\n", "\t", "\r\n", "\u2581", "\u2581\u2581 ", "<mask>", "<s>", "</s>",
           "<special_3>", "é", "日本語", "🎉", "\x00", "\x7f", "\u200b", "Ω", "  lead", "trail  "]
  out = []
  for _ in range(n):
    r = rng.random()
    if r < 0.4:
      out.append(rng.choice(pools))
    elif r < 0.7:
      out.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyz ,.;'") for _ in range(rng.randint(1, 9))))
    else:
      cp = rng.randint(1, 0x10FFFF)
      while 0xD800 <= cp <= 0xDFFF:
        cp = rng.randint(1, 0x10FFFF)
      out.append(chr(cp))
  return "".join(out)


def test_round_trip_arbitrary_utf8_and_no_specials(tok):
  rng = random.Random(0)
  texts = ["", " ", "\n", "a  b\n\n\n  c \t", "\u2581", "x\u2581y", "<mask><s></s><pad>"]
  texts += [_random_text(rng, rng.randint(1, 60)) for _ in range(300)]
  for t in texts:
    ids = tok.encode(t)
    assert tok.decode(ids) == t, repr(t)
    assert all(tok_lib.NUM_SPECIAL <= i < tok.vocab_size for i in ids), repr(t)
  assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_offsets_cover_text(tok):
  rng = random.Random(1)
  for t in ["hello  world\n", "a\u2581b c", "日本語 🎉 x"] + [_random_text(rng, 30) for _ in range(50)]:
    ids, spans = tok.encode_with_offsets(t)
    assert ids == tok.encode(t)
    assert spans[0][0] == 0 if spans else t == ""
    # Consecutive, non-overlapping spans that tile the text exactly.
    pos = 0
    for b, e in spans:
      assert b == pos and e >= b
      pos = e
    assert pos == len(t)


def _proto_char_spans(sp, text):
  """Ids and [begin, end) character spans from SentencePiece's proto byte offsets."""
  proto = sp.encode(text, out_type="proto")
  starts = [i for i, ch in enumerate(text) for _ in ch.encode("utf-8")] + [len(text)]
  return ([p.id for p in proto.pieces],
          [(starts[p.begin], starts[p.end]) for p in proto.pieces])


def test_offsets_equal_the_proto_byte_offsets(tok):
  """encode_with_offsets = SentencePiece's proto byte offsets in characters, wherever no U+2581
  is in the text."""
  rng = random.Random(3)
  for t in ["hello  world\n", "日本語 🎉 x"] + [_random_text(rng, 30) for _ in range(50)]:
    t = t.replace("\u2581", "")
    assert tok.encode_with_offsets(t) == _proto_char_spans(tok.sp, t), repr(t)


def test_checksum_is_sha256_of_model_file(embedded_prepared, tok):  # noqa: F811
  assert tok.checksum == hashlib.sha256((embedded_prepared / "tokenizer.model").read_bytes()).hexdigest()


@pytest.mark.parametrize("vocab", [0, 8, 15, 100])
def test_vocab_too_small_is_one_line_error(tmp_path, vocab):
  with pytest.raises(tok_lib.TokenizerError, match=r"vocab_size=") as e:
    tok_lib.train_sentencepiece(["some text"] * 10, tmp_path / "m.model", vocab_size=vocab)
  assert "\n" not in str(e.value)
  if vocab < 16:
    assert "16 special tokens" in str(e.value)
  assert not (tmp_path / "m.model").exists()


def test_train_small_and_reject_foreign_layout(tmp_path):
  texts = ["The quick brown fox jumps over the lazy dog.\n" * 3, "Pack my box with five dozen jugs."] * 20
  t = tok_lib.train_sentencepiece(texts, tmp_path / "m.model", vocab_size=400)
  assert t.vocab_size <= 400 and t.decode(t.encode(texts[0])) == texts[0]
  # A SentencePiece model with the library's default special layout is refused, naming the file.
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=buf, vocab_size=36,
                                 minloglevel=2)
  (tmp_path / "foreign.model").write_bytes(buf.getvalue())
  with pytest.raises(tok_lib.TokenizerError, match=r"foreign.model: id \d+ is .*expected"):
    tok_lib.load_tokenizer(tmp_path / "foreign.model")
  with pytest.raises(tok_lib.TokenizerError, match="missing.model does not exist"):
    tok_lib.load_tokenizer(tmp_path / "missing.model")


# ------------------------------------------------------------------------------------------------
# HFTokenizer: a byte-level BPE tokenizer.json with the authors' custom normaliser.

import pickle  # noqa: E402
import unicodedata  # noqa: E402

from interop_fixtures import authors_style_tokenizer, corpus_texts  # noqa: E402


@pytest.fixture(scope="module")
def hf_path(tmp_path_factory):
  return authors_style_tokenizer(tmp_path_factory.mktemp("hf") / "tokenizer.json",
                                 corpus_texts(12), vocab_size=400)


def _normal_form(t: str) -> str:
  """What the authors' normaliser keeps: NFC, no spaces before a newline."""
  t = unicodedata.normalize("NFC", t)
  while " \n" in t:
    t = t.replace(" \n", "\n")
  return t


def _check_tiling(tok, t):
  ids, spans = tok.encode_with_offsets(t)
  assert ids == tok.encode(t)
  assert len(spans) == len(ids)
  pos = 0
  for b, e in spans:
    assert b == pos and e >= b, (t, spans)
    pos = e
  assert pos == (len(t) if ids else 0)


def test_hf_tokenizer_round_trip_and_protocol(hf_path):
  tok = tok_lib.HFTokenizer(hf_path)
  assert isinstance(tok, tok_lib.Tokenizer) and tok.kind == "tokenizers"
  assert tok.special_ids == {"unk": 0, "bos": 1, "eos": 2, "pad": 3, "mask": 4}
  assert tok.vocab_size == 400
  assert tok.checksum == hashlib.sha256(hf_path.read_bytes()).hexdigest()
  rng = random.Random(2)
  texts = corpus_texts(30)[20:] + ["", "a", " lead", "x\n\n  y\tz", "naïve café 日本語 🎉"]
  texts += [_normal_form(_random_text(rng, rng.randint(1, 40))) for _ in range(200)]
  for t in texts:
    assert t == _normal_form(t)
    ids = tok.encode(t)
    assert tok.decode(ids) == t, repr(t)
    _check_tiling(tok, t)
  assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
  # Special tokens' text is text; special ids decode to nothing.
  ids = tok.encode("<mask> <s></s><pad>")
  assert not set(ids) & set(tok.special_ids.values())
  assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.mask_id]) == "<mask> <s></s><pad>"
  # Pickled (spawned prepare workers) it encodes the same, special tokens' text included.
  again = pickle.loads(pickle.dumps(tok))
  assert again.encode("<mask> x") == tok.encode("<mask> x") and again.special_ids == tok.special_ids
  # Text the normaliser changes is not kept (NFD -> NFC, spaces before a newline dropped).
  assert tok.decode(tok.encode("e\u0301 a  \nb")) == "\u00e9 a\nb"
  _check_tiling(tok, "e\u0301 a  \nb")


def test_hf_offsets_split_context_and_completion(hf_path):
  """The rule of evaluation.scoring.split_encode: completion = the tokens whose span ends past
  the context, with the zero-width tokens just before them."""
  tok = tok_lib.HFTokenizer(hf_path)

  def split_at(spans, boundary):
    j = next((j for j, (_, e) in enumerate(spans) if e > boundary), len(spans))
    while j > 0 and spans[j - 1][0] == spans[j - 1][1] >= boundary:
      j -= 1
    return j

  for ctx, comp in [("Question: who begat Seth?\nAnswer:", " Adam"), ("In the beginning", " God"),
                    ("caf\u00e9", " na\u00efve"), ("x = 1", "2")]:
    ids, spans = tok.encode_with_offsets(ctx + comp)
    split = split_at(spans, len(ctx))
    assert ids[:split] == tok.encode(ctx), (ctx, comp)  # a pre-token boundary
    assert tok.decode(ids[:split]) == ctx
  # A character split over byte tokens belongs to the token that completes it; the ones before
  # it are zero-width at its start (as with SentencePiece's byte fallback), so a boundary between
  # characters splits between their bytes.
  ids, spans = tok.encode_with_offsets("日本語")
  assert len(ids) >= 9 and [s for s in spans if s[0] < s[1]] == [(0, 1), (1, 2), (2, 3)]
  split = split_at(spans, 1)
  assert tok.decode(ids[:split]) == "日" and tok.decode(ids[split:]) == "本語"


def test_hf_special_ids_are_mapped_not_assumed(tmp_path):
  texts = corpus_texts(4)
  order = ["<pad>", "</s>", "<mask>", "<unk>", "<s>"]  # another layout: ids follow the file
  path = authors_style_tokenizer(tmp_path / "tokenizer.json", texts, vocab_size=300,
                                 specials=order)
  tok = tok_lib.load_tokenizer(path)
  assert tok.special_ids == {"pad": 0, "eos": 1, "mask": 2, "unk": 3, "bos": 4}
  assert tok.bos_id == 4 and tok.mask_id == 2
  # Other contents: missing roles are named; overrides by content or id map them.
  other = authors_style_tokenizer(tmp_path / "other.json", texts, vocab_size=300,
                                  specials=["<|unk|>", "<|endoftext|>", "<|pad|>"],
                                  bos="<|endoftext|>")
  with pytest.raises(tok_lib.TokenizerError, match=r"other.json has no unk token '<unk>'") as e:
    tok_lib.load_tokenizer(other)
  assert "\n" not in str(e.value)
  with pytest.raises(tok_lib.TokenizerError, match=r"other.json has no mask token '<mask>'"):
    tok_lib.HFTokenizer(other, {"unk": "<|unk|>", "bos": "<|endoftext|>", "eos": "<|endoftext|>",
                                "pad": "<|pad|>"})
  tok = tok_lib.HFTokenizer(other, {"unk": "<|unk|>", "bos": "<|endoftext|>",
                                    "eos": "<|endoftext|>", "pad": "<|pad|>", "mask": 2})
  assert tok.special_ids == {"unk": 0, "bos": 1, "eos": 1, "pad": 2, "mask": 2}
  with pytest.raises(tok_lib.TokenizerError, match="mask id 300 is outside"):
    tok_lib.HFTokenizer(path, {"mask": 300})
  with pytest.raises(tok_lib.TokenizerError, match="unknown special-token role 'cls'"):
    tok_lib.HFTokenizer(path, {"cls": "<s>"})


def test_load_tokenizer_dispatches_on_content(tmp_path, hf_path,
                                              embedded_prepared):  # noqa: F811
  # Names do not matter: a tokenizer.json saved as tokenizer.model is still one.
  (tmp_path / "tokenizer.model").write_bytes(hf_path.read_bytes())
  assert isinstance(tok_lib.load_tokenizer(tmp_path / "tokenizer.model"), tok_lib.HFTokenizer)
  sp = tok_lib.load_tokenizer(embedded_prepared / "tokenizer.model")
  assert isinstance(sp, tok_lib.SentencePieceTokenizer) and sp.kind == "sentencepiece"
  assert sp.special_ids == {"unk": 0, "bos": 1, "eos": 2, "pad": 3, "mask": 4}
  assert tok_lib.load_tokenizer(embedded_prepared / "tokenizer.model", {"mask": "<mask>"})
  with pytest.raises(tok_lib.TokenizerError, match="fixed special layout; its mask token is"):
    tok_lib.load_tokenizer(embedded_prepared / "tokenizer.model", {"mask": "<m>"})
  (tmp_path / "bad.json").write_text('{"version": "1.0", "model": 3')
  with pytest.raises(tok_lib.TokenizerError, match=r"bad.json is not a Hugging Face tokenizer"):
    tok_lib.load_tokenizer(tmp_path / "bad.json")

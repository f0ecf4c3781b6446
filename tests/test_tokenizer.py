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

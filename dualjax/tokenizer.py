"""Tokenizers (DESIGN.md §6): a small protocol and two implementations.

`SentencePieceTokenizer` (dualjax's own, `.model` files). Special ids: <unk>=0, <s>=1, </s>=2,
<pad>=3, <mask>=4, <special_0..10>=5..15. `encode` never emits them from text (they are
SentencePiece control symbols; "<mask>" in text is plain text). Normalisation is the identity (no
whitespace folding, no dummy prefix) with byte fallback, so `decode(encode(s)) == s` for every
str s. The one character SentencePiece cannot keep, its whitespace symbol U+2581, is encoded as
its three UTF-8 byte pieces.

`HFTokenizer` (a Hugging Face `tokenizers` file, `tokenizer.json`, e.g. the authors' byte-level
BPE with its own normaliser). Its special ids are mapped from the file's tokens by content
(`DEFAULT_SPECIAL_TOKENS`, overridable per role), not assumed to be 0..4; special tokens are never
produced from text either. It round-trips exactly the texts its normaliser leaves unchanged.

`load_tokenizer(path)` picks the implementation from the file's content (JSON vs protobuf).
Offsets: `encode_with_offsets(text)` gives spans that tile the text (see `Tokenizer`).
"""

import hashlib
import io
import os
import pathlib
from typing import Iterable, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import sentencepiece as spm
import tokenizers

from dualjax.special_tokens import BOS, EOS, MASK, NUM_SPECIAL, PAD, UNK

SPECIAL_PIECES = ("<unk>", "<s>", "</s>", "<pad>", "<mask>") + tuple(
    f"<special_{i}>" for i in range(NUM_SPECIAL - 5))
NUM_BYTES = 256
_META = "\u2581"  # SentencePiece's whitespace symbol

SPECIAL_ROLES = ("unk", "bos", "eos", "pad", "mask")
# Role -> token content looked up in a tokenizer.json (the authors' layout; ours too).
DEFAULT_SPECIAL_TOKENS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>",
                          "mask": "<mask>"}

__all__ = ["UNK", "BOS", "EOS", "PAD", "MASK", "NUM_SPECIAL", "SPECIAL_PIECES", "SPECIAL_ROLES",
           "DEFAULT_SPECIAL_TOKENS", "Tokenizer", "TokenizerError", "SentencePieceTokenizer",
           "HFTokenizer", "train_sentencepiece", "load_tokenizer", "tokenizer_kind",
           "file_checksum"]


class TokenizerError(ValueError):
  """Bad tokenizer input (vocab size, file); the message is one line naming the field/file."""


@runtime_checkable
class Tokenizer(Protocol):
  """What the rest of dualjax sees of a tokenizer."""

  @property
  def vocab_size(self) -> int: ...

  @property
  def checksum(self) -> str: ...

  unk_id: int
  bos_id: int
  eos_id: int
  pad_id: int
  mask_id: int

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without any special token."""

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; special tokens decode to nothing."""

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """`encode(text)` and each token's [begin, end) character span in `text`.

    The spans tile the text: the first begins at 0, each begins where the previous one ended,
    the last ends at len(text). A character split over several tokens (byte-level or byte-
    fallback pieces) belongs to the token that completes it; the tokens before it get zero-width
    spans at its start. Characters no token stands for (dropped by a normaliser) belong to the
    next token.
    """


def file_checksum(path: str | os.PathLike) -> str:
  """sha256 hex digest of a file's bytes."""
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


class SentencePieceTokenizer:
  """A SentencePiece model file with the §6 special-token layout."""

  kind = "sentencepiece"
  unk_id, bos_id, eos_id, pad_id, mask_id = UNK, BOS, EOS, PAD, MASK

  def __init__(self, model_file: str | os.PathLike):
    path = pathlib.Path(model_file)
    if not path.is_file():
      raise TokenizerError(f"tokenizer file {path} does not exist")
    data = path.read_bytes()
    try:
      self.sp = spm.SentencePieceProcessor(model_proto=data)
    except Exception as e:  # pylint: disable=broad-except
      raise TokenizerError(f"tokenizer file {path} is not a SentencePiece model ({e})") from None
    self.path = path
    self._checksum = hashlib.sha256(data).hexdigest()
    n = self.sp.get_piece_size()
    for i, want in enumerate(SPECIAL_PIECES[:min(n, NUM_SPECIAL)]):
      if self.sp.id_to_piece(i) != want:
        raise TokenizerError(f"tokenizer file {path}: id {i} is {self.sp.id_to_piece(i)!r}, "
                             f"expected {want!r} (DESIGN.md §6 special tokens)")
    if n < NUM_SPECIAL:
      raise TokenizerError(f"tokenizer file {path}: vocab size {n} < {NUM_SPECIAL} special tokens")
    self._meta_bytes = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in _META.encode()]
    if any(self.sp.id_to_piece(i) == "<unk>" for i in self._meta_bytes):
      raise TokenizerError(f"tokenizer file {path} has no byte fallback pieces")

  @property
  def vocab_size(self) -> int:
    return self.sp.get_piece_size()

  @property
  def special_ids(self) -> dict[str, int]:
    return {r: getattr(self, f"{r}_id") for r in SPECIAL_ROLES}

  @property
  def checksum(self) -> str:
    return self._checksum

  def encode(self, text: str) -> list[int]:
    if _META not in text:
      return self.sp.encode(text)
    out: list[int] = []
    for i, part in enumerate(text.split(_META)):
      if i:
        out.extend(self._meta_bytes)
      out.extend(self.sp.encode(part))
    return out

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """`encode` of each text (SentencePiece's batched C++ path where possible)."""
    if not any(_META in t for t in texts):
      return self.sp.encode(list(texts))
    return [self.encode(t) for t in texts]

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and the [begin, end) character span of each token in `text`."""
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    base = 0
    for i, part in enumerate(text.split(_META)):
      if i:
        ids.extend(self._meta_bytes)
        spans.extend([(base - 1, base - 1)] * 2 + [(base - 1, base)])
      char_at = _byte_to_char(part)
      for p in self.sp.encode(part, out_type="proto").pieces:
        ids.append(p.id)
        spans.append((base + char_at[p.begin], base + char_at[p.end]))
      base += len(part) + 1
    return ids, spans

  def decode(self, ids: Iterable[int]) -> str:
    return self.sp.decode([int(i) for i in ids if int(i) >= NUM_SPECIAL])

  def id_to_piece(self, i: int) -> str:
    return self.sp.id_to_piece(int(i))


def _byte_to_char(s: str) -> list[int]:
  """For each UTF-8 byte offset of s (0..len(bytes)), the index of the char it falls in."""
  out = []
  for ci, ch in enumerate(s):
    out.extend([ci] * len(ch.encode()))
  out.append(len(s))
  return out


def train_sentencepiece(texts: Iterable[str], model_file: str | os.PathLike, *, vocab_size: int,
                        max_chars: int = 200_000_000, num_threads: int | None = None,
                        character_coverage: float = 0.9995) -> SentencePieceTokenizer:
  """Trains a BPE model with byte fallback on `texts` (at most `max_chars` characters of them).

  Writes `model_file` (atomically) and returns the loaded tokenizer.
  """
  check_vocab_size(vocab_size)

  errors: list[BaseException] = []

  def sample() -> Iterator[str]:
    n = 0
    try:
      for t in texts:
        if n >= max_chars:
          return
        t = t[:max_chars - n]
        n += len(t)
        if t:
          yield t
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)  # re-raised below, not swallowed by SentencePiece

  buf = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=sample(), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, unk_id=UNK, bos_id=BOS, eos_id=EOS, pad_id=PAD,
        control_symbols=list(SPECIAL_PIECES[4:]), normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
        split_digits=True, character_coverage=character_coverage, hard_vocab_limit=False,
        max_sentence_length=1 << 30, input_sentence_size=0, minloglevel=2,
        num_threads=num_threads or os.cpu_count() or 1)
  except RuntimeError as e:
    if errors:
      raise errors[0] from None
    msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    raise TokenizerError(f"vocab_size={vocab_size}: SentencePiece training failed: {msg}") from None
  if errors:
    raise errors[0]
  path = pathlib.Path(model_file)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_bytes(buf.getvalue())
  os.replace(tmp, path)
  return SentencePieceTokenizer(path)


def check_vocab_size(vocab_size: int) -> None:
  """Raises TokenizerError (one line naming vocab_size) if no BPE model of this size can exist."""
  if vocab_size < NUM_SPECIAL:
    raise TokenizerError(f"vocab_size={vocab_size} is smaller than the {NUM_SPECIAL} special tokens")
  if vocab_size < NUM_SPECIAL + NUM_BYTES:
    raise TokenizerError(f"vocab_size={vocab_size} is smaller than the {NUM_SPECIAL} special tokens "
                         f"+ {NUM_BYTES} byte-fallback pieces")


class HFTokenizer:
  """A Hugging Face `tokenizers` file (tokenizer.json) behind the `Tokenizer` protocol.

  `special_ids` maps a role (unk, bos, eos, pad, mask) to the token's content in the file (str)
  or to an id (int); roles not given are looked up by `DEFAULT_SPECIAL_TOKENS`. A role that
  cannot be mapped is a TokenizerError naming the file, the role and the content looked for.
  `encode` adds no special tokens (the file's post-processor is not applied) and treats special
  tokens' text as plain text; `decode` drops the file's special tokens and the mapped ids.
  """

  kind = "tokenizers"

  def __init__(self, tokenizer_json: str | os.PathLike,
               special_ids: Mapping[str, int | str] | None = None):
    path = pathlib.Path(tokenizer_json)
    if not path.is_file():
      raise TokenizerError(f"tokenizer file {path} does not exist")
    data = path.read_bytes()
    try:
      self.tk = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # pylint: disable=broad-except
      msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise TokenizerError(f"tokenizer file {path} is not a Hugging Face tokenizer.json "
                           f"({msg})") from None
    self.tk.encode_special_tokens = True  # "<mask>" in text is text, as with SentencePiece
    self.path = path
    self._checksum = hashlib.sha256(data).hexdigest()
    unknown = sorted(set(special_ids or {}) - set(SPECIAL_ROLES))
    if unknown:
      raise TokenizerError(f"tokenizer file {path}: unknown special-token role {unknown[0]!r} "
                           f"(roles: {', '.join(SPECIAL_ROLES)})")
    n = self.vocab_size
    for role in SPECIAL_ROLES:
      want = (special_ids or {}).get(role, DEFAULT_SPECIAL_TOKENS[role])
      if isinstance(want, str):
        i = self.tk.token_to_id(want)
        if i is None:
          raise TokenizerError(
              f"tokenizer file {path} has no {role} token {want!r}; map the {role} role to one "
              f"of its tokens (convert --{role}_token=...)")
      else:
        i = int(want)
        if not 0 <= i < n:
          raise TokenizerError(f"tokenizer file {path}: {role} id {i} is outside its vocabulary "
                               f"of {n}")
      setattr(self, f"{role}_id", i)
    self._drop = frozenset(self.special_ids.values()) | frozenset(
        i for i, t in self.tk.get_added_tokens_decoder().items() if t.special)

  def __getstate__(self) -> dict:
    return dict(self.__dict__, tk=self.tk.to_str())

  def __setstate__(self, state: dict) -> None:
    tk = tokenizers.Tokenizer.from_str(state["tk"])
    tk.encode_special_tokens = True  # not part of the serialised tokenizer
    self.__dict__.update(state, tk=tk)

  @property
  def vocab_size(self) -> int:
    return self.tk.get_vocab_size(with_added_tokens=True)

  @property
  def checksum(self) -> str:
    return self._checksum

  @property
  def special_ids(self) -> dict[str, int]:
    return {r: getattr(self, f"{r}_id") for r in SPECIAL_ROLES}

  def encode(self, text: str) -> list[int]:
    return self.tk.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self.tk.encode_batch(list(texts), add_special_tokens=False)]

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and spans from `Encoding.offsets` (character offsets into `text`), made to tile."""
    enc = self.tk.encode(text, add_special_tokens=False)
    return enc.ids, tile_spans(enc.offsets, len(text))

  def decode(self, ids: Iterable[int]) -> str:
    return self.tk.decode([int(i) for i in ids if int(i) not in self._drop],
                          skip_special_tokens=False)

  def id_to_piece(self, i: int) -> str:
    return self.tk.id_to_token(int(i))


def tile_spans(offsets: Sequence[tuple[int, int]], length: int) -> list[tuple[int, int]]:
  """Raw token offsets -> spans that tile [0, length) (the `encode_with_offsets` contract).

  Each span begins where the previous one ended. A token whose characters the next token shares
  (the leading bytes of a character split over byte tokens) ends where the next one begins, so
  a character belongs to the token that completes it; the last span ends at `length`.
  """
  out: list[tuple[int, int]] = []
  pos = 0
  for i, (_, e) in enumerate(offsets):
    if i + 1 < len(offsets) and offsets[i + 1][0] < e:
      e = offsets[i + 1][0]
    e = min(max(int(e), pos), length)
    out.append((pos, e))
    pos = e
  if out:
    out[-1] = (out[-1][0], length)
  return out


def tokenizer_kind(path: str | os.PathLike) -> str:
  """'tokenizers' for a JSON file (tokenizer.json), else 'sentencepiece' (a model protobuf)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise TokenizerError(f"tokenizer file {path} does not exist")
  with path.open("rb") as f:
    head = f.read(64).lstrip()
  return "tokenizers" if head.startswith(b"{") else "sentencepiece"


def load_tokenizer(path: str | os.PathLike,
                   special_ids: Mapping[str, int | str] | None = None) -> Tokenizer:
  """Loads a tokenizer file: a Hugging Face tokenizer.json or a SentencePiece `.model`.

  The kind is read from the content, not the name. `special_ids` (role -> token content or id)
  applies to tokenizer.json files; a SentencePiece model has the fixed §6 layout.
  """
  if tokenizer_kind(path) == "tokenizers":
    return HFTokenizer(path, special_ids)
  tok = SentencePieceTokenizer(path)
  for role, want in (special_ids or {}).items():
    if role not in SPECIAL_ROLES:
      raise TokenizerError(f"tokenizer file {path}: unknown special-token role {role!r} "
                           f"(roles: {', '.join(SPECIAL_ROLES)})")
    have = getattr(tok, f"{role}_id")
    if want not in (have, tok.id_to_piece(have)):
      raise TokenizerError(f"tokenizer file {path}: a SentencePiece model has the fixed special "
                           f"layout; its {role} token is {tok.id_to_piece(have)!r} (id {have}), "
                           f"not {want!r}")
  return tok

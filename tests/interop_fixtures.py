"""Interop test helpers: a tiny random model, texts, an authors-style tokenizer.json."""

import json
import pathlib

import jax
import numpy as np
import zstandard
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from dualjax import model as model_lib
from dualjax import tokenizer as tok_lib

CORPUS = pathlib.Path(__file__).resolve().parents[1] / "dualjax" / "corpus" / "val.jsonl.zst"
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<mask>"] + [f"<special_{i}>" for i in range(11)]
# The authors' pre-tokenizer split (github.com/ltgoslo/dual-language-models, init_tokenizer.py).
_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
          r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*| ?\p{N}|"
          r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def corpus_texts(n: int = 40) -> list[str]:
  """The first n documents of the embedded validation corpus."""
  with CORPUS.open("rb") as f:
    data = zstandard.ZstdDecompressor().stream_reader(f).read().decode()
  return [json.loads(line)["text"] for line in data.splitlines()[:n]]


def tiny_model(head: str = "mlp", vocab_size: int = 512, seed: int = 1, **kw):
  """(cfg, params): a ~55k-parameter model whose every tensor is random (NumPy float32)."""
  cfg = model_lib.ModelConfig(vocab_size=vocab_size, num_layers=2, d_model=32, num_heads=2,
                              head_dim=16, mlp_dim=64, max_seq_len=128, compute_dtype="float32",
                              head=head, **kw)
  abstract = jax.eval_shape(lambda: model_lib.init(cfg, jax.random.key(0)))
  rng = np.random.default_rng(seed)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: (1.0 if "norm" in jax.tree_util.keystr(path) else 0.0)
      + 0.2 * rng.standard_normal(x.shape, np.float32), abstract)
  return cfg, params


def authors_style_tokenizer(path: pathlib.Path, texts: list[str], vocab_size: int = 400,
                            specials: list[str] = SPECIALS, bos: str = "<s>") -> pathlib.Path:
  """A byte-level BPE tokenizer.json with the authors' custom normaliser, trained on `texts`."""
  tok = Tokenizer(BPE(unk_token=specials[0], byte_fallback=False, fuse_unk=False,
                      ignore_merges=True))
  tok.normalizer = normalizers.Sequence([
      normalizers.Prepend(" "), normalizers.NFC(), normalizers.Replace(Regex("\n"), "\n "),
      normalizers.Replace(Regex(" *\n"), "\n")])
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=True)])
  tok.decoder = decoders.Sequence([
      decoders.ByteLevel(add_prefix_space=False, use_regex=False), decoders.Strip(" ", 1, 0),
      decoders.Replace("\n ", "\n")])
  trainer = BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(texts, trainer)
  tok.post_processor = processors.TemplateProcessing(
      single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
  tok.save(str(path))
  return path


def sentencepiece_model(path: pathlib.Path, vocab_size: int = 512) -> pathlib.Path:
  """dualjax's own SentencePiece BPE, trained on 40 embedded documents."""
  tok_lib.train_sentencepiece(corpus_texts(40), path, vocab_size=vocab_size)
  return path

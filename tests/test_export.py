"""Hugging Face export: logits equal dualjax's (remote code: causal, bidirectional; plain Llama)."""

import functools
import json
import os
import pathlib
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local directories only, never the network

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dualjax import convert, export  # noqa: E402
from dualjax import model as model_lib  # noqa: E402
from dualjax import tokenizer as tok_lib  # noqa: E402
from interop_fixtures import (  # noqa: E402
    authors_style_tokenizer, corpus_texts, sentencepiece_model, tiny_model)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
REPO = pathlib.Path(__file__).resolve().parents[1]
ATOL = 1e-4


@functools.partial(jax.jit, static_argnames=("cfg", "mode"))
def _jit_apply(params, tokens, segments, prefix, cfg, mode):
  return model_lib.apply(params, tokens, segments, cfg=cfg, mode=mode,
                         prefix_len_B=prefix if mode == "prefix" else None)


def _apply(params, cfg, tokens, mode="causal", segments=None, prefix=None):
  tokens = jnp.asarray(tokens)
  segments = jnp.ones_like(tokens) if segments is None else jnp.asarray(segments)
  return np.asarray(_jit_apply(params, tokens, segments, prefix, cfg, mode))


def _logits(hf, tokens, **kw):
  with torch.no_grad():
    return hf(torch.tensor(tokens), **kw).logits.numpy()


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
  return sentencepiece_model(tmp_path_factory.mktemp("sp") / "sp.model")


@pytest.fixture(scope="module")
def dual(tmp_path_factory, sp_path):
  """A tiny 'mlp'-head model exported with remote code."""
  d = tmp_path_factory.mktemp("dual")
  cfg, params = tiny_model("mlp")
  convert.write_workdir(params, cfg, sp_path, d / "work")
  export.export(d / "work", d / "hf")
  hf, info = transformers.AutoModelForCausalLM.from_pretrained(
      d / "hf", trust_remote_code=True, output_loading_info=True)
  assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  return cfg, params, hf.eval(), d


@pytest.fixture(scope="module")
def llama(tmp_path_factory, sp_path):
  """A tiny 'linear'-head model exported as a plain LlamaForCausalLM."""
  d = tmp_path_factory.mktemp("llama")
  cfg, params = tiny_model("linear", norm_eps=1e-5, rope_theta=50_000.0)
  convert.write_workdir(params, cfg, sp_path, d / "work")
  export.export(d / "work", d / "hf", plain_llama=True)
  hf, info = transformers.AutoModelForCausalLM.from_pretrained(d / "hf", output_loading_info=True)
  assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  return cfg, params, hf.eval(), d


def test_remote_code_model_equals_dualjax(dual):
  cfg, params, hf, d = dual
  assert type(hf).__name__ == "DualjaxForCausalLM" and hf.dtype == torch.float32
  assert sorted(p.name for p in (d / "hf").iterdir()) == [
      "config.json", "configuration_dualjax.py", "dualjax_export.json", "generation_config.json",
      "model.safetensors", "modeling_dualjax.py", "tokenizer.json", "tokenizer.model",
      "tokenizer_config.json"]
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (3, 40))
  for mode in ("causal", "bidirectional"):
    want = _apply(params, cfg, tokens, mode)
    np.testing.assert_allclose(_logits(hf, tokens, attention_mode=mode), want, atol=ATOL, rtol=0)
  # Per-token flags = dualjax's prefix mode.
  prefix = np.array([0, 7, 40])
  flags = np.arange(40)[None] < prefix[:, None]
  np.testing.assert_allclose(_logits(hf, tokens, bidirectional_mask=torch.tensor(flags)),
                             _apply(params, cfg, tokens, "prefix", prefix=prefix), atol=ATOL,
                             rtol=0)
  # The modes really differ (so the comparisons above can fail).
  assert np.abs(_logits(hf, tokens, attention_mode="bidirectional")
                - _logits(hf, tokens))[:, :-1].max() > 1e-2


def test_padding_mask_equals_a_separate_segment(dual):
  """attention_mask hides padding keys, like dualjax's segment ids (right padding)."""
  cfg, params, hf, _ = dual
  tokens = np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 24))
  mask = np.ones_like(tokens)
  mask[1, 15:] = 0
  for mode in ("causal", "bidirectional"):
    got = _logits(hf, tokens, attention_mask=torch.tensor(mask), attention_mode=mode)
    want = _apply(params, cfg, tokens, mode, segments=mask)
    np.testing.assert_allclose(got[mask == 1], want[mask == 1], atol=ATOL, rtol=0)


def test_generate_with_cache(dual):
  cfg, params, hf, _ = dual
  prompt = np.random.RandomState(2).randint(16, cfg.vocab_size, (1, 9))
  kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=3, eos_token_id=None)
  with torch.no_grad():
    cached = hf.generate(torch.tensor(prompt), **kw).numpy()
    plain = hf.generate(torch.tensor(prompt), use_cache=False, **kw).numpy()
  np.testing.assert_array_equal(cached, plain)
  # The first new token is dualjax's argmax after the prompt; the whole continuation is greedy.
  full = _apply(params, cfg, cached[:, :-1])
  np.testing.assert_array_equal(full[0, 8:].argmax(-1), cached[0, 9:])


def test_plain_llama_equals_dualjax(llama):
  cfg, params, hf, d = llama
  assert type(hf).__name__ == "LlamaForCausalLM"
  assert not list((d / "hf").glob("*.py"))
  c = hf.config
  assert (c.rms_norm_eps, c.head_dim, c.num_key_value_heads, c.tie_word_embeddings) == (
      1e-5, 16, 2, False)
  assert not [k for k in hf.state_dict() if k.endswith(".bias")]
  tokens = np.random.RandomState(3).randint(0, cfg.vocab_size, (2, 48))
  np.testing.assert_allclose(_logits(hf, tokens), _apply(params, cfg, tokens), atol=ATOL, rtol=0)


def test_exported_tokenizers_encode_like_dualjax(dual, llama, sp_path, tmp_path):
  sp = tok_lib.load_tokenizer(sp_path)
  remote = transformers.AutoTokenizer.from_pretrained(dual[3] / "hf", trust_remote_code=True)
  plain = transformers.AutoTokenizer.from_pretrained(llama[3] / "hf")
  texts = corpus_texts(60)[40:] + ["", "  two  spaces\n\ttab", "naïve 日本語 🎉 \x00"]
  for t in texts:
    want = [sp.bos_id] + sp.encode(t)
    assert remote(t).input_ids == want and plain(t).input_ids == want, repr(t[:50])
    assert plain.decode(want, skip_special_tokens=True) == t
  assert (plain.bos_token_id, plain.eos_token_id, plain.pad_token_id, plain.mask_token) == (
      1, 2, 3, "<mask>")
  # A tokenizer.json workdir ships its own file unchanged.
  hf_tok = authors_style_tokenizer(tmp_path / "tokenizer.json", corpus_texts(8))
  cfg, params = tiny_model("linear")
  convert.write_workdir(params, cfg, hf_tok, tmp_path / "work")
  export.export(tmp_path / "work", tmp_path / "hf", plain_llama=True)
  assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == hf_tok.read_bytes()
  assert not (tmp_path / "hf" / "tokenizer.model").exists()
  ours = tok_lib.load_tokenizer(hf_tok)
  theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
  assert theirs(texts[0]).input_ids == [ours.bos_id] + ours.encode(texts[0])
  conf = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert (conf["bos_token_id"], conf["eos_token_id"]) == (ours.bos_id, ours.eos_id)


def test_command_line(dual, tmp_path):
  d = dual[3]
  r = subprocess.run([sys.executable, "-m", "dualjax.export", f"--workdir={d / 'work'}",
                      f"--out={tmp_path / 'hf'}"], cwd=REPO, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr
  assert "as DualjaxForCausalLM" in r.stdout
  for name in ("model.safetensors", "config.json", "tokenizer.json", "modeling_dualjax.py"):
    assert (tmp_path / "hf" / name).read_bytes() == (d / "hf" / name).read_bytes(), name


def test_bad_input(dual, tmp_path, capsys):
  work = dual[3] / "work"

  def run(*args):
    with pytest.raises(SystemExit) as e:
      export.main(["export", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    return err

  assert "head is 'mlp'" in run(f"--workdir={work}", f"--out={tmp_path / 'o'}", "--plain_llama")
  assert not (tmp_path / "o").exists()
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("keep")
  assert "exists and is not an empty directory" in run(f"--workdir={work}",
                                                       f"--out={tmp_path / 'full'}")
  assert (tmp_path / "full" / "x").read_text() == "keep"
  assert "not a dualjax workdir" in run(f"--workdir={tmp_path}", f"--out={tmp_path / 'o'}")
  assert "--workdir and --out are required" in run(f"--out={tmp_path / 'o'}")
  assert list(tmp_path.glob(".*tmp*")) == []

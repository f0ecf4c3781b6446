"""The authors' state-dict layout both ways, the workdir it becomes, and bad input."""

import dataclasses
import functools
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from dualjax import convert
from dualjax import evaluate as eval_lib
from dualjax import model as model_lib
from dualjax import tokenizer as tok_lib
from dualjax import trained
from interop_fixtures import authors_style_tokenizer, corpus_texts, tiny_model

REPO = pathlib.Path(__file__).resolve().parents[1]
MODEL_FLAGS = dict(num_heads=2, compute_dtype="float32", max_seq_len=128)


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
  d = tmp_path_factory.mktemp("sp")
  tok_lib.train_sentencepiece(corpus_texts(40), d / "sp.model", vocab_size=512)
  return d / "sp.model"


@pytest.fixture(scope="module")
def tiny():
  return tiny_model("mlp")


def _authors_file(tiny, path: pathlib.Path) -> pathlib.Path:
  convert.write_state_dict(convert.to_authors(tiny[1], tiny[0]), path)
  return path


@functools.partial(jax.jit, static_argnames=("cfg", "mode"))
def _jit_apply(params, tokens, cfg, mode):
  return model_lib.apply(params, tokens, jnp.ones_like(tokens), cfg=cfg, mode=mode)


def _apply(params, cfg, tokens, mode="causal"):
  return np.asarray(_jit_apply(params, jnp.asarray(tokens), cfg, mode))


# ------------------------------------------------------------------------------------------------
# The layout.


def test_layout_names_shapes_and_inverse(tiny):
  cfg, params = tiny
  sd = convert.to_authors(params, cfg)
  want = {"embedding.word_embedding.weight", "classifier.pre_norm.weight",
          "classifier.projection.weight", "classifier.emb2vocab.weight",
          "classifier.emb2vocab.bias"}
  for i in range(2):
    p = f"encoder.layers.{i}."
    want |= {p + "attention.pre_norm.weight", p + "attention.out_proj.weight",
             p + "mlp.pre_norm.weight", p + "mlp.down_proj.weight"}
    want |= {p + f"attention.qkv_proj.weights.{j}" for j in range(3)}
    want |= {p + f"mlp.up_proj.weights.{j}" for j in range(2)}
  assert set(sd) == want
  # PyTorch Linear weights are [out, in]; up = weights.0, gate = weights.1; q, k, v = 0, 1, 2.
  assert sd["encoder.layers.1.mlp.up_proj.weights.1"].shape == (64, 32)
  assert sd["encoder.layers.1.mlp.down_proj.weight"].shape == (32, 64)
  assert sd["classifier.emb2vocab.weight"].shape == (512, 32)
  np.testing.assert_array_equal(sd["encoder.layers.1.mlp.up_proj.weights.1"],
                                params["layers"]["mlp"]["gate"][1].T)
  np.testing.assert_array_equal(sd["encoder.layers.0.attention.qkv_proj.weights.1"],
                                params["layers"]["attn"]["k"][0].T)
  back = convert.from_authors(sd, cfg)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  assert convert.infer_config(sd, **MODEL_FLAGS) == cfg
  # A plain head: no projection and no bias.
  lcfg, lparams = tiny_model("linear")
  lsd = convert.to_authors(lparams, lcfg)
  assert set(lsd) == want - {"classifier.projection.weight", "classifier.emb2vocab.bias"}
  assert convert.infer_config(lsd, **MODEL_FLAGS).head == "linear"
  # Heads: with neither flag, head_dim is the paper's 64 (here it does not divide 32 rows).
  with pytest.raises(convert.ConvertError, match="32 rows, not num_heads x head_dim = 0 x 64"):
    convert.infer_config(sd)
  assert convert.infer_config(sd, head_dim=8).num_heads == 4
  # The paper's model from its shapes alone (no flags): every default is the paper's.
  paper = model_lib.ModelConfig()
  shapes = {k: jax.ShapeDtypeStruct(v, np.float32)
            for k, v in convert.authors_shapes(paper).items()}
  assert convert.infer_config(shapes) == paper
  assert shapes["encoder.layers.23.mlp.up_proj.weights.0"].shape == (3554, 1024)


def _authors_forward(sd, tokens, *, heads, causal, theta=160_000.0, eps=1e-7):
  """float64 NumPy re-derivation of the authors' PyTorch forward, from their tensor names."""
  f = lambda n: sd[n].astype(np.float64)
  x = f("embedding.word_embedding.weight")[tokens]
  B, L, D = x.shape
  Dh = f("encoder.layers.0.attention.qkv_proj.weights.0").shape[0] // heads
  rms = lambda x, w: x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w
  angle = np.arange(L)[:, None] * (1.0 / theta ** (np.arange(0, Dh, 2) / Dh))
  cos, sin = np.cos(np.concatenate([angle] * 2, -1)), np.sin(np.concatenate([angle] * 2, -1))
  rope = lambda t: t * cos + np.concatenate([-t[..., Dh // 2:], t[..., :Dh // 2]], -1) * sin
  split = lambda t: t.reshape(B, L, heads, Dh).transpose(0, 2, 1, 3)
  n = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
  for i in range(n):
    p = f"encoder.layers.{i}."
    h = rms(x, f(p + "attention.pre_norm.weight"))
    qkv = h @ np.concatenate([f(p + f"attention.qkv_proj.weights.{j}") for j in range(3)]).T
    q, k, v = (split(t) for t in np.split(qkv, 3, -1))
    s = rope(q) @ rope(k).swapaxes(-1, -2) / np.sqrt(Dh)
    if causal:
      s = np.where(np.tril(np.ones((L, L), bool)), s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    a = (w / w.sum(-1, keepdims=True)) @ v
    x = x + a.transpose(0, 2, 1, 3).reshape(B, L, -1) @ f(p + "attention.out_proj.weight").T
    u = rms(x, f(p + "mlp.pre_norm.weight")) @ np.concatenate(
        [f(p + "mlp.up_proj.weights.0"), f(p + "mlp.up_proj.weights.1")]).T
    up, gate = np.split(u, 2, -1)  # SwiGLU: x, gate = chunk(2); x * silu(gate)
    x = x + (up * gate / (1 + np.exp(-gate))) @ f(p + "mlp.down_proj.weight").T
  h = rms(x, f("classifier.pre_norm.weight")) @ f("classifier.projection.weight").T
  h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
  return h @ f("classifier.emb2vocab.weight").T + f("classifier.emb2vocab.bias")


@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
def test_layout_matches_an_independent_reference_of_the_authors_model(tiny, mode):
  cfg, params = tiny
  sd = convert.to_authors(params, cfg)
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 24))
  want = _authors_forward(sd, tokens, heads=2, causal=mode == "causal")
  got = _apply(convert.from_authors(sd, cfg), cfg, tokens, mode)
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# Import -> workdir -> export -> import.


def test_round_trip_is_bit_exact(tiny, sp_path, tmp_path):
  """safetensors -> workdir -> (safetensors, npz) -> workdir: the same bytes, the same logits."""
  cfg, params = tiny
  src = _authors_file(tiny, tmp_path / "authors.safetensors")
  w1, cfg1 = convert.import_checkpoint(src, sp_path, tmp_path / "w1", **MODEL_FLAGS)
  assert cfg1 == dataclasses.replace(cfg, attention_impl="auto")
  t = trained.load(w1)
  loaded, lcfg, tok, step = t.params, t.model_cfg, t.tokenizer, t.step
  assert step == 0 and lcfg == cfg1 and isinstance(tok, tok_lib.SentencePieceTokenizer)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), params)
  tokens = np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 16))
  for mode in ("causal", "bidirectional"):
    np.testing.assert_array_equal(_apply(loaded, lcfg, tokens, mode),
                                  _apply(params, cfg, tokens, mode))
  prov = json.loads((w1 / convert.PROVENANCE_FILE).read_text())
  assert prov["source"]["sha256"] == convert.sha256_file(src)
  assert prov["source"]["format"] == "safetensors" and prov["tokenizer"]["kind"] == "sentencepiece"
  assert json.loads((w1 / "config.json").read_text())["objective"]["lam"] is None
  a, _ = convert.read_state_dict(src)
  for suffix in (".safetensors", ".npz"):
    back = tmp_path / f"back{suffix}"
    convert.export_checkpoint(w1, back)
    b, info = convert.read_state_dict(back)
    assert info["format"] == suffix[1:] and a.keys() == b.keys()
    for k in a:
      assert b[k].dtype == np.float32 and a[k].tobytes() == b[k].tobytes(), (suffix, k)
  w2, _ = convert.import_checkpoint(tmp_path / "back.npz", sp_path, tmp_path / "w2",
                                    **MODEL_FLAGS)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(trained.load(w2).params),
               params)


def test_export_metadata_carries_what_shapes_cannot_tell(tiny, sp_path, tmp_path):
  cfg, _ = tiny
  w1, _ = convert.import_checkpoint(_authors_file(tiny, tmp_path / "a.safetensors"), sp_path,
                                    tmp_path / "w1", rope_theta=1e4, norm_eps=1e-5, **MODEL_FLAGS)
  convert.export_checkpoint(w1, tmp_path / "b.safetensors")
  _, cfg2 = convert.import_checkpoint(tmp_path / "b.safetensors", sp_path, tmp_path / "w2")
  assert (cfg2.num_heads, cfg2.rope_theta, cfg2.norm_eps, cfg2.max_seq_len, cfg2.compute_dtype) \
      == (2, 1e4, 1e-5, 128, "float32")


def test_readers_pickle_bf16_and_prefixes(tiny, tmp_path):
  torch = pytest.importorskip("torch")
  cfg, params = tiny
  sd = convert.to_authors(params, cfg)
  tsd = {f"module.{k}": torch.tensor(v) for k, v in sd.items()}
  torch.save({"model": tsd, "optimizer": {"lr": 0.1}, "global_step": 3}, tmp_path / "resume.bin")
  got, info = convert.read_state_dict(tmp_path / "resume.bin", allow_pickle=True)
  assert info["format"] == "pickle" and info["stripped_prefix"] == "module."
  jax.tree.map(np.testing.assert_array_equal, convert.from_authors(got, cfg), params)
  # bfloat16 safetensors (the authors train in bf16 autocast): read exactly, as float32.
  import safetensors.torch  # pylint: disable=import-outside-toplevel
  bf = {k: v.to(torch.bfloat16) for k, v in tsd.items()}
  safetensors.torch.save_file(bf, str(tmp_path / "bf16.safetensors"))
  got, info = convert.read_state_dict(tmp_path / "bf16.safetensors")
  assert info["dtypes"] == ["BF16"]
  k = "encoder.layers.1.mlp.down_proj.weight"
  np.testing.assert_array_equal(got[k], bf[f"module.{k}"].float().numpy())


# ------------------------------------------------------------------------------------------------
# The command line, evaluation of the result, the authors' tokenizer.


def test_cli_import_then_evaluate(tiny, sp_path, tmp_path, eval_data_dir):
  src = _authors_file(tiny, tmp_path / "authors.safetensors")
  out = tmp_path / "work"
  r = subprocess.run([sys.executable, "-m", "dualjax.convert", f"--import_from={src}",
                      f"--tokenizer={sp_path}", f"--out={out}", "--num_heads=2",
                      "--compute_dtype=float32", "--lam=0.5"],
                     cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  assert "imported" in r.stdout and (out / "checkpoints" / "0").is_dir()
  rc = eval_lib.main(["evaluate", f"--workdir={out}", "--config.eval.tasks=arc_easy",
                      "--config.eval.limit=3", "--config.eval.modes=ar",
                      f"--config.eval.data_dir={eval_data_dir}", f"--out={tmp_path / 'eval.json'}"])
  assert rc == 0
  res = json.loads((tmp_path / "eval.json").read_text())
  assert res["tasks"]["arc_easy"]["num_examples"] == 3 and res["step"] == 0
  assert set(res["tasks"]["arc_easy"]["modes"]) == {"ar"}


def test_hf_tokenizer_is_picked_up_from_the_imported_workdir(tiny, tmp_path):
  hf = authors_style_tokenizer(tmp_path / "tokenizer.json", corpus_texts(8), vocab_size=400)
  src = _authors_file(tiny, tmp_path / "authors.safetensors")
  w, _ = convert.import_checkpoint(src, hf, tmp_path / "w", **MODEL_FLAGS)
  prov = json.loads((w / convert.PROVENANCE_FILE).read_text())
  assert prov["tokenizer"]["kind"] == "tokenizers"
  assert prov["tokenizer"]["sha256"] == tok_lib.file_checksum(hf)
  assert prov["tokenizer"]["special_ids"] == {"unk": 0, "bos": 1, "eos": 2, "pad": 3, "mask": 4}
  tok = trained.load(w).tokenizer
  assert isinstance(tok, tok_lib.HFTokenizer) and tok.checksum == tok_lib.file_checksum(hf)
  text = corpus_texts(30)[-1]
  assert tok.decode(tok.encode(text)) == text


def test_special_token_flags_map_a_foreign_tokenizer(tiny, tmp_path, capsys):
  hf = authors_style_tokenizer(tmp_path / "t.json", corpus_texts(4), vocab_size=300,
                               specials=["<unk>", "<|endoftext|>", "<pad>", "[MASK]"],
                               bos="<|endoftext|>")
  src = _authors_file(tiny, tmp_path / "authors.safetensors")
  args = [f"--import_from={src}", f"--tokenizer={hf}", f"--out={tmp_path / 'w'}", "--num_heads=2"]
  msg = _main(capsys, *args)
  assert f"tokenizer file {hf} has no bos token '<s>'" in msg and "--bos_token" in msg
  assert not (tmp_path / "w").exists()
  assert convert.main(["convert", *args, "--bos_token=<|endoftext|>", "--eos_token=<|endoftext|>",
                       "--mask_token=[MASK]"]) == 0
  prov = json.loads((tmp_path / "w" / convert.PROVENANCE_FILE).read_text())
  assert prov["tokenizer"]["special_ids"] == {"unk": 0, "bos": 1, "eos": 1, "pad": 2, "mask": 3}


# ------------------------------------------------------------------------------------------------
# Bad input: one line naming the tensor or file, exit 2, nothing written.


def _main(capsys, *args):
  with pytest.raises(SystemExit) as e:
    convert.main(["convert", *args])
  err = capsys.readouterr().err
  assert e.value.code == 2, err
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  return lines[0]


def test_bad_input(tiny, sp_path, tmp_path, capsys):
  cfg, params = tiny
  sd = convert.to_authors(params, cfg)
  out = tmp_path / "out"
  imp = lambda f, *a: _main(capsys, f"--import_from={f}", f"--tokenizer={sp_path}",
                            f"--out={out}", "--num_heads=2", *a)

  def save(name, state):
    safetensors.numpy.save_file(state, str(tmp_path / name))
    return tmp_path / name

  missing = dict(sd)
  del missing["encoder.layers.1.mlp.down_proj.weight"]
  assert "missing tensor encoder.layers.1.mlp.down_proj.weight" in imp(save("m.safetensors",
                                                                           missing))
  bad = dict(sd, **{"classifier.emb2vocab.bias": np.zeros(511, np.float32)})
  msg = imp(save("s.safetensors", bad))
  assert "tensor classifier.emb2vocab.bias has shape [511], expected [512]" in msg
  extra = dict(sd, **{"encoder.layers.0.attention.rope.inv_freq": np.zeros(8, np.float32)})
  assert "unknown tensor encoder.layers.0.attention.rope.inv_freq" in imp(
      save("x.safetensors", extra))
  # A model whose vocabulary is smaller than the tokenizer's.
  scfg, sparams = tiny_model("mlp", vocab_size=400)
  msg = imp(save("v.safetensors", convert.to_authors(sparams, scfg)))
  assert f"--tokenizer {sp_path}: its vocabulary of 512 is larger than the model's 400" in msg
  # A pickle without the opt-in is refused before it is opened (it need not even exist).
  assert "authors.bin is a PyTorch pickle" in imp(tmp_path / "authors.bin")
  assert "--allow_pickle" in imp(tmp_path / "authors.bin")
  assert "unknown state-dict format" in imp(tmp_path / "authors.ckpt")
  assert "g.safetensors: not a readable safetensors file" in imp(_garbage(tmp_path /
                                                                         "g.safetensors"))
  assert not out.exists()
  # An existing non-empty output is never touched.
  out.mkdir()
  (out / "keep").write_text("x")
  assert f"--out {out} exists and is not an empty directory" in imp(save("ok.safetensors", sd))
  assert (out / "keep").read_text() == "x" and len(list(out.iterdir())) == 1
  # Export: an existing file is not overwritten; a missing workdir is named.
  assert "--workdir " in _main(capsys, f"--export_to={tmp_path / 'e.npz'}",
                               f"--workdir={tmp_path / 'nope'}")
  assert "exactly one of" in _main(capsys, f"--out={out}")
  assert list(tmp_path.glob(".*tmp*")) == []


def _garbage(path: pathlib.Path) -> pathlib.Path:
  path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
  return path

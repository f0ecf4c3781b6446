"""Export a dualjax workdir to a Hugging Face model directory.

  python -m dualjax.export --workdir=DIR --out=HFDIR [--step=N] [--plain_llama]

Writes into HFDIR (absent or empty; built beside it and renamed into place):
  model.safetensors        float32 weights, Llama names ([out, in] Linear weights):
                           model.embed_tokens.weight, model.layers.{i}.{input_layernorm,
                           self_attn.{q,k,v,o}_proj, post_attention_layernorm,
                           mlp.{gate,up,down}_proj}.weight, model.norm.weight (the head's norm),
                           head_proj.weight ('mlp' head), lm_head.weight, lm_head.bias ('mlp')
  config.json              DualjaxConfig with auto_map (or, --plain_llama, a LlamaConfig)
  configuration_dualjax.py, modeling_dualjax.py   our model code (not with --plain_llama)
  tokenizer.json, tokenizer_config.json           a fast tokenizer (PreTrainedTokenizerFast)
  tokenizer.model          the SentencePiece model itself, when the workdir has one
  generation_config.json, dualjax_export.json     special ids; where the export came from

Default: `AutoModelForCausalLM.from_pretrained(HFDIR, trust_remote_code=True)` gives
DualjaxForCausalLM, a causal LM (generate() with a KV cache works) whose forward also takes
attention_mode='bidirectional' or per-token `bidirectional_mask` flags (prefix mode) for masked
use (see dualjax/hf/modeling_dualjax.py). `AutoTokenizer.from_pretrained(HFDIR,
trust_remote_code=True)` (the flag only because config.json names remote code; the tokenizer
itself is a plain PreTrainedTokenizerFast).
--plain_llama: a standard LlamaForCausalLM (no remote code). Our blocks are Llama blocks
(rotate-half RoPE on the q/k projections as stored, SwiGLU, RMSNorm, no biases, untied
embeddings), so this is exact for a model with the plain 'linear' head (norm -> Linear); the
'mlp' head (Linear -> GELU -> Linear + bias) has no Llama equivalent and is refused.

Tokenizer: a tokenizer.json workdir tokenizer is copied. A SentencePiece model is converted to
an equivalent tokenizer.json (its BPE merges in piece order, byte fallback, ' ' <-> U+2581, no
pre-splitting); the conversion encodes every text like dualjax except text that contains U+2581
itself (dualjax encodes it as three byte pieces, the tokenizer.json as a space). Its post-
processor adds <s> (BOS) in front, as dualjax's scoring and training do; like any Hugging Face
tokenizer it maps special tokens' text (e.g. "<mask>") to their ids, which dualjax never does.

Bad input (not a workdir, an 'mlp' head with --plain_llama, an output that exists) is one line
on stderr, exit code 2, before anything is written.
"""

import dataclasses
import datetime
import json
import os
import pathlib
import shutil
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
import safetensors.numpy
import tokenizers
from absl import flags

from dualjax import checkpoint as ckpt_lib
from dualjax import cli
from dualjax import config_lib
from dualjax import model as model_lib
from dualjax import tokenizer as tok_lib
from dualjax import trained
from dualjax import workdir as workdir_lib
from dualjax.errors import ConfigError

HF_DIR = pathlib.Path(__file__).resolve().parent / "hf"
MODEL_FILES = ("configuration_dualjax.py", "modeling_dualjax.py")
_LAYER = (("input_layernorm.weight", ("attn_norm",), False),
          ("self_attn.q_proj.weight", ("attn", "q"), True),
          ("self_attn.k_proj.weight", ("attn", "k"), True),
          ("self_attn.v_proj.weight", ("attn", "v"), True),
          ("self_attn.o_proj.weight", ("attn", "o"), True),
          ("post_attention_layernorm.weight", ("mlp_norm",), False),
          ("mlp.gate_proj.weight", ("mlp", "gate"), True),
          ("mlp.up_proj.weight", ("mlp", "up"), True),
          ("mlp.down_proj.weight", ("mlp", "down"), True))
_HEAD = (("model.norm.weight", "norm", False), ("head_proj.weight", "proj", True),
         ("lm_head.weight", "out", True), ("lm_head.bias", "out_bias", False))


class ExportError(ValueError):
  """Bad export input; one line naming the flag or file."""


def hf_state_dict(params: Mapping[str, Any], cfg: model_lib.ModelConfig) -> dict[str, np.ndarray]:
  """Our params -> Hugging Face (Llama-named) float32 tensors."""
  params = jax.device_get(params)
  out = {"model.embed_tokens.weight": np.asarray(params["embed"])}
  for i in range(cfg.num_layers):
    for name, path, t in _LAYER:
      x = np.asarray(params["layers"][path[0]] if len(path) == 1
                     else params["layers"][path[0]][path[1]])[i]
      out[f"model.layers.{i}.{name}"] = x.T if t else x
  for name, key, t in _HEAD:
    if key in params["head"]:
      x = np.asarray(params["head"][key])
      out[name] = x.T if t else x
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def hf_config(cfg: model_lib.ModelConfig, special_ids: Mapping[str, int], *,
              plain_llama: bool) -> dict[str, Any]:
  """config.json for DualjaxForCausalLM (remote code) or a plain LlamaForCausalLM."""
  common = {
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_heads,
      "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_seq_len,
      "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
      "bos_token_id": special_ids["bos"], "eos_token_id": special_ids["eos"],
      "pad_token_id": special_ids["pad"], "tie_word_embeddings": False, "use_cache": True,
      "dtype": "float32",
  }
  if plain_llama:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common,
            "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0,
            "mlp_bias": False, "pretraining_tp": 1, "initializer_range": 0.02,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}}
  return {"architectures": ["DualjaxForCausalLM"], "model_type": "dualjax",
          "auto_map": {"AutoConfig": "configuration_dualjax.DualjaxConfig",
                       "AutoModel": "modeling_dualjax.DualjaxModel",
                       "AutoModelForCausalLM": "modeling_dualjax.DualjaxForCausalLM"},
          **common, "head": cfg.head, "attention_mode": "causal",
          "mask_token_id": special_ids["mask"]}


def sentencepiece_to_tokenizers(tok: tok_lib.SentencePieceTokenizer) -> tokenizers.Tokenizer:
  """An equivalent `tokenizers` BPE (see the module docstring for the one difference)."""
  sp = tok.sp
  n = sp.get_piece_size()
  vocab = {sp.id_to_piece(i): i for i in range(n)}
  special = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
  normal = {sp.id_to_piece(i) for i in range(n)
            if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))}
  merges = []
  for i in range(n):  # SentencePiece BPE merges in piece order (its pieces are scored by rank)
    p = sp.id_to_piece(i)
    if p in normal:
      merges += sorted(((p[:k], p[k:]) for k in range(1, len(p))
                        if p[:k] in normal and p[k:] in normal),
                       key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
  unk = sp.id_to_piece(tok.unk_id)
  t = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges, unk_token=unk,
                                                 byte_fallback=True))
  t.normalizer = tokenizers.normalizers.Replace(" ", "\u2581")
  t.decoder = tokenizers.decoders.Sequence([tokenizers.decoders.Replace("\u2581", " "),
                                            tokenizers.decoders.ByteFallback(),
                                            tokenizers.decoders.Fuse()])
  t.add_special_tokens([tokenizers.AddedToken(sp.id_to_piece(i), special=True, normalized=False)
                        for i in special])
  bos = sp.id_to_piece(tok.bos_id)
  t.post_processor = tokenizers.processors.TemplateProcessing(
      single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.bos_id)])
  return t


def tokenizer_files(tok: tok_lib.Tokenizer, max_len: int) -> dict[str, bytes]:
  """tokenizer.json, tokenizer_config.json (+ tokenizer.model for a SentencePiece workdir)."""
  files: dict[str, bytes] = {}
  if isinstance(tok, tok_lib.SentencePieceTokenizer):
    files["tokenizer.json"] = sentencepiece_to_tokenizers(tok).to_str().encode()
    files["tokenizer.model"] = tok.path.read_bytes()
  else:
    files["tokenizer.json"] = tok.path.read_bytes()
  ids = tok.special_ids
  conf = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
          "clean_up_tokenization_spaces": False,
          **{f"{r}_token": tok.id_to_piece(ids[r]) for r in tok_lib.SPECIAL_ROLES}}
  files["tokenizer_config.json"] = (json.dumps(conf, indent=2) + "\n").encode()
  return files


def _model_config(workdir: pathlib.Path) -> model_lib.ModelConfig:
  f = workdir / workdir_lib.CONFIG_FILE
  if not f.is_file():
    raise ExportError(f"--workdir {workdir}: not a dualjax workdir (no {f.name})")
  try:
    return config_lib.model_config(ml_collections.ConfigDict(json.loads(f.read_text())))
  except (ValueError, TypeError, AttributeError, ConfigError) as e:
    raise ExportError(f"{f}: {cli.one_line(e)}") from None


def export(workdir: str | os.PathLike, out: str | os.PathLike, *, step: int | None = None,
           plain_llama: bool = False) -> tuple[pathlib.Path, int]:
  """Writes the Hugging Face directory `out` (see the module docstring); returns (out, step)."""
  workdir, out = pathlib.Path(workdir), pathlib.Path(out)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise ExportError(f"--out {out} exists and is not an empty directory")
  cfg = _model_config(workdir)
  if plain_llama and cfg.head != "linear":
    raise ExportError(f"--plain_llama: the model's head is {cfg.head!r} (norm -> Linear -> GELU -> "
                      "Linear + bias), which LlamaForCausalLM cannot express; only head='linear' "
                      "models export as plain Llama (drop --plain_llama for remote code)")
  t = trained.load(workdir, step)
  params, cfg, tok, step = t.params, t.model_cfg, t.tokenizer, t.step
  files = {"config.json": (json.dumps(hf_config(cfg, tok.special_ids, plain_llama=plain_llama),
                                      indent=2) + "\n").encode()}
  files.update(tokenizer_files(tok, cfg.max_seq_len))
  files["generation_config.json"] = (json.dumps({
      "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id},
      indent=2) + "\n").encode()
  files["dualjax_export.json"] = (json.dumps({
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "workdir": str(workdir.absolute()), "step": step, "plain_llama": plain_llama,
      "tokenizer": {"kind": tok.kind, "sha256": tok.checksum, "special_ids": tok.special_ids},
      "model": dataclasses.asdict(cfg)}, indent=2) + "\n").encode()
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir()
  try:
    safetensors.numpy.save_file(hf_state_dict(params, cfg), str(tmp / "model.safetensors"),
                                metadata={"format": "pt"})
    os.chmod(tmp / "model.safetensors", 0o644)  # the library writes 0600
    for name, data in files.items():
      (tmp / name).write_bytes(data)
    if not plain_llama:
      for name in MODEL_FILES:
        shutil.copyfile(HF_DIR / name, tmp / name)
    if out.exists():
      out.rmdir()
    os.replace(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out, step


FLAGS = flags.FlagValues()  # this CLI's own flags (convert and main define --workdir/--out too)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "the dualjax workdir (or <workdir>/checkpoints/N)", flag_values=FLAGS)
_OUT = flags.DEFINE_string(
    "out", None, "the Hugging Face directory to create (absent or empty)", flag_values=FLAGS)
_STEP = flags.DEFINE_integer(
    "step", None, "checkpoint step (default: the newest)", flag_values=FLAGS)
_PLAIN_LLAMA = flags.DEFINE_bool(
    "plain_llama", False, "write a standard LlamaForCausalLM (no remote code; only for models "
    "with head='linear')", flag_values=FLAGS)


def main(argv: list[str]) -> int:
  if cli.parse(argv, __doc__, FLAGS) is None:
    return 0
  if not _WORKDIR.value or not _OUT.value:
    cli.fail("--workdir and --out are required")
  try:
    out, step = export(_WORKDIR.value, _OUT.value, step=_STEP.value,
                       plain_llama=_PLAIN_LLAMA.value)
  except (ExportError, tok_lib.TokenizerError, ckpt_lib.CheckpointError, ValueError) as e:
    cli.fail(cli.one_line(e))
  kind = "LlamaForCausalLM" if _PLAIN_LLAMA.value else "DualjaxForCausalLM (trust_remote_code)"
  print(f"exported step {step} of {_WORKDIR.value} to {out} as {kind}")
  return 0


if __name__ == "__main__":
  cli.run(main)

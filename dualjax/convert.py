"""The authors' PyTorch state-dict layout <-> dualjax workdirs (DESIGN.md §2).

  python -m dualjax.convert --import_from=FILE --tokenizer=TOKENIZER --out=WORKDIR
      [--num_heads=N | --head_dim=H] [--rope_theta=T] [--norm_eps=E] [--max_seq_len=L]
      [--compute_dtype=bfloat16] [--lam=X] [--step=0] [--allow_pickle] [--bos_token=<s> ...]
  python -m dualjax.convert --export_to=FILE --workdir=WORKDIR [--step=N]

Layout (github.com/ltgoslo/dual-language-models; PyTorch Linear weights are [out, in], the
transpose of our [in, out] kernels):
  embedding.word_embedding.weight [V, D]
  encoder.layers.{i}.attention.pre_norm.weight [D]
  encoder.layers.{i}.attention.qkv_proj.weights.{0,1,2} (q, k, v) [H*Dh, D]
  encoder.layers.{i}.attention.out_proj.weight [D, H*Dh]
  encoder.layers.{i}.mlp.pre_norm.weight [D]
  encoder.layers.{i}.mlp.up_proj.weights.{0 (up), 1 (gate)} [F, D]
  encoder.layers.{i}.mlp.down_proj.weight [D, F]
  classifier.pre_norm.weight [D]  classifier.projection.weight [D, D] ('mlp' head only)
  classifier.emb2vocab.weight [V, D]  classifier.emb2vocab.bias [V] ('mlp' head only)

Import reads `.safetensors` or NumPy `.npz`; a PyTorch pickle (`.bin`/`.pt`/`.pth`) only with
--allow_pickle, through `torch.load(weights_only=True)` (a plain state dict, or the authors'
resume file with the state dict under "model"). A prefix `module.` / `_orig_mod.` on every name
(DDP, torch.compile) is removed. Layers, d_model, mlp_dim, vocabulary and head kind come from the
shapes; what shapes cannot tell comes from flags, else from the file's dualjax metadata (our own
exports), else the paper's values (16 heads x 64, theta 160 000, eps 1e-7, 2048 positions).
The tokenizer (SentencePiece .model or tokenizer.json; its special ids mapped by content, see
dualjax.tokenizer) must fit the vocabulary. The workdir is written by `write_workdir`.

Export writes the newest (or --step) checkpoint of a workdir in the same layout: `.safetensors`
(with the model config in its metadata) or `.npz`, float32.

Bad input (missing or extra tensors, a shape that does not fit, a tokenizer larger than the
vocabulary, a pickle without --allow_pickle, an existing output) is one line on stderr naming the
tensor or file, exit code 2, before anything is written.
"""

import dataclasses
import datetime
import hashlib
import json
import os
import pathlib
import re
import shutil
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import safetensors
import safetensors.numpy
from absl import flags

from dualjax import checkpoint as ckpt_lib
from dualjax import cli
from dualjax import config_lib
from dualjax import mesh as mesh_lib
from dualjax import model as model_lib
from dualjax import tokenizer as tok_lib
from dualjax import state as state_lib
from dualjax import trained
from dualjax import workdir as workdir_lib

PROVENANCE_FILE = workdir_lib.PROVENANCE_FILE
METADATA_KEY = "dualjax_model_config"  # safetensors metadata of our exports
STATE_FORMATS = {".safetensors": "safetensors", ".npz": "npz", ".bin": "pickle", ".pt": "pickle",
                 ".pth": "pickle"}
_PREFIXES = ("module.", "_orig_mod.")
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")

# (authors' name, our path, transposed): per layer under `encoder.layers.{i}.`, then the head.
_LAYER = (
    ("attention.pre_norm.weight", ("attn_norm",), False),
    ("attention.qkv_proj.weights.0", ("attn", "q"), True),
    ("attention.qkv_proj.weights.1", ("attn", "k"), True),
    ("attention.qkv_proj.weights.2", ("attn", "v"), True),
    ("attention.out_proj.weight", ("attn", "o"), True),
    ("mlp.pre_norm.weight", ("mlp_norm",), False),
    ("mlp.up_proj.weights.0", ("mlp", "up"), True),
    ("mlp.up_proj.weights.1", ("mlp", "gate"), True),
    ("mlp.down_proj.weight", ("mlp", "down"), True),
)
_HEAD = (
    ("classifier.pre_norm.weight", ("norm",), False),
    ("classifier.projection.weight", ("proj",), True),
    ("classifier.emb2vocab.weight", ("out",), True),
    ("classifier.emb2vocab.bias", ("out_bias",), False),
)
EMBED = "embedding.word_embedding.weight"


class ConvertError(ValueError):
  """Bad conversion input; the message is one line naming the tensor, flag or file."""


# ------------------------------------------------------------------------------------------------
# The layout mapping.

def _entries(cfg: model_lib.ModelConfig) -> list[tuple[str, tuple[str, ...], int | None, bool]]:
  """(authors' name, our params path, layer index or None, transposed) for every tensor."""
  out: list[tuple[str, tuple[str, ...], int | None, bool]] = [(EMBED, ("embed",), None, False)]
  for i in range(cfg.num_layers):
    out += [(f"encoder.layers.{i}.{n}", ("layers",) + p, i, t) for n, p, t in _LAYER]
  heads = {"mlp": ("norm", "proj", "out", "out_bias"), "linear": ("norm", "out")}[cfg.head]
  out += [(n, ("head",) + p, None, t) for n, p, t in _HEAD if p[0] in heads]
  return out


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
  for k in path:
    tree = tree[k]
  return tree


def authors_shapes(cfg: model_lib.ModelConfig) -> dict[str, tuple[int, ...]]:
  """Name -> shape of every tensor of `cfg` in the authors' layout."""
  abstract = jax.eval_shape(lambda: model_lib.init(cfg, jax.random.key(0)))
  out = {}
  for name, path, i, t in _entries(cfg):
    shape = tuple(_get(abstract, path).shape)[(0 if i is None else 1):]
    out[name] = shape[::-1] if t else shape
  return out


def to_authors(params: Mapping[str, Any], cfg: model_lib.ModelConfig) -> dict[str, np.ndarray]:
  """Our params -> the authors' state dict (NumPy, [out, in] weights, params' dtype)."""
  out = {}
  for name, path, i, t in _entries(cfg):
    x = np.asarray(_get(params, path))
    if i is not None:
      x = x[i]
    out[name] = np.ascontiguousarray(x.T if t else x)
  return out


def from_authors(state: Mapping[str, np.ndarray], cfg: model_lib.ModelConfig,
                 where: str = "state dict") -> dict[str, Any]:
  """The authors' state dict -> our params (NumPy float32). Checks names and shapes first."""
  check_state(state, cfg, where)
  pd = np.dtype(cfg.param_dtype)
  params: dict[str, Any] = {"layers": {}}
  per_layer: dict[tuple[str, ...], list[np.ndarray]] = {}
  for name, path, i, t in _entries(cfg):
    x = np.asarray(state[name])
    x = (x.T if t else x).astype(pd)
    if i is None:
      node = params
      for k in path[:-1]:
        node = node.setdefault(k, {})
      node[path[-1]] = np.ascontiguousarray(x)
    else:
      per_layer.setdefault(path, []).append(x)
  for path, xs in per_layer.items():
    node = params
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = np.stack(xs)
  return params


def check_state(state: Mapping[str, Any], cfg: model_lib.ModelConfig, where: str) -> None:
  """Raises ConvertError naming the first missing tensor, misshapen tensor or unknown tensor."""
  want = authors_shapes(cfg)
  for name in want:
    if name not in state:
      raise ConvertError(f"{where}: missing tensor {name}")
  for name, shape in want.items():
    if tuple(state[name].shape) != shape:
      raise ConvertError(f"{where}: tensor {name} has shape {list(state[name].shape)}, expected "
                         f"{list(shape)} (model: {_describe_cfg(cfg)})")
  extra = sorted(set(state) - set(want))
  if extra:
    if cfg.head == "linear" and "classifier.emb2vocab.bias" in extra:
      raise ConvertError(f"{where}: tensor classifier.emb2vocab.bias without "
                         "classifier.projection.weight: dualjax's 'linear' head has no bias")
    more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
    raise ConvertError(f"{where}: unknown tensor {extra[0]}{more}")


def _describe_cfg(cfg: model_lib.ModelConfig) -> str:
  return (f"{cfg.num_layers} layers, d_model {cfg.d_model}, {cfg.num_heads}x{cfg.head_dim} "
          f"heads, mlp_dim {cfg.mlp_dim}, vocab {cfg.vocab_size}, head {cfg.head}")


def infer_config(state: Mapping[str, Any], where: str = "state dict",
                 **overrides: Any) -> model_lib.ModelConfig:
  """A ModelConfig from the shapes; `overrides` (not None) set the rest (heads, rope, eps, ...).

  num_heads / head_dim: give one or both; with neither, head_dim is the paper's 64.
  """
  def tensor(name: str, ndim: int) -> tuple[int, ...]:
    if name not in state:
      raise ConvertError(f"{where}: missing tensor {name}")
    shape = tuple(state[name].shape)
    if len(shape) != ndim:
      raise ConvertError(f"{where}: tensor {name} has shape {list(shape)}, expected {ndim} dims")
    return shape

  V, D = tensor(EMBED, 2)
  layers = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
  if not layers:
    raise ConvertError(f"{where}: no encoder.layers.* tensors")
  hd = tensor("encoder.layers.0.attention.qkv_proj.weights.0", 2)[0]
  mlp_dim = tensor("encoder.layers.0.mlp.up_proj.weights.0", 2)[0]
  o = {k: v for k, v in overrides.items() if v is not None}
  heads, head_dim = o.pop("num_heads", None), o.pop("head_dim", None)
  if heads is None and head_dim is None:
    head_dim = model_lib.ModelConfig.head_dim
  if heads is None:
    heads = hd // head_dim
  if head_dim is None:
    head_dim = hd // heads if heads > 0 else 0
  if heads * head_dim != hd:
    raise ConvertError(f"{where}: encoder.layers.0.attention.qkv_proj.weights.0 has {hd} rows, "
                       f"not num_heads x head_dim = {heads} x {head_dim} (set --num_heads or "
                       "--head_dim)")
  head = "mlp" if "classifier.projection.weight" in state else "linear"
  try:
    return model_lib.ModelConfig(
        vocab_size=V, num_layers=max(layers) + 1, d_model=D, num_heads=heads, head_dim=head_dim,
        mlp_dim=mlp_dim, head=head, **o)
  except (TypeError, ValueError) as e:
    raise ConvertError(f"{where}: {e}") from None


# ------------------------------------------------------------------------------------------------
# Files.

def state_format(path: str | os.PathLike) -> str:
  """'safetensors' | 'npz' | 'pickle' from the file name; ConvertError for anything else."""
  fmt = STATE_FORMATS.get(pathlib.Path(path).suffix.lower())
  if fmt is None:
    raise ConvertError(f"{path}: unknown state-dict format (expected .safetensors or .npz, or "
                       ".bin/.pt/.pth with --allow_pickle)")
  return fmt


def read_state_dict(path: str | os.PathLike, *, allow_pickle: bool = False
                    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(name -> float32 array, info: format, source dtypes, stripped prefix, file metadata)."""
  path = pathlib.Path(path)
  fmt = state_format(path)
  if fmt == "pickle" and not allow_pickle:
    raise ConvertError(f"{path} is a PyTorch pickle, which can run code when loaded; pass "
                       "--allow_pickle to read it with torch.load(weights_only=True), or convert "
                       "it to .safetensors")
  if not path.is_file():
    raise ConvertError(f"{path}: file not found")
  metadata: dict[str, str] = {}
  if fmt == "safetensors":
    state, dtypes, metadata = _read_safetensors(path)
  elif fmt == "npz":
    state, dtypes = _read_npz(path)
  else:
    state, dtypes = _read_pickle(path)
  if not state:
    raise ConvertError(f"{path}: no tensors")
  stripped = ""
  for prefix in _PREFIXES * 2:  # e.g. module._orig_mod.
    if all(k.startswith(prefix) for k in state):
      state = {k[len(prefix):]: v for k, v in state.items()}
      stripped += prefix
  return state, {"format": fmt, "dtypes": sorted(set(dtypes)), "stripped_prefix": stripped,
                 "metadata": metadata}


def _read_safetensors(path: pathlib.Path):
  state, dtypes = {}, []
  try:
    with safetensors.safe_open(str(path), framework="np") as f:
      metadata = dict(f.metadata() or {})
      bf16 = []
      for k in f.keys():
        dt = f.get_slice(k).get_dtype()
        if dt not in _FLOAT_DTYPES:
          raise ConvertError(f"{path}: tensor {k} has dtype {dt}, expected floating point")
        dtypes.append(dt)
        if dt == "BF16":
          bf16.append(k)  # NumPy has no bfloat16: read through JAX below
        else:
          state[k] = f.get_tensor(k).astype(np.float32)
    if bf16:
      with safetensors.safe_open(str(path), framework="flax") as f:
        for k in bf16:
          state[k] = np.asarray(jax.device_get(f.get_tensor(k)).astype(np.float32))
  except ConvertError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise ConvertError(f"{path}: not a readable safetensors file ({cli.one_line(e)})") from None
  return state, dtypes, metadata


def _read_npz(path: pathlib.Path):
  state, dtypes = {}, []
  try:
    with np.load(path, allow_pickle=False) as z:
      for k in z.files:
        a = z[k]
        if a.dtype.kind != "f":
          raise ConvertError(f"{path}: array {k} has dtype {a.dtype}, expected floating point")
        dtypes.append(str(a.dtype))
        state[k] = a.astype(np.float32)
  except ConvertError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise ConvertError(f"{path}: not a readable NumPy .npz archive ({cli.one_line(e)})") from None
  return state, dtypes


def _read_pickle(path: pathlib.Path):
  try:
    import torch  # pylint: disable=import-outside-toplevel  (optional dependency)
  except ImportError:
    raise ConvertError(f"{path}: reading a PyTorch pickle needs torch installed") from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ConvertError(f"{path}: torch.load(weights_only=True) failed ({cli.one_line(e)})") from None
  if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and not any(
      isinstance(v, torch.Tensor) for v in obj.values()):
    obj = obj["model"]  # the authors' resume file: {"model": state_dict, "optimizer": ...}
  if not isinstance(obj, dict):
    raise ConvertError(f"{path}: holds a {type(obj).__name__}, not a state dict")
  state, dtypes = {}, []
  for k, v in obj.items():
    if not isinstance(v, torch.Tensor) or not v.is_floating_point():
      raise ConvertError(f"{path}: entry {k} is not a floating-point tensor")
    dtypes.append(str(v.dtype).replace("torch.", ""))
    state[str(k)] = v.detach().to(torch.float32).contiguous().numpy()
  return state, dtypes


def write_state_dict(state: Mapping[str, np.ndarray], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> None:
  """Writes .safetensors (with `metadata`) or .npz atomically; an existing file is refused."""
  path = pathlib.Path(path)
  fmt = state_format(path)
  if fmt == "pickle":
    raise ConvertError(f"{path}: export writes .safetensors or .npz, not a pickle")
  if path.exists():
    raise ConvertError(f"{path} exists; remove it or choose another file")
  if not path.parent.is_dir():
    raise ConvertError(f"{path}: directory {path.parent} does not exist")
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  try:
    arrays = {k: np.ascontiguousarray(v) for k, v in state.items()}
    if fmt == "safetensors":
      safetensors.numpy.save_file(arrays, str(tmp), metadata=dict(metadata or {}))
      os.chmod(tmp, 0o644)  # the library writes 0600
    else:
      with tmp.open("wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def sha256_file(path: str | os.PathLike) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 24), b""):
      h.update(chunk)
  return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# The workdir.

def check_out_dir(out: str | os.PathLike) -> pathlib.Path:
  """`out` as a Path if it can be created (absent or an empty directory), else ConvertError."""
  out = pathlib.Path(out)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise ConvertError(f"--out {out} exists and is not an empty directory")
  return out


def write_workdir(params: Any, model_cfg: model_lib.ModelConfig,
                  tokenizer_path: str | os.PathLike, out: str | os.PathLike, *, step: int = 0,
                  source: Mapping[str, Any] | None = None, lam: float | None = None,
                  special_ids: Mapping[str, int | str] | None = None) -> pathlib.Path:
  """Writes a dualjax workdir holding `params` that `dualjax.trained.load` restores.

  out/config.json          the default run config (dualjax.config_lib) with `model` =
                           `model_cfg` and objective.lam = `lam` (None: unknown, evaluate offers
                           every mode)
  out/tokenizer.model|json a copy of `tokenizer_path` under the name of its kind (dualjax.workdir)
  out/checkpoints/<step>/  Orbax, item `state` = {params, opt_state (fresh optimizer.init),
                           step, rng} as dualjax.state lays it out
  out/provenance.json      `source` (what was imported), the tokenizer's kind, sha256 and
                           special ids, the model config, the step

  Everything is built in a sibling temporary directory and renamed into place, so `out` is
  either complete or untouched. `out` must be absent or an empty directory.
  """
  out = check_out_dir(out)
  tok = tok_lib.load_tokenizer(tokenizer_path, special_ids)
  check_tokenizer(tok, model_cfg, tokenizer_path)
  cfg = config_lib.get_config()
  cfg.model = ml_collections.ConfigDict(dataclasses.asdict(model_cfg))
  cfg.objective.lam = lam
  cfg.data.tokenizer = ""
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir()
  try:
    (tmp / workdir_lib.CONFIG_FILE).write_text(cfg.to_json(indent=2))
    tok_file = workdir_lib.tokenizer_file(tmp, tok.kind)
    shutil.copyfile(tokenizer_path, tok_file)
    _save_state(cfg, params, tmp, step)
    provenance = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": dict(source or {}),
        "tokenizer": {"kind": tok.kind, "file": tok_file.name,
                      "source": str(tokenizer_path), "sha256": tok.checksum,
                      "vocab_size": tok.vocab_size, "special_ids": tok.special_ids},
        "model": dataclasses.asdict(model_cfg), "step": step, "lam": lam,
    }
    (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    if out.exists():
      out.rmdir()  # empty (checked above)
    os.replace(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out


def check_tokenizer(tok: tok_lib.Tokenizer, cfg: model_lib.ModelConfig, where: Any) -> None:
  """The tokenizer's ids must all be rows of the embedding."""
  if tok.vocab_size > cfg.vocab_size:
    raise ConvertError(f"--tokenizer {where}: its vocabulary of {tok.vocab_size} is larger than "
                       f"the model's {cfg.vocab_size} ({EMBED} rows)")


def _save_state(cfg: ml_collections.ConfigDict, params: Any, directory: pathlib.Path,
                step: int) -> None:
  """The `state` item on one device (Orbax restores it onto any mesh; one device is fastest)."""
  mesh = mesh_lib.make_mesh(-1, 1, 1)
  spec = state_lib.state_spec(cfg, mesh)
  abstract, optimizer = spec.abstract, spec.optimizer
  want = abstract["params"]
  if jax.tree.structure(params) != jax.tree.structure(want):
    raise ConvertError(f"params do not have the model's tree: {jax.tree.structure(params)}")
  for (path, x), w in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(want)):
    if tuple(np.shape(x)) != tuple(w.shape):
      raise ConvertError(f"params{jax.tree_util.keystr(path)} has shape {list(np.shape(x))}, "
                         f"expected {list(w.shape)}")
  device = jax.devices()[0]
  params = jax.tree.map(lambda x, w: jax.device_put(np.asarray(x, w.dtype), device), params, want)
  state = {
      "params": params,
      "opt_state": jax.jit(optimizer.init)(params),
      "step": jax.device_put(jnp.asarray(step, jnp.int32), device),
      "rng": jax.device_put(
          jax.random.key_data(jax.random.fold_in(jax.random.key(cfg.seed), 1)), device),
  }
  if jax.tree.structure(state) != jax.tree.structure(abstract):
    raise ConvertError("the training state does not have dualjax.state's tree")
  manager = ocp.CheckpointManager(
      (directory / workdir_lib.CHECKPOINTS_DIR).absolute(),
      options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False))
  try:
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)
    manager.wait_until_finished()
  finally:
    manager.close()


# ------------------------------------------------------------------------------------------------
# Import and export.

def import_checkpoint(path: str | os.PathLike, tokenizer_path: str | os.PathLike,
                      out: str | os.PathLike, *, allow_pickle: bool = False, step: int = 0,
                      lam: float | None = None,
                      special_ids: Mapping[str, int | str] | None = None,
                      **model_overrides: Any) -> tuple[pathlib.Path, model_lib.ModelConfig]:
  """The authors' state dict at `path` -> a dualjax workdir `out` (see module docstring)."""
  out = check_out_dir(out)
  if step < 0:
    raise ConvertError(f"--step must be >= 0, got {step}")
  if lam is not None and not 0.0 <= lam <= 1.0:
    raise ConvertError(f"--lam must be in [0, 1], got {lam}")
  if not pathlib.Path(tokenizer_path).is_file():
    raise ConvertError(f"--tokenizer {tokenizer_path}: file not found")
  tok = tok_lib.load_tokenizer(tokenizer_path, special_ids)
  state, info = read_state_dict(path, allow_pickle=allow_pickle)
  # Flags first, then the file's dualjax metadata (our exports), then the paper's defaults.
  given = {k: v for k, v in model_overrides.items() if v is not None}
  saved = _saved_config(info["metadata"])
  keys = ["rope_theta", "norm_eps", "max_seq_len", "compute_dtype"]
  if "num_heads" not in given and "head_dim" not in given:
    keys += ["num_heads", "head_dim"]  # the pair, never one from each source
  overrides = {k: saved[k] for k in keys if saved.get(k) is not None}
  overrides = {"attention_impl": "auto", **overrides, **given}
  cfg = infer_config(state, str(path), **overrides)
  params = from_authors(state, cfg, str(path))
  del state  # peak memory: one copy of the weights less
  check_tokenizer(tok, cfg, tokenizer_path)
  source = {"file": str(pathlib.Path(path).absolute()), "sha256": sha256_file(path),
            "layout": "ltgoslo/dual-language-models state dict", **{
                k: v for k, v in info.items() if k != "metadata"}}
  return write_workdir(params, cfg, tokenizer_path, out, step=step, source=source, lam=lam,
                       special_ids=special_ids), cfg


def _saved_config(metadata: Mapping[str, str]) -> dict[str, Any]:
  try:
    saved = json.loads(metadata.get(METADATA_KEY, "{}"))
    return saved if isinstance(saved, dict) else {}
  except json.JSONDecodeError:
    return {}


def export_checkpoint(workdir: str | os.PathLike, path: str | os.PathLike,
                      step: int | None = None) -> tuple[int, model_lib.ModelConfig]:
  """A workdir's checkpoint -> the authors' layout at `path` (.safetensors or .npz, float32)."""
  path = pathlib.Path(path)
  if state_format(path) == "pickle":
    raise ConvertError(f"{path}: export writes .safetensors or .npz, not a pickle")
  if path.exists():
    raise ConvertError(f"{path} exists; remove it or choose another file")
  if not pathlib.Path(workdir).is_dir():
    raise ConvertError(f"--workdir {workdir}: not a directory")
  t = trained.load(workdir, step)
  params, cfg, tok, step = t.params, t.model_cfg, t.tokenizer, t.step
  state = to_authors(jax.device_get(params), cfg)
  meta = {"format": "pt", METADATA_KEY: json.dumps(dataclasses.asdict(cfg)),
          "dualjax_step": str(step), "dualjax_tokenizer_sha256": tok.checksum}
  write_state_dict({k: v.astype(np.float32) for k, v in state.items()}, path, meta)
  return step, cfg


# ------------------------------------------------------------------------------------------------
# CLI.

FLAGS = flags.FlagValues()  # this CLI's own flags (export and main define --workdir/--out too)
_IMPORT = flags.DEFINE_string(
    "import_from", None, "the authors' state dict to import (.safetensors, .npz; .bin/.pt/.pth "
    "with --allow_pickle)", flag_values=FLAGS)
_EXPORT = flags.DEFINE_string(
    "export_to", None, "file to export --workdir to (.safetensors, .npz)", flag_values=FLAGS)
_OUT = flags.DEFINE_string(
    "out", None, "import: the workdir to create (absent or empty)", flag_values=FLAGS)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "export: the dualjax workdir to read", flag_values=FLAGS)
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "import: the model's tokenizer (tokenizer.json or a SentencePiece .model)",
    flag_values=FLAGS)
_ALLOW_PICKLE = flags.DEFINE_bool(
    "allow_pickle", False, "import: read a PyTorch pickle (torch.load(weights_only=True))",
    flag_values=FLAGS)
_STEP = flags.DEFINE_integer(
    "step", None, "import: checkpoint step to write (default 0); export: step to read (default "
    "the newest)", flag_values=FLAGS)
_NUM_HEADS = flags.DEFINE_integer(
    "num_heads", None, "import: attention heads (default: rows of q / head_dim)", flag_values=FLAGS)
_HEAD_DIM = flags.DEFINE_integer(
    "head_dim", None, "import: head size (default: 64, the paper's)", flag_values=FLAGS)
_ROPE_THETA = flags.DEFINE_float(
    "rope_theta", None, "import: RoPE theta (default: 160000)", flag_values=FLAGS)
_NORM_EPS = flags.DEFINE_float(
    "norm_eps", None, "import: RMSNorm eps (default: 1e-7)", flag_values=FLAGS)
_MAX_SEQ_LEN = flags.DEFINE_integer(
    "max_seq_len", None, "import: positions (default: 2048)", flag_values=FLAGS)
_COMPUTE_DTYPE = flags.DEFINE_enum(
    "compute_dtype", None, ["bfloat16", "float32", "float16"], "import: matmul dtype in the "
    "workdir's model config (default: bfloat16)", flag_values=FLAGS)
_LAM = flags.DEFINE_float(
    "lam", None, "import: the AR share the model was trained with (config objective.lam; "
    "default: unknown, so evaluate offers every mode)", flag_values=FLAGS)
_SPECIAL = {role: flags.DEFINE_string(
    f"{role}_token", None, f"import: content of the {role} token in a tokenizer.json (default: "
    f"{tok_lib.DEFAULT_SPECIAL_TOKENS[role]!r})", flag_values=FLAGS)
            for role in tok_lib.SPECIAL_ROLES}


def main(argv: list[str]) -> int:
  if cli.parse(argv, __doc__, FLAGS) is None:
    return 0
  if bool(_IMPORT.value) == bool(_EXPORT.value):
    cli.fail("give exactly one of --import_from=FILE (with --tokenizer, --out) or --export_to=FILE "
          "(with --workdir)")
  try:
    if _IMPORT.value:
      for name, flag in (("--out", _OUT), ("--tokenizer", _TOKENIZER)):
        if not flag.value:
          cli.fail(f"--import_from needs {name}")
      special = {r: f.value for r, f in _SPECIAL.items() if f.value is not None}
      out, cfg = import_checkpoint(
          _IMPORT.value, _TOKENIZER.value, _OUT.value, allow_pickle=_ALLOW_PICKLE.value,
          step=_STEP.value or 0, lam=_LAM.value, special_ids=special or None,
          num_heads=_NUM_HEADS.value, head_dim=_HEAD_DIM.value, rope_theta=_ROPE_THETA.value,
          norm_eps=_NORM_EPS.value, max_seq_len=_MAX_SEQ_LEN.value,
          compute_dtype=_COMPUTE_DTYPE.value)
      print(f"imported {_IMPORT.value} ({_describe_cfg(cfg)}; "
            f"{model_lib.count_params(cfg)['total']:,} parameters) into {out}")
    else:
      if not _WORKDIR.value:
        cli.fail("--export_to needs --workdir")
      step, cfg = export_checkpoint(_WORKDIR.value, _EXPORT.value, _STEP.value)
      print(f"exported step {step} of {_WORKDIR.value} ({_describe_cfg(cfg)}) to "
            f"{_EXPORT.value}")
  except (ConvertError, tok_lib.TokenizerError, ckpt_lib.CheckpointError, ValueError) as e:
    cli.fail(cli.one_line(e))
  return 0


if __name__ == "__main__":
  cli.run(main)

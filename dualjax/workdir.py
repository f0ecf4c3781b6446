"""The workdir format (DESIGN.md §9, §10): file names, the run's identity, atomic writes.

  workdir/config.json        the run's config; a later start must agree on the run's identity
  workdir/tokenizer.model    the tokenizer (with config.json, what loading a trained model needs):
    or tokenizer.json        a SentencePiece model, or a Hugging Face tokenizer.json (imports)
  workdir/provenance.json    what an imported workdir came from (dualjax.convert), incl. the
                             tokenizer's special-id mapping
  workdir/prepared/          token shards, unless data.prepared_dir points elsewhere
  workdir/checkpoints/N/     Orbax checkpoints (dualjax.checkpoint)
  workdir/metrics.jsonl      one JSON line per logged step: kind train | val | eval
  workdir/lock               while a run trains here: its process id and host (dualjax.lock)
  workdir/tensorboard/       the same as TensorBoard events
  workdir/eval/step_N.{json,md}  downstream evaluation results
  workdir/eval/step_N_samples.jsonl  with `evaluate --log_samples`: one line per request
"""

import json
import os
import pathlib
from typing import Any

import ml_collections

from dualjax import tokenizer as tok_lib
from dualjax.errors import ConfigError

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"  # a SentencePiece model (what training writes)
TOKENIZER_FILES = {"sentencepiece": TOKENIZER_FILE, "tokenizers": "tokenizer.json"}
PROVENANCE_FILE = "provenance.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
PREPARED_DIR = "prepared"
EVAL_DIR = "eval"

# Config sections whose change makes an existing workdir a different run; and the fields inside
# them that may change on a resume (where data comes from, how the model is executed).
RUN_IDENTITY = ("seed", "model", "data", "objective", "optim", "train")
NOT_IDENTITY = ("data.prepared_dir", "data.num_workers", "model.attention_impl", "model.remat",
                "model.scan_layers", "model.head_chunk", "train.stop_at")


def identity(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """The run identity of a config: its RUN_IDENTITY sections without the NOT_IDENTITY fields
  (JSON-able; recorded in every checkpoint)."""
  full = json.loads(cfg.to_json())
  out = {}
  for section in RUN_IDENTITY:
    out[section] = _strip(full.get(section), section)
  return out


def _strip(value: Any, path: str) -> Any:
  if isinstance(value, dict):
    return {k: _strip(v, f"{path}.{k}") for k, v in value.items() if f"{path}.{k}" not in NOT_IDENTITY}
  return value


def identity_diff(old: dict[str, Any], new: dict[str, Any]) -> str | None:
  """The first field where two run identities differ ('section.field: old -> new'), or None."""
  for section in RUN_IDENTITY:
    diff = _first_diff(old.get(section), new.get(section), section)
    if diff:
      return diff
  return None


def write_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to a temporary file beside `path`, then renames it into place."""
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def split_run_path(path: str | os.PathLike) -> tuple[pathlib.Path, int | None]:
  """(workdir, step) for a workdir (step None) or one of its `checkpoints/N` directories."""
  path = pathlib.Path(path)
  if path.name.isdigit() and path.parent.name == CHECKPOINTS_DIR:
    return path.parent.parent, int(path.name)
  return path, None


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The run config saved in `workdir` (ValueError naming the file if absent or unreadable)."""
  f = pathlib.Path(workdir) / CONFIG_FILE
  if not f.is_file():
    raise ValueError(f"{workdir}: not a training workdir (no {f})")
  try:
    return ml_collections.ConfigDict(json.loads(f.read_text()))
  except json.JSONDecodeError as e:
    raise ValueError(f"{f}: unreadable ({e.msg})") from None


def run_lam(path: str | os.PathLike) -> float | None:
  """The AR share of the run a workdir or `<workdir>/checkpoints/N` belongs to, if recorded."""
  f = split_run_path(path)[0] / CONFIG_FILE
  try:
    return float(json.loads(f.read_text())["objective"]["lam"])
  except (OSError, KeyError, TypeError, ValueError):
    return None


def check_identity(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
  """A workdir holding another run is refused, naming the first differing field."""
  workdir = pathlib.Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise ConfigError(f"--workdir {workdir} exists and is not a directory")
  saved = workdir / CONFIG_FILE
  if not saved.exists():
    return
  try:
    old = json.loads(saved.read_text())
  except json.JSONDecodeError as e:
    raise ConfigError(f"{saved}: unreadable ({e.msg}); use another --workdir") from None
  diff = identity_diff(old, json.loads(cfg.to_json()))
  if diff:
    raise ConfigError(f"workdir {workdir} holds a run with a different config: {diff} "
                      "(use another --workdir)")


# Identity fields added later: a config (or checkpoint) written before them has the value that
# reproduces what it did then.
ADDED_FIELDS = {"data.text_field": "text"}
_MISSING = object()


def _first_diff(a: Any, b: Any, path: str) -> str | None:
  if path in NOT_IDENTITY:
    return None
  if a is _MISSING or b is _MISSING:
    default = ADDED_FIELDS.get(path, _MISSING)
    a, b = (default if a is _MISSING else a), (default if b is _MISSING else b)
    if a is _MISSING or b is _MISSING:
      a, b = (None if a is _MISSING else a), (None if b is _MISSING else b)
  if isinstance(a, dict) and isinstance(b, dict):
    for k in sorted(set(a) | set(b)):
      d = _first_diff(a.get(k, _MISSING), b.get(k, _MISSING), f"{path}.{k}")
      if d:
        return d
    return None
  return None if a == b else f"{path}: {a!r} -> {b!r}"


def eval_results_path(workdir: str | os.PathLike, step: int) -> pathlib.Path:
  return pathlib.Path(workdir) / EVAL_DIR / f"step_{step}.json"


def tokenizer_file(workdir: str | os.PathLike, kind: str) -> pathlib.Path:
  """Where a workdir keeps a tokenizer of `kind` ('sentencepiece' or 'tokenizers')."""
  return pathlib.Path(workdir) / TOKENIZER_FILES[kind]


def load_tokenizer(workdir: str | os.PathLike) -> tok_lib.Tokenizer:
  """The run's tokenizer, with the special-id mapping an import recorded (provenance.json)."""
  workdir = pathlib.Path(workdir)
  found = [workdir / f for f in TOKENIZER_FILES.values() if (workdir / f).is_file()]
  if not found:
    raise ValueError(f"{workdir}: no tokenizer ({' or '.join(TOKENIZER_FILES.values())})")
  special = None
  prov = workdir / PROVENANCE_FILE
  if prov.is_file():
    try:
      special = json.loads(prov.read_text())["tokenizer"]["special_ids"]
    except (json.JSONDecodeError, KeyError, TypeError):
      raise ValueError(f"{prov}: unreadable tokenizer record") from None
  return tok_lib.load_tokenizer(found[0], special)

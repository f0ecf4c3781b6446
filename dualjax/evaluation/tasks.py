"""Loaders for the nine zero-shot tasks, read from each dataset's standard distribution files.

Every loader returns a list of `Example`s (choices and a 0-based gold index). Bad input raises
`TaskDataError` with one line naming the file and line, before any scoring starts.

Layouts (see ../shared/eval-data/README.md):
  arc_easy/ARC-Easy-Test.jsonl, arc_challenge/ARC-Challenge-Test.jsonl, csqa/dev_rand_split.jsonl,
  openbookqa/test.jsonl: AI2 release layout (`question.stem`, `question.choices[{text,label}]`,
  `answerKey`); the gold index goes through the item's own label list (numeric labels exist).
  blimp/<UID>.jsonl: `sentence_good`, `sentence_bad` (gold = 0).
  hellaswag/hellaswag_val.jsonl (original; OLMES preprocessing) or, when absent,
  hellaswag/hellaswag_val_full.txt.bz2 (6 lines per item, already preprocessed; its known
  differences from OLMES' prompts: HELLASWAG_TEXT_NOTE).
  mmlu/<subject>_test.csv: no header; question, A, B, C, D, answer letter.
  piqa/valid.jsonl + piqa/valid-labels.lst; siqa/socialIWa_v1.4_dev_wDims.jsonl (`label_ix`).

`load_task(name, "tfds:" + DIR)` instead reads the task from a prepared TFDS dataset (ArrayRecord
format, read with `as_data_source`, so TensorFlow is not needed) in the TFDS data dir DIR, using the
feature names and label encodings of TFDS's own builders (see `_TFDS_NAMES`):
  arc_easy / arc_challenge: ai2_arc/ARC-Easy, ai2_arc/ARC-Challenge, split test.
  csqa: cos_e, split validation (CoS-E v1.11 dev carries the CSQA v1.11 dev question, choices and
    answer text; TFDS has no standalone CommonsenseQA builder).
  hellaswag: hellaswag, split validation (`context` is the original `ctx`; see `_tfds_hellaswag`).
  openbookqa: openbookqa, split test (TFDS builds it from Data/Additional/test_complete.jsonl).
  piqa: piqa, split validation.  blimp: every prepared blimp/<paradigm> config, split train.
  mmlu, siqa: not available (see `_TFDS_UNSUPPORTED`).
Items come in the prepared dataset's stored order (TFDS shuffles at preparation), except BLiMP,
which is put in file order (paradigm name, pair_id); so a `limit` subsample picks other items
than it does from the files. uids are the dataset's own ids where TFDS keeps them (ARC, CSQA, PIQA,
BLiMP), else "<split>[<stored index>]".
"""

import bz2
import csv
import dataclasses
import json
import os
import pathlib
import re
from typing import Any, Callable

import numpy as np

TASKS = ("arc_easy", "arc_challenge", "blimp", "csqa", "hellaswag", "mmlu", "openbookqa",
         "piqa", "siqa")


class TaskDataError(ValueError):
  """A malformed or missing task file; the message is one line naming the file (and line)."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One multiple-choice item: prompt fields, candidate completions and the gold index."""
  task: str
  subtask: str  # BLiMP paradigm / MMLU subject; "" for single-set tasks.
  uid: str
  fields: dict[str, str]  # What the prompt template needs (question, goal, subject, query, ...).
  choices: tuple[str, ...]
  gold: int


def _err(path: pathlib.Path, line: int | None, msg: str) -> TaskDataError:
  where = f"{path}:{line}" if line is not None else f"{path}"
  return TaskDataError(f"{where}: {msg}")


def _need(path: pathlib.Path) -> pathlib.Path:
  if not path.is_file():
    raise _err(path, None, "task file not found")
  return path


def _read_jsonl(path: pathlib.Path) -> list[tuple[int, dict[str, Any]]]:
  """(1-based line number, object) for every non-empty line; a bad line is a TaskDataError."""
  rows = []
  with open(_need(path), encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise _err(path, n, f"invalid JSON ({e.msg})") from None
      if not isinstance(obj, dict):
        raise _err(path, n, "expected a JSON object")
      rows.append((n, obj))
  if not rows:
    raise _err(path, None, "file has no items")
  return rows


def _get(obj: dict[str, Any], dotted: str, path: pathlib.Path, line: int, kind: type = str) -> Any:
  cur: Any = obj
  for key in dotted.split("."):
    if not isinstance(cur, dict) or key not in cur:
      raise _err(path, line, f"missing field '{dotted}'")
    cur = cur[key]
  if kind is not None and not isinstance(cur, kind):
    raise _err(path, line, f"field '{dotted}' should be {kind.__name__}, got {type(cur).__name__}")
  return cur


def _ai2_layout(task: str, path: pathlib.Path) -> list[Example]:
  """ARC / CSQA / OpenBookQA original release layout."""
  out = []
  for n, obj in _read_jsonl(path):
    stem = _get(obj, "question.stem", path, n)
    choices = _get(obj, "question.choices", path, n, list)
    if len(choices) < 2:
      raise _err(path, n, f"expected at least 2 choices, got {len(choices)}")
    texts, labels = [], []
    for c in choices:
      if not isinstance(c, dict) or not isinstance(c.get("text"), str) or "label" not in c:
        raise _err(path, n, "each choice needs 'text' and 'label'")
      texts.append(c["text"])
      labels.append(str(c["label"]))
    key = str(_get(obj, "answerKey", path, n, None))
    if key not in labels:
      raise _err(path, n, f"answerKey '{key}' is not one of the choice labels {labels}")
    out.append(Example(task, "", str(obj.get("id", n)), {"question": stem}, tuple(texts),
                       labels.index(key)))
  return out


def load_arc_easy(data_dir: pathlib.Path) -> list[Example]:
  return _ai2_layout("arc_easy", data_dir / "arc_easy" / "ARC-Easy-Test.jsonl")


def load_arc_challenge(data_dir: pathlib.Path) -> list[Example]:
  return _ai2_layout("arc_challenge", data_dir / "arc_challenge" / "ARC-Challenge-Test.jsonl")


def load_csqa(data_dir: pathlib.Path) -> list[Example]:
  return _ai2_layout("csqa", data_dir / "csqa" / "dev_rand_split.jsonl")


def load_openbookqa(data_dir: pathlib.Path) -> list[Example]:
  return _ai2_layout("openbookqa", data_dir / "openbookqa" / "test.jsonl")


def load_blimp(data_dir: pathlib.Path) -> list[Example]:
  """All paradigm files in blimp/ (sorted by name); choices (good, bad), gold 0."""
  files = sorted((data_dir / "blimp").glob("*.jsonl"))
  if not files:
    raise _err(data_dir / "blimp", None, "no BLiMP *.jsonl paradigm files")
  out = []
  for path in files:
    for n, obj in _read_jsonl(path):
      good = _get(obj, "sentence_good", path, n)
      bad = _get(obj, "sentence_bad", path, n)
      uid = str(obj.get("UID", path.stem))
      out.append(Example("blimp", uid, f"{uid}/{obj.get('pairID', n)}", {}, (good, bad), 0))
  return out


def hellaswag_preprocess(text: str) -> str:
  r"""OLMES' HellaSwag clean-up of WikiHow markup (`HellaSwagStd.preprocess`): strip, then
  `re.sub(r"\.? \[title\]", ". ")` (lm-eval's `replace(" [title]", ". ")` turns "done. [title]"
  into "done.. "), remove every `[...]`, collapse double spaces. Stripping comes first, as in
  OLMES and lm-eval, so removed tags can leave a leading or trailing space."""
  text = text.strip()
  text = re.sub(r"\.? \[title\]", ". ", text)
  text = re.sub(r"\[.*?\]", "", text)
  text = text.replace("  ", " ")
  return text


def load_hellaswag_jsonl(path: pathlib.Path) -> list[Example]:
  """The original `hellaswag_val.jsonl` layout, as OLMES' `_process_doc`: query =
  preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()) (str.capitalize: first
  letter upper, the rest lower), choices = preprocess(ending)."""
  out = []
  for n, obj in _read_jsonl(path):
    label = _get(obj, "activity_label", path, n)
    ctx = _get(obj, "ctx_a", path, n) + " " + _get(obj, "ctx_b", path, n).capitalize()
    endings = _get(obj, "endings", path, n, list)
    if len(endings) != 4 or not all(isinstance(e, str) for e in endings):
      raise _err(path, n, "'endings' should be a list of 4 strings")
    gold = _get(obj, "label", path, n, None)
    if str(gold) not in ("0", "1", "2", "3"):
      raise _err(path, n, f"'label' should be 0-3, got {gold!r}")
    out.append(Example("hellaswag", "", str(obj.get("ind", n)),
                       {"query": hellaswag_preprocess(label + ": " + ctx)},
                       tuple(hellaswag_preprocess(e) for e in endings), int(gold)))
  return out


def load_hellaswag_text(path: pathlib.Path) -> list[Example]:
  """The preprocessed text version (llama.cpp format): 6 lines per item, query/label/4 endings,
  read as they are (see HELLASWAG_TEXT_NOTE for how they differ from OLMES' prompts)."""
  opener = bz2.open if path.suffix == ".bz2" else open
  try:
    with opener(_need(path), "rt", encoding="utf-8") as f:
      lines = f.read().split("\n")
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise _err(path, None, f"unreadable ({type(e).__name__}: {e})") from None
  if lines and lines[-1] == "":
    lines.pop()
  if not lines or len(lines) % 6:
    raise _err(path, len(lines), f"expected 6 lines per item, file has {len(lines)} lines")
  out = []
  for i in range(0, len(lines), 6):
    if lines[i + 1].strip() not in ("0", "1", "2", "3"):
      raise _err(path, i + 2, f"gold label should be 0-3, got {lines[i + 1]!r}")
    out.append(Example("hellaswag", "", str(i // 6), {"query": lines[i]},
                       tuple(lines[i + 2:i + 6]), int(lines[i + 1])))
  return out


HELLASWAG_JSONL = "hellaswag_val.jsonl"
HELLASWAG_TEXT = "hellaswag_val_full.txt.bz2"
# How the text file's prompts differ from OLMES' (each count measured on the 10,042 items by
# tests/test_eval_tasks.py; the original jsonl is needed to compare byte by byte).
HELLASWAG_TEXT_DIFFERENCES = """\
  - ctx_b is not capitalised: 3,236 contexts end in a lower-case fragment
    ("... on a roof. he"; OLMES "... on a roof. He");
  - "done. [title] Next" became "done.. Next" (lm-eval's replace; OLMES "done. Next"):
    778 contexts and 4,151 endings contain ".. ";
  - brackets other than the WikiHow tags are kept (18 lines, e.g. "[www.kiddio.org]"),
    OLMES removes every [...];
  - a space a removed tag leaves at the start or end of a line is trimmed (no line starts or
    ends with a space; OLMES strips before removing tags: "[substeps] Pick" -> " Pick")."""
HELLASWAG_TEXT_NOTE = f"""\
HellaSwag: with hellaswag/{HELLASWAG_JSONL} (the original release) the prompts are OLMES'
(strip; ". [title]" and " [title]" -> ". "; every [...] removed; ctx_b capitalised). Without it,
hellaswag/{HELLASWAG_TEXT} (llama.cpp's preprocessed text, 6 lines per item) is read as it is;
its known differences from OLMES:
{HELLASWAG_TEXT_DIFFERENCES}
TFDS (tfds:DIR) keeps no ctx_a/ctx_b split: no ctx_b capitalisation, the rest as OLMES."""


def load_hellaswag(data_dir: pathlib.Path) -> list[Example]:
  """The original jsonl when present (OLMES prompts), else the text version."""
  jsonl = data_dir / "hellaswag" / HELLASWAG_JSONL
  if jsonl.is_file():
    return load_hellaswag_jsonl(jsonl)
  return load_hellaswag_text(data_dir / "hellaswag" / HELLASWAG_TEXT)


def load_mmlu(data_dir: pathlib.Path) -> list[Example]:
  """All `<subject>_test.csv` files in mmlu/ (sorted by subject)."""
  files = sorted((data_dir / "mmlu").glob("*_test.csv"))
  if not files:
    raise _err(data_dir / "mmlu", None, "no MMLU *_test.csv files")
  out = []
  for path in files:
    subject = path.name[:-len("_test.csv")]
    with open(path, encoding="utf-8", newline="") as f:
      reader = csv.reader(f)
      line = 1  # First physical line of the current record.
      try:
        for k, row in enumerate(reader):
          if len(row) != 6:
            raise _err(path, line, f"expected 6 CSV columns (question, A-D, answer), got {len(row)}")
          if row[5].strip() not in ("A", "B", "C", "D"):
            raise _err(path, line, f"answer should be A-D, got {row[5]!r}")
          out.append(Example("mmlu", subject, f"{subject}/{k}",
                             {"subject": subject, "question": row[0]}, tuple(row[1:5]),
                             "ABCD".index(row[5].strip())))
          line = reader.line_num + 1
      except csv.Error as e:
        raise _err(path, line, f"CSV error ({e})") from None
  return out


def load_piqa(data_dir: pathlib.Path) -> list[Example]:
  path = data_dir / "piqa" / "valid.jsonl"
  lpath = _need(data_dir / "piqa" / "valid-labels.lst")
  rows = _read_jsonl(path)
  labels = lpath.read_text(encoding="utf-8").split("\n")
  if labels and labels[-1] == "":
    labels.pop()
  if len(labels) != len(rows):
    raise _err(lpath, None, f"{len(labels)} labels for {len(rows)} items in {path.name}")
  out = []
  for (n, obj), (m, lab) in zip(rows, enumerate(labels, 1)):
    if lab.strip() not in ("0", "1"):
      raise _err(lpath, m, f"label should be 0 or 1, got {lab!r}")
    out.append(Example("piqa", "", str(n), {"goal": _get(obj, "goal", path, n)},
                       (_get(obj, "sol1", path, n), _get(obj, "sol2", path, n)), int(lab)))
  return out


def load_siqa(data_dir: pathlib.Path) -> list[Example]:
  path = data_dir / "siqa" / "socialIWa_v1.4_dev_wDims.jsonl"
  out = []
  for n, obj in _read_jsonl(path):
    gold = _get(obj, "label_ix", path, n, int)
    if gold not in (0, 1, 2):
      raise _err(path, n, f"'label_ix' should be 0-2, got {gold}")
    out.append(Example("siqa", "", str(n),
                       {"context": _get(obj, "context", path, n),
                        "question": _get(obj, "question", path, n)},
                       tuple(_get(obj, f"answer{c}", path, n) for c in "ABC"), gold))
  return out


LOADERS: dict[str, Callable[[pathlib.Path], list[Example]]] = {
    "arc_easy": load_arc_easy, "arc_challenge": load_arc_challenge, "blimp": load_blimp,
    "csqa": load_csqa, "hellaswag": load_hellaswag, "mmlu": load_mmlu,
    "openbookqa": load_openbookqa, "piqa": load_piqa, "siqa": load_siqa,
}


def subsample(examples: list[Example], limit: int | None, seed: int = 0) -> list[Example]:
  """A fixed-seed uniform subsample of `limit` items, kept in file order (None = all)."""
  if limit is None or limit >= len(examples):
    return list(examples)
  idx = np.sort(np.random.default_rng(seed).choice(len(examples), size=limit, replace=False))
  return [examples[i] for i in idx]


def load_task(name: str, data_dir: str | pathlib.Path, limit: int | None = None,
              seed: int = 0) -> list[Example]:
  """Loads task `name` from `data_dir` (the eval-data layout, or "tfds:" + a TFDS data dir),
  optionally subsampled."""
  if name not in LOADERS:
    raise TaskDataError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)}")
  if str(data_dir).startswith(TFDS_PREFIX):
    return subsample(load_tfds_task(name, str(data_dir)[len(TFDS_PREFIX):]), limit, seed)
  return subsample(LOADERS[name](pathlib.Path(data_dir)), limit, seed)


# ----------------------------------------------------------------------------------------------
# Prepared TFDS datasets.

TFDS_PREFIX = "tfds:"

# task -> (TFDS dataset name [/config], split). BLiMP names the dataset only: every prepared
# paradigm config under DIR/blimp/ is read. Tests may point these at other names.
_TFDS_NAMES: dict[str, tuple[str, str]] = {
    "arc_easy": ("ai2_arc/ARC-Easy", "test"),
    "arc_challenge": ("ai2_arc/ARC-Challenge", "test"),
    "blimp": ("blimp", "train"),
    "csqa": ("cos_e", "validation"),
    "hellaswag": ("hellaswag", "validation"),
    "openbookqa": ("openbookqa", "test"),
    "piqa": ("piqa", "validation"),
}

_TFDS_UNSUPPORTED = {
    "mmlu": "TFDS has no MMLU (hendrycks_test) builder",
    "siqa": ("TFDS has Social IQa only as unifiedqa/social_iqa, which keeps each item as one "
             "input/output text pair, without separate context, question, answers and label"),
}

# Features each task reads (dotted: nested FeaturesDict / Sequence of FeaturesDict).
_TFDS_FIELDS = {
    "arc": ("id", "question", "choices.text", "choices.label", "answerKey"),
    "blimp": ("sentence_good", "sentence_bad", "UID", "pair_id"),
    "csqa": ("id", "question", "choices", "answer"),
    "hellaswag": ("activity_label", "context", "endings", "label"),
    "openbookqa": ("question.stem", "question.choice_A", "question.choice_B", "question.choice_C",
                   "question.choice_D", "answerKey"),
    "piqa": ("id", "goal", "sol1", "sol2", "label"),
}


def _s(v: Any) -> str:
  return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _tfds_arc(task: str, uid: str, r: dict[str, Any]) -> Example:
  """ai2_arc: `choices.label` / `answerKey` are ClassLabel(A-E) (numeric labels mapped to A-E)."""
  texts = [_s(t) for t in r["choices"]["text"]]
  labels = [int(x) for x in r["choices"]["label"]]
  if len(texts) < 2 or len(labels) != len(texts):
    raise ValueError(f"expected at least 2 choices with one label each, got {len(texts)} texts "
                     f"and {len(labels)} labels")
  key = int(r["answerKey"])
  if key not in labels:
    raise ValueError(f"answerKey {key} is not one of the choice labels {labels}")
  return Example(task, "", _s(r["id"]), {"question": _s(r["question"])}, tuple(texts),
                 labels.index(key))


def _tfds_csqa(task: str, uid: str, r: dict[str, Any]) -> Example:
  """cos_e: `choices` are the CSQA choice texts in label order, `answer` the gold choice's text.

  24 CSQA dev items repeat a choice text; where the answer is one of the repeats (2 items) the gold
  index is its first occurrence, which scores the same (identical choices tie)."""
  texts = [_s(t) for t in r["choices"]]
  answer = _s(r["answer"])
  if len(texts) < 2:
    raise ValueError(f"expected at least 2 choices, got {len(texts)}")
  if answer not in texts:
    raise ValueError(f"answer {answer!r} is not one of the choices {texts}")
  return Example(task, "", _s(r["id"]), {"question": _s(r["question"])}, tuple(texts),
                 texts.index(answer))


def _tfds_hellaswag(task: str, uid: str, r: dict[str, Any]) -> Example:
  """hellaswag: `context` is the original `ctx` (ctx_a + " " + ctx_b), so the query is
  `activity_label: ctx` without OLMES' ctx_b.capitalize() (TFDS keeps
  no ctx_a/ctx_b split), otherwise OLMES' clean-up (`hellaswag_preprocess`)."""
  endings = [_s(e) for e in r["endings"]]
  if len(endings) != 4:
    raise ValueError(f"'endings' should hold 4 strings, got {len(endings)}")
  gold = int(r["label"])
  if gold not in (0, 1, 2, 3):
    raise ValueError(f"'label' should be 0-3, got {gold}")
  return Example(task, "", uid,
                 {"query": hellaswag_preprocess(_s(r["activity_label"]) + ": " + _s(r["context"]))},
                 tuple(hellaswag_preprocess(e) for e in endings), gold)


def _tfds_openbookqa(task: str, uid: str, r: dict[str, Any]) -> Example:
  """openbookqa: `question.choice_A..D` in label order, `answerKey` ClassLabel(A-D)."""
  q = r["question"]
  gold = int(r["answerKey"])
  if gold not in (0, 1, 2, 3):
    raise ValueError(f"'answerKey' should be 0-3 (A-D), got {gold}")
  return Example(task, "", uid, {"question": _s(q["stem"])},
                 tuple(_s(q[f"choice_{c}"]) for c in "ABCD"), gold)


def _tfds_piqa(task: str, uid: str, r: dict[str, Any]) -> Example:
  """piqa: `label` ClassLabel(2), 0 = sol1."""
  gold = int(r["label"])
  if gold not in (0, 1):
    raise ValueError(f"'label' should be 0 or 1, got {gold}")
  return Example(task, "", _s(r["id"]), {"goal": _s(r["goal"])},
                 (_s(r["sol1"]), _s(r["sol2"])), gold)


def _tfds_blimp(task: str, uid: str, r: dict[str, Any]) -> Example:
  paradigm = _s(r["UID"])
  return Example(task, paradigm, f"{paradigm}/{int(r['pair_id'])}", {},
                 (_s(r["sentence_good"]), _s(r["sentence_bad"])), 0)


_TFDS_CONVERT: dict[str, tuple[str, Callable[[str, str, dict[str, Any]], Example]]] = {
    "arc_easy": ("arc", _tfds_arc), "arc_challenge": ("arc", _tfds_arc),
    "blimp": ("blimp", _tfds_blimp), "csqa": ("csqa", _tfds_csqa),
    "hellaswag": ("hellaswag", _tfds_hellaswag), "openbookqa": ("openbookqa", _tfds_openbookqa),
    "piqa": ("piqa", _tfds_piqa),
}


def _first_line(e: BaseException) -> str:
  msg = str(e).strip().splitlines()
  return f"{type(e).__name__}: {msg[0]}" if msg else type(e).__name__


def _has_feature(features: Any, dotted: str) -> bool:
  cur = features
  for key in dotted.split("."):
    cur = getattr(cur, "feature", cur)  # A Sequence's element feature.
    if not hasattr(cur, "keys") or key not in cur.keys():
      return False
    cur = cur[key]
  return True


def _read_tfds(task: str, name: str, split: str, tfds_dir: str, fields: tuple[str, ...],
               convert: Callable[[str, str, dict[str, Any]], Example]) -> list[Example]:
  """Every item of split `split` of the prepared TFDS dataset `name`, in stored order."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  where = f"task '{task}': TFDS dataset '{name}' in {tfds_dir}"
  try:
    builder = tfds.builder(name, data_dir=tfds_dir)
    info = builder.info
  except Exception as e:  # pylint: disable=broad-except
    raise TaskDataError(f"{where}: not found or not prepared ({_first_line(e)})") from None
  # Checked first: `data_source` on an unprepared dataset would try to download and prepare it.
  if not os.path.isfile(os.path.join(str(builder.data_dir), "dataset_info.json")):
    raise TaskDataError(f"{where}: not prepared (no {builder.data_dir}/dataset_info.json)")
  if split not in info.splits:
    raise TaskDataError(f"{where}: no split '{split}' (has {', '.join(info.splits.keys())})")
  missing = [f for f in fields if not _has_feature(info.features, f)]
  if missing:
    raise TaskDataError(f"{where}: missing field(s) {', '.join(missing)} (has "
                        f"{', '.join(info.features.keys())})")
  try:
    ds = builder.as_data_source(split=split)
    n = len(ds)
  except Exception as e:  # pylint: disable=broad-except
    raise TaskDataError(f"{where}: split '{split}' is unreadable ({_first_line(e)}; prepare it "
                        "with file_format='array_record')") from None
  if n == 0:
    raise TaskDataError(f"{where}: split '{split}' is empty")
  out = []
  for start in range(0, n, 1024):
    idx = list(range(start, min(n, start + 1024)))
    try:
      rows = ds.__getitems__(idx) if hasattr(ds, "__getitems__") else [ds[i] for i in idx]
    except Exception as e:  # pylint: disable=broad-except
      raise TaskDataError(f"{where}[{split}][{start}:{idx[-1] + 1}]: unreadable "
                          f"({_first_line(e)})") from None
    for i, r in zip(idx, rows):
      try:
        out.append(convert(task, f"{split}[{i}]", r))
      except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise TaskDataError(f"{where}[{split}][{i}]: {_first_line(e)}") from None
  return out


def _blimp_configs(tfds_dir: str, name: str) -> list[str]:
  """The paradigm configs prepared under `tfds_dir/name/` (some version dir has dataset_info)."""
  root = pathlib.Path(tfds_dir) / name
  if not root.is_dir():
    return []
  return sorted((c.name for c in root.iterdir()
                 if c.is_dir() and not c.name.startswith(".")
                 and any((v / "dataset_info.json").is_file() for v in c.iterdir() if v.is_dir())),
                key=lambda c: c + ".jsonl")  # The file loader's order (sorted file names).


def load_tfds_task(task: str, tfds_dir: str) -> list[Example]:
  """Task `task` from the prepared TFDS datasets in the TFDS data dir `tfds_dir` (see top)."""
  if task not in LOADERS:
    raise TaskDataError(f"unknown task '{task}'; known tasks: {', '.join(TASKS)}")
  if task in _TFDS_UNSUPPORTED:
    raise TaskDataError(f"task '{task}' cannot be read from TFDS dir {tfds_dir}: "
                        f"{_TFDS_UNSUPPORTED[task]}; use the eval-data files instead")
  if not tfds_dir:
    raise TaskDataError(f"task '{task}': '{TFDS_PREFIX}' needs a TFDS data dir path after it "
                        f"(e.g. {TFDS_PREFIX}/data/tensorflow_datasets)")
  try:
    import tensorflow_datasets  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise TaskDataError(f"task '{task}': reading {TFDS_PREFIX}{tfds_dir} needs tensorflow_datasets "
                        f"({_first_line(e)})") from None
  name, split = _TFDS_NAMES[task]
  kind, convert = _TFDS_CONVERT[task]
  if task != "blimp":
    return _read_tfds(task, name, split, tfds_dir, _TFDS_FIELDS[kind], convert)
  configs = _blimp_configs(tfds_dir, name)
  if not configs:
    raise TaskDataError(f"task 'blimp': TFDS dataset '{name}' in {tfds_dir}: no prepared paradigm "
                        f"configs (expected {pathlib.Path(tfds_dir) / name}/<paradigm>/<version>/)")
  out = []
  for c in configs:
    part = _read_tfds(task, f"{name}/{c}", split, tfds_dir, _TFDS_FIELDS[kind], convert)
    out.extend(sorted(part, key=lambda e: int(e.uid.rsplit("/", 1)[1])))  # File (pairID) order.
  return out


def random_baseline(task: str, examples: list[Example]) -> float:
  """Chance accuracy r: the mean over items of 1/#choices (ARC), else the task's constant."""
  fixed = {"blimp": 0.5, "csqa": 0.2, "hellaswag": 0.25, "mmlu": 0.25, "openbookqa": 0.25,
           "piqa": 0.5, "siqa": 1 / 3}
  if task in fixed:
    return fixed[task]
  return float(np.mean([1.0 / len(e.choices) for e in examples]))

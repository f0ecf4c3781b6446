"""Loaders for the nine zero-shot tasks, read from each dataset's standard distribution files.

Every loader returns a list of `Example`s (choices and a 0-based gold index). Bad input raises
`TaskDataError` with one line naming the file and line, before any scoring starts.

Layouts (see ../shared/eval-data/README.md):
  arc_easy/ARC-Easy-Test.jsonl, arc_challenge/ARC-Challenge-Test.jsonl, csqa/dev_rand_split.jsonl,
  openbookqa/test.jsonl: AI2 release layout (`question.stem`, `question.choices[{text,label}]`,
  `answerKey`); the gold index goes through the item's own label list (numeric labels exist).
  blimp/<UID>.jsonl: `sentence_good`, `sentence_bad` (gold = 0).
  hellaswag/hellaswag_val.jsonl (original; lm-eval preprocessing) or, when absent,
  hellaswag/hellaswag_val_full.txt.bz2 (6 lines per item, already preprocessed).
  mmlu/<subject>_test.csv: no header; question, A, B, C, D, answer letter.
  piqa/valid.jsonl + piqa/valid-labels.lst; siqa/socialIWa_v1.4_dev_wDims.jsonl (`label_ix`).
"""

import bz2
import csv
import dataclasses
import json
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
  """lm-eval's HellaSwag text clean-up (WikiHow markup)."""
  text = text.strip()
  text = text.replace(" [title]", ". ")
  text = re.sub("\\[.*?\\]", "", text)
  text = text.replace("  ", " ")
  return text


def load_hellaswag_jsonl(path: pathlib.Path) -> list[Example]:
  """The original `hellaswag_val.jsonl` layout with lm-eval's `_process_doc`."""
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
  """The preprocessed text version (llama.cpp format): 6 lines per item, query/label/4 endings."""
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


def load_hellaswag(data_dir: pathlib.Path) -> list[Example]:
  """The original jsonl when present (byte-exact lm-eval prompts), else the text version."""
  jsonl = data_dir / "hellaswag" / "hellaswag_val.jsonl"
  if jsonl.is_file():
    return load_hellaswag_jsonl(jsonl)
  return load_hellaswag_text(data_dir / "hellaswag" / "hellaswag_val_full.txt.bz2")


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
  """Loads task `name` from `data_dir` (the eval-data layout), optionally subsampled."""
  if name not in LOADERS:
    raise TaskDataError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)}")
  return subsample(LOADERS[name](pathlib.Path(data_dir)), limit, seed)


def random_baseline(task: str, examples: list[Example]) -> float:
  """Chance accuracy r: the mean over items of 1/#choices (ARC), else the task's constant."""
  fixed = {"blimp": 0.5, "csqa": 0.2, "hellaswag": 0.25, "mmlu": 0.25, "openbookqa": 0.25,
           "piqa": 0.5, "siqa": 1 / 3}
  if task in fixed:
    return fixed[task]
  return float(np.mean([1.0 / len(e.choices) for e in examples]))

"""Task loaders on the real files in ../shared/eval-data and on malformed files."""

import bz2
import collections
import dataclasses
import hashlib
import json
import pathlib
import re

import pytest

from dualjax.evaluation import tasks

EXPECTED = {"arc_easy": 2376, "arc_challenge": 1172, "blimp": 67000, "csqa": 1221,
            "hellaswag": 10042, "mmlu": 14042, "openbookqa": 500, "piqa": 1838, "siqa": 1954}


@pytest.fixture(scope="module")
def loaded(eval_data_dir):
  return {t: tasks.load_task(t, eval_data_dir) for t in tasks.TASKS}


def test_counts(loaded):
  assert {t: len(v) for t, v in loaded.items()} == EXPECTED
  blimp = collections.Counter(e.subtask for e in loaded["blimp"])
  assert len(blimp) == 67 and set(blimp.values()) == {1000}
  mmlu = collections.Counter(e.subtask for e in loaded["mmlu"])
  assert len(mmlu) == 57
  assert (mmlu["professional_law"], mmlu["miscellaneous"], mmlu["machine_learning"]) == (
      1534, 783, 112)


def test_choice_counts_and_label_distributions(loaded):
  arc_e = collections.Counter(len(e.choices) for e in loaded["arc_easy"])
  assert arc_e == {4: 2365, 3: 7, 5: 4}
  arc_c = collections.Counter(len(e.choices) for e in loaded["arc_challenge"])
  assert arc_c == {4: 1165, 3: 4, 5: 3}
  assert collections.Counter(e.gold for e in loaded["hellaswag"]) == {
      0: 2515, 1: 2485, 2: 2584, 3: 2458}
  assert collections.Counter(e.gold for e in loaded["mmlu"]) == {0: 3222, 1: 3462, 2: 3582,
                                                                 3: 3776}
  assert collections.Counter(e.gold for e in loaded["piqa"]) == {0: 910, 1: 928}
  assert collections.Counter(e.gold for e in loaded["siqa"]) == {0: 643, 1: 654, 2: 657}
  assert collections.Counter(e.gold for e in loaded["openbookqa"]) == {0: 138, 1: 126, 2: 132,
                                                                       3: 104}
  # The 7 identical BLiMP pairs stay as they are.
  same = {e.uid for e in loaded["blimp"] if e.choices[0] == e.choices[1]}
  assert same == {"passive_1/324", "passive_1/810", "principle_A_case_2/105",
                  "principle_A_case_2/287", "principle_A_case_2/372", "principle_A_case_2/816",
                  "principle_A_case_2/967"}


def test_spot_checked_gold(loaded):
  by_uid = {t: {e.uid: e for e in v} for t, v in loaded.items()}
  e = by_uid["arc_easy"]["NYSEDREGENTS_2015_8_28"]  # Numeric labels 1-4, answerKey "2".
  assert e.choices[e.gold] == "elements"
  e = by_uid["arc_challenge"]["NYSEDREGENTS_2010_4_4"]  # 3 choices, answer A.
  assert e.choices == ("slower", "faster", "at the same speed") and e.gold == 0
  e = by_uid["openbookqa"]["8-343"]
  assert e.choices[e.gold] == "quit eating lunch out"
  e = by_uid["csqa"]["1afa02df02c908a558b4036e80242fac"]
  assert e.choices[e.gold] == "bank" and len(e.choices) == 5
  e = loaded["hellaswag"][0]
  assert e.fields["query"] == "Roof shingle removal: A man is sitting on a roof. he"
  assert e.choices[e.gold] == "starts pulling up roofing on a roof."
  e = by_uid["mmlu"]["abstract_algebra/0"]
  assert e.choices == ("0", "4", "2", "6") and e.gold == 1
  e = by_uid["mmlu"]["high_school_computer_science/6"]  # Newlines inside a quoted field.
  assert "° The student's gender\n" in e.fields["question"] and e.gold == 1
  e = loaded["piqa"][4]
  assert e.fields["goal"] == "ice box" and e.gold == 0
  e = loaded["siqa"][99]
  assert e.fields["question"] == "Why did Robin do this?" and e.choices[e.gold] == "issue a warning"
  e = by_uid["blimp"]["adjunct_island/0"]
  assert e.choices == ("Who should Derek hug after shocking Richard?",
                       "Who should Derek hug Richard after shocking?") and e.gold == 0


def test_subsample_is_fixed_and_ordered(loaded):
  a = tasks.subsample(loaded["siqa"], 50, seed=3)
  b = tasks.subsample(loaded["siqa"], 50, seed=3)
  c = tasks.subsample(loaded["siqa"], 50, seed=4)
  assert [e.uid for e in a] == [e.uid for e in b] != [e.uid for e in c]
  assert [int(e.uid) for e in a] == sorted(int(e.uid) for e in a)
  assert len(tasks.subsample(loaded["siqa"], None)) == 1954


def test_random_baselines(loaded):
  r = tasks.random_baseline("arc_easy", loaded["arc_easy"])
  assert r == pytest.approx((2365 / 4 + 7 / 3 + 4 / 5) / 2376)
  assert tasks.random_baseline("siqa", []) == pytest.approx(1 / 3)


def test_hellaswag_original_jsonl_layout(tmp_path):
  rows = [
      {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the"
       " snow covering the window of a car, and a woman wearing winter clothes smiles.",
       "ctx_b": "then", "endings": [", the man adds wax to the windshield and cuts it.",
                                    ", a person board a ski lift, while two men supporting the head"
                                    " of the person wearing winter clothes snow as the we girls sled.",
                                    ", the man puts on a christmas coat, knitted with netting.",
                                    ", the man continues removing the snow on his car."],
       "source_id": "v_-1IBHYS3L-Y", "split": "val", "split_type": "indomain", "label": "3"},
      {"ind": 30, "activity_label": "Personal Care and Style", "ctx_a": "[header] How to dye your"
       " hair [title] Choose a color. [step] Think about",
       "ctx_b": "WHAT color you want.", "endings": ["[substeps] Pick [title] a shade.", "b", "c",
                                                   "d  e"],
       "source_id": "wikihow_1", "split": "val", "split_type": "zeroshot", "label": 0},
  ]
  path = tmp_path / "hellaswag_val.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  ex = tasks.load_hellaswag_jsonl(path)
  assert ex[0].fields["query"] == (
      "Removing ice from car: Then, the man writes over the snow covering the window of a car, and"
      " a woman wearing winter clothes smiles. Then")
  assert ex[0].choices[3] == ", the man continues removing the snow on his car." and ex[0].gold == 3
  # OLMES: " [title]" -> ". ", other [markup] removed, double spaces collapsed, strip first;
  # ctx_b capitalised with str.capitalize (rest lower-cased).
  assert ex[1].fields["query"] == (
      "Personal Care and Style: How to dye your hair. Choose a color. Think about What color you"
      " want.")
  # (OLMES strips before removing markup, so a leading "[substeps] " leaves a space.)
  assert ex[1].choices == (" Pick. a shade.", "b", "c", "d e") and ex[1].gold == 0
  # load_hellaswag prefers the original file when present.
  (tmp_path / "hellaswag").mkdir()
  path.rename(tmp_path / "hellaswag" / "hellaswag_val.jsonl")
  assert len(tasks.load_hellaswag(tmp_path)) == 2


# OLMES' HellaSwag clean-up on hand-written strings; each expected output was worked out by
# hand from the rules: strip; "." optional + " [title]" -> ". "; every [...] removed; "  " -> " ".
@pytest.mark.parametrize("raw,want", [
    ("Done. [title] Next step.", "Done. Next step."),         # lm-eval would give "Done.. Next"
    ("Done [title] Next", "Done. Next"),
    ("Done! [title] Next", "Done!. Next"),                     # only "." is absorbed
    ("[title] Write it. [step] Then go.", " Write it. Then go."),  # strip came first
    ("  Pick one [step]  ", "Pick one "),
    ("See [www.kiddio.org] for games.", "See for games."),     # every bracket pair goes
    ("a [b [c] d] e", "a d] e"),                               # non-greedy, no nesting
    ("x.. [title] y", "x.. y"),                                # one "." absorbed, not two
    ("plain text", "plain text"),
    ("four    spaces", "four  spaces"),                        # one pass of "  " -> " "
])
def test_hellaswag_preprocess_hand_written(raw, want):
  assert tasks.hellaswag_preprocess(raw) == want


def test_hellaswag_jsonl_olmes_query(tmp_path):
  row = {"ind": 7, "activity_label": "Home and Garden", "label": "2",
         "ctx_a": "[header] How to plant a tree [title] Dig a hole. [title] Water it.",
         "ctx_b": "then PLANT the tree",
         "endings": ["[step] Wait.", "Leave. [title] Come back.", "x [y] z", "[substeps] Go"]}
  ex = tasks.load_hellaswag_jsonl(pathlib.Path(_jsonl(tmp_path / "hellaswag_val.jsonl", [row])))[0]
  # "[header] How..." -> "Home and Garden: [header] How to plant a tree. Dig a hole. Water it.
  # Then plant the tree" -> tags removed -> one double space collapsed.
  assert ex.fields["query"] == ("Home and Garden: How to plant a tree. Dig a hole. Water it. "
                                "Then plant the tree")
  assert ex.choices == (" Wait.", "Leave. Come back.", "x z", " Go") and ex.gold == 2
  assert ex.uid == "7"


def _hellaswag_text_lines(eval_data_dir):
  path = eval_data_dir / "hellaswag" / tasks.HELLASWAG_TEXT
  return bz2.open(path, "rt", encoding="utf-8").read().split("\n")[:-1]


def test_hellaswag_text_fallback_differences_as_stated(eval_data_dir):
  """The counts HELLASWAG_TEXT_DIFFERENCES (and `evaluate --help`) state, measured on the real
  text file; and that the fallback reads it as it is."""
  lines = _hellaswag_text_lines(eval_data_dir)
  items = [lines[i:i + 6] for i in range(0, len(lines), 6)]
  assert len(items) == 10042
  ctx = [it[0] for it in items]
  ends = [e for it in items for e in it[2:]]
  # ActivityNet contexts end in ctx_b, a fragment OLMES capitalises.
  low = sum(bool(re.search(r"[.!?] [a-z][^.!?]*$", c)) for c in ctx)
  dots = (sum(".. " in c for c in ctx), sum(".. " in e for e in ends))
  brackets = sum("[" in l for l in ctx + ends)
  edge_space = sum(l != l.strip() for l in ctx + ends)
  assert (low, dots, brackets, edge_space) == (3236, (778, 4151), 18, 0)
  note = tasks.HELLASWAG_TEXT_DIFFERENCES
  for n in ("3,236", "778 contexts", "4,151 endings", "18 lines"):
    assert n in note
  got = tasks.load_hellaswag(eval_data_dir)
  assert [e.fields["query"] for e in got[:50]] == ctx[:50]
  assert [e.choices for e in got[:50]] == [tuple(it[2:]) for it in items[:50]]
  assert [e.gold for e in got] == [int(it[1]) for it in items]
  # Its first item: ctx_b "he" stays lower-case (OLMES: "He").
  assert got[0].fields["query"] == "Roof shingle removal: A man is sitting on a roof. he"


def test_hellaswag_original_jsonl_matches_the_text_file(eval_data_dir):
  """With the original release beside the text file: OLMES prompts, same items and labels, and
  every context equal to the text file's once the stated differences are undone."""
  jsonl = eval_data_dir / "hellaswag" / tasks.HELLASWAG_JSONL
  if not jsonl.is_file():
    pytest.skip(f"{jsonl} is absent (eval-data/README.md: the original jsonl could not be "
                "obtained offline); the OLMES path is tested on hand-written rows")
  assert hashlib.sha256(jsonl.read_bytes()).hexdigest() == (
      "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588")
  got = tasks.load_hellaswag(eval_data_dir)
  lines = _hellaswag_text_lines(eval_data_dir)
  assert len(got) == len(lines) // 6 == 10042
  assert [e.gold for e in got] == [int(lines[6 * i + 1]) for i in range(len(got))]
  same = sum(e.fields["query"].lower().replace(".. ", ". ").strip()
             == lines[6 * i].lower().replace(".. ", ". ").strip() for i, e in enumerate(got))
  assert same >= 0.99 * len(got)


def _write(path, text):
  path.parent.mkdir(exist_ok=True)
  return path.write_text(text)


@pytest.mark.parametrize("writer,loader,where", [
    (lambda d: (d / "arc_easy").mkdir() or (d / "arc_easy" / "ARC-Easy-Test.jsonl").write_text(
        '{"id":"a","question":{"stem":"q","choices":[{"text":"x","label":"A"},{"text":"y","label":'
        '"B"}]},"answerKey":"A"}\n{"id":"b","question":{"stem":"q","choices":[{"text":"x","label":'
        '"A"},{"text":"y","label":"B"}]},"answerKey":"C"}\n'),
     "arc_easy", "ARC-Easy-Test.jsonl:2: answerKey 'C'"),
    (lambda d: (d / "csqa").mkdir() or (d / "csqa" / "dev_rand_split.jsonl").write_text(
        '{"answerKey":"A","question":{"stem":"q","choices":[{"label":"A","text":"x"},'
        '{"label":"B","text":"y"}]}}\n\n{"answerKey": "A", "question": {"stem": "q",\n'),
     "csqa", "dev_rand_split.jsonl:3: invalid JSON"),
    (lambda d: (d / "mmlu").mkdir() or (d / "mmlu" / "anatomy_test.csv").write_text(
        '"a\nb",1,2,3,4,A\nq,1,2,3,B\n'), "mmlu", "anatomy_test.csv:3: expected 6 CSV columns"),
    (lambda d: (d / "hellaswag").mkdir() or (d / "hellaswag" / "hellaswag_val_full.txt.bz2"
                                             ).write_bytes(bz2.compress(b"ctx\n7\na\nb\nc\nd\n")),
     "hellaswag", "hellaswag_val_full.txt.bz2:2: gold label should be 0-3"),
    (lambda d: (d / "siqa").mkdir() or (d / "siqa" / "socialIWa_v1.4_dev_wDims.jsonl").write_text(
        '{"context":"c","question":"q","answerA":"a","answerB":"b","label_ix":0}\n'),
     "siqa", "socialIWa_v1.4_dev_wDims.jsonl:1: missing field 'answerC'"),
    (lambda d: _write(d / "piqa" / "valid.jsonl", '{"goal":"g","sol1":"a","sol2":"b"}\n') and
     _write(d / "piqa" / "valid-labels.lst", "0\n1\n"),
     "piqa", "valid-labels.lst: 2 labels for 1 items"),
    (lambda d: None, "openbookqa", "test.jsonl: task file not found"),
])
def test_malformed_file_names_file_and_line(tmp_path, writer, loader, where):
  writer(tmp_path)
  with pytest.raises(tasks.TaskDataError) as e:
    tasks.load_task(loader, tmp_path)
  msg = str(e.value)
  assert "\n" not in msg and where in msg and str(tmp_path) in msg


def test_unknown_task():
  with pytest.raises(tasks.TaskDataError, match="unknown task 'nope'"):
    tasks.load_task("nope", "/nonexistent")


# ----------------------------------------------------------------------------------------------
# Prepared TFDS datasets ("tfds:" + DIR). Each tiny dataset is prepared (ArrayRecord) by a
# test-local, unregistered subclass of the real TFDS builder -- same name, configs, version and
# features, and (except BLiMP, whose generator needs TensorFlow) the real `_generate_examples` run
# on rows of the real release files -- and is then read back through the registered real builder.


def _tfds():
  tfds = pytest.importorskip("tensorflow_datasets")
  import tensorflow_datasets.text  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  return tfds  # (text/ registers the legacy `hellaswag` and `cos_e` builders.)


def _prepare(data_dir, real_name, splits, config=None, generate=None):
  """Prepares `real_name`[/config] in `data_dir` with `splits` {split: _generate_examples kwargs}."""
  tfds = _tfds()
  real = tfds.builder_cls(real_name)
  body = {"name": real.name,
          "_split_generators": lambda self, dl_manager: {
              s: self._generate_examples(**kw) for s, kw in splits.items()}}
  if generate is not None:
    body["_generate_examples"] = generate
  local = type("Local" + real.__name__, (real,), body, skip_registration=True)
  local(data_dir=str(data_dir), config=config, file_format="array_record").download_and_prepare()


def _jsonl(path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def _lines(path, idx):
  lines = path.read_text(encoding="utf-8").splitlines()
  return [lines[i] for i in idx]


def _blimp_generate(self, filepath):
  """blimp's `_generate_examples` with open() for tf.io.gfile (TensorFlow is not installed)."""
  with open(filepath, "rb") as f:
    for line in f:
      d = json.loads(line)
      yield d["UID"] + "_" + d["pairID"], {
          "sentence_good": d["sentence_good"], "sentence_bad": d["sentence_bad"],
          "field": d["field"], "linguistics_term": d["linguistics_term"], "UID": d["UID"],
          "simple_LM_method": d["simple_LM_method"], "one_prefix_method": d["one_prefix_method"],
          "two_prefix_method": d["two_prefix_method"],
          "lexically_identical": d["lexically_identical"], "pair_id": d["pairID"]}


ARC_E_ROWS = [0, 1, 14, 93, 500]  # 14: numeric labels; 93: 3 choices; 500: 5 choices.
ARC_C_ROWS = [0, 44, 121, 836]  # 44: numeric answerKey; 121: 3 choices; 836: 5 choices.
CSQA_ROWS = [0, 1, 22, 247]  # 22, 247: the answer text is repeated among the choices.
OBQA_ROWS = [0, 1, 2, 3]
PIQA_ROWS = [0, 1, 2, 3, 4]
HSWAG_ITEMS = [0, 1, 2, 3, 4, 5, 5000, 10041]
BLIMP_ROWS = {"adjunct_island": [2, 0, 1], "passive_1": [324, 0]}


@pytest.fixture(scope="module")
def tfds_pair(eval_data_dir, tmp_path_factory):
  """(TFDS data dir, eval-data-layout dir) holding the same few real items of 7 tasks."""
  root = tmp_path_factory.mktemp("tfds_tasks")
  tdir, fdir, raw = root / "tfds", root / "files", root / "raw"
  src = eval_data_dir
  # ARC: the AI2 release rows go through ai2_arc's own generator (numeric labels -> A-E).
  for cfg, sub, name, rows in (("ARC-Easy", "arc_easy", "ARC-Easy-Test.jsonl", ARC_E_ROWS),
                               ("ARC-Challenge", "arc_challenge", "ARC-Challenge-Test.jsonl",
                                ARC_C_ROWS)):
    lines = _lines(src / sub / name, rows)
    (fdir / sub).mkdir(parents=True)
    (fdir / sub / name).write_text("\n".join(lines) + "\n")
    _prepare(tdir, "ai2_arc", {"test": {"filepath": _jsonl(raw / name, map(json.loads, lines))}},
             config=cfg)
  # CSQA: cos_e joins the CSQA dev rows (by id) with CoS-E explanation rows.
  cqa = [json.loads(x) for x in _lines(src / "csqa" / "dev_rand_split.jsonl", CSQA_ROWS)]
  _jsonl(fdir / "csqa" / "dev_rand_split.jsonl", cqa)
  cose = _jsonl(raw / "cose_dev.jsonl", [{"id": r["id"], "explanation": {
      "open-ended": "because", "selected": "x"}} for r in cqa])
  _prepare(tdir, "cos_e", {"validation": {"files": [cose],
                                          "cqa_indexed": {r["id"]: r for r in cqa}}})
  # OpenBookQA: TFDS reads Data/Additional/test_complete.jsonl (Main + fact1 and annotations).
  obqa = [json.loads(x) for x in _lines(src / "openbookqa" / "test.jsonl", OBQA_ROWS)]
  _jsonl(fdir / "openbookqa" / "test.jsonl", obqa)
  _prepare(tdir, "openbookqa", {"test": {"data_dir": str(raw), "filepath": _jsonl(
      raw / "test_complete.jsonl", [dict(r, fact1="f", humanScore=1.0, clarity=2.0,
                                         turkIdAnonymized="t") for r in obqa])}})
  # PIQA: TFDS reads the leaderboard dev.jsonl (+ an `id`) and dev-labels.lst.
  piqa = [json.loads(x) for x in _lines(src / "piqa" / "valid.jsonl", PIQA_ROWS)]
  labels = _lines(src / "piqa" / "valid-labels.lst", PIQA_ROWS)
  _jsonl(fdir / "piqa" / "valid.jsonl", piqa)
  (fdir / "piqa" / "valid-labels.lst").write_text("\n".join(labels) + "\n")
  _prepare(tdir, "piqa", {"validation": {
      "data_path": _jsonl(raw / "dev.jsonl", [dict(r, id=f"piqa-{i}") for i, r in zip(
          PIQA_ROWS, piqa)]),
      "label_path": _jsonl(raw / "dev-labels.lst", [int(x) for x in labels])}})
  # HellaSwag: the text file is preprocessed, so only items it leaves as they are (activity
  # label + ": " + ctx, endings) can be turned back into hellaswag_val.jsonl rows.
  text = bz2.decompress((src / "hellaswag" / "hellaswag_val_full.txt.bz2").read_bytes()).decode()
  lines = text.split("\n")
  items = [lines[6 * i:6 * i + 6] for i in HSWAG_ITEMS]
  items = [it for it in items if all(tasks.hellaswag_preprocess(x) == x for x in it)]
  assert len(items) >= 6
  (fdir / "hellaswag").mkdir()
  (fdir / "hellaswag" / "hellaswag_val_full.txt.bz2").write_bytes(
      bz2.compress(("\n".join(x for it in items for x in it) + "\n").encode()))
  rows = []
  for it in items:
    label, ctx = it[0].split(": ", 1)
    rows.append({"ind": len(rows), "activity_label": label, "ctx": ctx, "endings": it[2:],
                 "label": int(it[1]), "split_type": "indomain", "source_id": "activitynet~v_x",
                 "split": "val"})
  _prepare(tdir, "hellaswag", {"validation": {"filepath": _jsonl(raw / "hellaswag_val.jsonl",
                                                                 rows)}})
  # BLiMP: one config per paradigm, split train; rows in a scrambled order.
  for paradigm, idx in BLIMP_ROWS.items():
    lines = _lines(src / "blimp" / f"{paradigm}.jsonl", idx)
    _jsonl(fdir / "blimp" / f"{paradigm}.jsonl",
           sorted(map(json.loads, lines), key=lambda r: int(r["pairID"])))
    _prepare(tdir, "blimp", {"train": {"filepath": _jsonl(raw / f"{paradigm}.jsonl",
                                                          map(json.loads, lines))}},
             config=paradigm, generate=_blimp_generate)
  return tdir, fdir


def _no_uid(examples):
  return sorted((dataclasses.replace(e, uid="") for e in examples), key=repr)


@pytest.mark.parametrize("task", ["arc_easy", "arc_challenge", "csqa", "openbookqa", "piqa",
                                  "hellaswag", "blimp"])
def test_tfds_equals_files(tfds_pair, task):
  tdir, fdir = tfds_pair
  from_tfds = tasks.load_task(task, f"tfds:{tdir}")
  from_files = tasks.load_task(task, fdir)
  assert len(from_tfds) == len(from_files) >= 4
  if task == "csqa":
    # e5ad2184...: gold is the 2nd of two "indestructible" choices; cos_e keeps only the answer
    # text, so TFDS gives the first one (same text, so the same score: identical choices tie).
    (t,) = [e for e in from_tfds if e.uid.startswith("e5ad2184")]
    (f,) = [e for e in from_files if e.uid.startswith("e5ad2184")]
    assert (f.gold, t.gold) == (3, 0) and t.choices == f.choices
    assert dataclasses.replace(t, gold=3) == f
    from_tfds = [e for e in from_tfds if e is not t]
    from_files = [e for e in from_files if e is not f]
  if task in ("arc_easy", "arc_challenge", "csqa", "blimp"):  # TFDS keeps the item ids.
    assert sorted(from_tfds, key=lambda e: e.uid) == sorted(from_files, key=lambda e: e.uid)
  else:
    assert _no_uid(from_tfds) == _no_uid(from_files)
  if task == "blimp":  # Put back in file order: paradigm, then pairID.
    assert from_tfds == from_files
    assert [e.uid for e in from_tfds] == ["adjunct_island/0", "adjunct_island/1",
                                          "adjunct_island/2", "passive_1/0", "passive_1/324"]
  if task == "piqa":
    assert {e.uid for e in from_tfds} == {f"piqa-{i}" for i in PIQA_ROWS}
  if task == "hellaswag":
    assert {e.uid for e in from_tfds} == {f"validation[{i}]" for i in range(len(from_tfds))}
  assert len(tasks.load_task(task, f"tfds:{tdir}", limit=2, seed=1)) == 2


def test_tfds_spot_checks(tfds_pair):
  tdir, _ = tfds_pair
  e = {x.uid: x for x in tasks.load_task("arc_easy", f"tfds:{tdir}")}["NYSEDREGENTS_2015_8_28"]
  assert e.choices[e.gold] == "elements"  # Numeric labels 1-4, answerKey "2" -> "B".
  e = {x.uid: x for x in tasks.load_task("arc_challenge", f"tfds:{tdir}")}["NYSEDREGENTS_2010_4_4"]
  assert e.choices == ("slower", "faster", "at the same speed") and e.gold == 0
  csqa = {x.uid: x for x in tasks.load_task("csqa", f"tfds:{tdir}")}
  e = csqa["1afa02df02c908a558b4036e80242fac"]
  assert e.choices[e.gold] == "bank" and len(e.choices) == 5
  (e,) = [x for x in tasks.load_task("hellaswag", f"tfds:{tdir}")
          if x.fields["query"].startswith("Roof shingle removal")]
  assert e.fields["query"] == "Roof shingle removal: A man is sitting on a roof. he"
  assert e.choices[e.gold] == "starts pulling up roofing on a roof."
  same = [e for e in tasks.load_task("blimp", f"tfds:{tdir}") if e.choices[0] == e.choices[1]]
  assert [e.uid for e in same] == ["passive_1/324"]


def test_tfds_hellaswag_matches_lm_eval_jsonl_but_ctx_b_case(tmp_path):
  """TFDS keeps the joined `ctx`: same clean-up as the original jsonl, minus ctx_b.capitalize()."""
  base = {"activity_label": "Personal Care and Style", "split": "val", "split_type": "zeroshot",
          "source_id": "wikihow_1", "label": 1,
          "endings": ["[substeps] Pick [title] a shade.", "b  c", "[step] d", "e [title] f"]}
  rows = [dict(base, ind=1, ctx_a="[header] How to dye your hair [title] Choose a color. [step]"
               " Think about", ctx_b="The color you want."),  # capitalize() leaves it as it is.
          dict(base, ind=2, ctx_a="A man is on a roof.", ctx_b="he", label=3)]
  for r in rows:
    r["ctx"] = r["ctx_a"] + " " + r["ctx_b"]
  (tmp_path / "hellaswag").mkdir()
  want = tasks.load_hellaswag_jsonl(pathlib.Path(_jsonl(tmp_path / "hellaswag_val.jsonl", rows)))
  _prepare(tmp_path / "tfds", "hellaswag", {"validation": {"filepath": str(
      tmp_path / "hellaswag_val.jsonl")}})
  got = sorted(tasks.load_task("hellaswag", f"tfds:{tmp_path / 'tfds'}"),
               key=lambda e: e.fields["query"])
  assert got[0].fields["query"] == want[1].fields["query"].replace(". He", ". he")
  assert got[0].fields["query"] == "Personal Care and Style: A man is on a roof. he"
  assert got[0].choices == want[1].choices and got[0].gold == 3
  assert dataclasses.replace(got[1], uid="") == dataclasses.replace(want[0], uid="")
  assert got[1].choices == (" Pick. a shade.", "b c", " d", "e. f")


def _one_line_error(task, data_dir, *needles):
  with pytest.raises(tasks.TaskDataError) as e:
    tasks.load_task(task, data_dir)
  msg = str(e.value)
  assert "\n" not in msg, msg
  for n in needles:
    assert n in msg, msg
  return msg


@pytest.mark.parametrize("task,why", [("mmlu", "TFDS has no MMLU"),
                                      ("siqa", "unifiedqa/social_iqa")])
def test_tfds_unsupported_task(tmp_path, task, why):
  _one_line_error(task, f"tfds:{tmp_path}", f"task '{task}'", str(tmp_path), why,
                  "use the eval-data files")


def test_tfds_missing_dataset_split_and_fields(tmp_path, monkeypatch):
  _tfds()
  d = tmp_path / "tfds"
  _one_line_error("piqa", f"tfds:{d}", "TFDS dataset 'piqa'", str(d), "not prepared")
  _one_line_error("hellaswag", f"tfds:{d}", "TFDS dataset 'hellaswag'", str(d), "not prepared")
  _one_line_error("blimp", f"tfds:{d}", "TFDS dataset 'blimp'", str(d), "no prepared paradigm")
  _one_line_error("piqa", "tfds:", "needs a TFDS data dir path")
  # A piqa with only a train split.
  raw = tmp_path / "raw"
  _prepare(d, "piqa", {"train": {
      "data_path": _jsonl(raw / "train.jsonl", [{"id": "a", "goal": "g", "sol1": "x",
                                                 "sol2": "y"}]),
      "label_path": _jsonl(raw / "train-labels.lst", [1])}})
  _one_line_error("piqa", f"tfds:{d}", "TFDS dataset 'piqa'", str(d), "no split 'validation'",
                  "(has train)")
  monkeypatch.setitem(tasks._TFDS_NAMES, "arc_easy", ("piqa", "train"))
  _one_line_error("arc_easy", f"tfds:{d}", "TFDS dataset 'piqa'", "missing field(s) question, "
                  "choices.text, choices.label, answerKey")
  monkeypatch.setitem(tasks._TFDS_NAMES, "arc_easy", ("no_such_dataset_xyz", "test"))
  _one_line_error("arc_easy", f"tfds:{d}", "TFDS dataset 'no_such_dataset_xyz'", str(d),
                  "not found")


def test_tfds_bad_item_names_dataset_and_index(tmp_path):
  row = {"id": "q", "question": {"stem": "s", "choices": [{"text": t, "label": l} for t, l in zip(
      "wxyz", "ABCD")]}, "answerKey": "E"}
  _prepare(tmp_path / "tfds", "ai2_arc", {"test": {"filepath": _jsonl(tmp_path / "t.jsonl",
                                                                      [row])}},
           config="ARC-Easy")
  _one_line_error("arc_easy", f"tfds:{tmp_path / 'tfds'}",
                  f"TFDS dataset 'ai2_arc/ARC-Easy' in {tmp_path / 'tfds'}[test][0]",
                  "answerKey 4 is not one of the choice labels [0, 1, 2, 3]")

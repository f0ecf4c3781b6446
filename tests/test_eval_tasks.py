"""Task loaders on the real files in ../shared/eval-data and on malformed files."""

import bz2
import collections
import json

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
  # lm-eval: " [title]" -> ". ", other [markup] removed, double spaces collapsed, strip; ctx_b
  # capitalised with str.capitalize (rest lower-cased).
  assert ex[1].fields["query"] == (
      "Personal Care and Style: How to dye your hair. Choose a color. Think about What color you"
      " want.")
  # (lm-eval strips before removing markup, so a leading "[substeps] " leaves a space.)
  assert ex[1].choices == (" Pick. a shade.", "b", "c", "d e") and ex[1].gold == 0
  # load_hellaswag prefers the original file when present.
  (tmp_path / "hellaswag").mkdir()
  path.rename(tmp_path / "hellaswag" / "hellaswag_val.jsonl")
  assert len(tasks.load_hellaswag(tmp_path)) == 2


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

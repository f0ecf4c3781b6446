"""End-to-end evaluation (library and CLI) on a tiny random model and real task files."""

import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import sentencepiece as spm

from dualjax.evaluation import suite as ev
from dualjax import tokenizer as tok_lib
from dualjax.evaluation import prompts, tasks
from data_fixtures import embedded_prepared  # noqa: F401  pylint: disable=unused-import

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory, eval_data_dir):
  d = tmp_path_factory.mktemp("sp")
  lines = []
  for t in tasks.TASKS:
    for e in tasks.load_task(t, eval_data_dir, limit=40):
      ctx, comps = prompts.render(e)
      lines += [ctx] + comps
  (d / "corpus.txt").write_text("\n".join(lines))
  spm.SentencePieceTrainer.train(
      input=str(d / "corpus.txt"), model_prefix=str(d / "m"), vocab_size=512, model_type="bpe",
      character_coverage=0.995, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
      user_defined_symbols=["<mask>"] + [f"<special_{i}>" for i in range(11)], minloglevel=2)
  return d / "m.model"


def _need(module):
  return pytest.importorskip(module, reason=f"{module} has not landed in this checkout")


@pytest.fixture(scope="module")
def tiny():
  model_lib = _need("dualjax.model")
  cfg = model_lib.ModelConfig(vocab_size=512, num_layers=1, d_model=32, num_heads=2, head_dim=16,
                              mlp_dim=64, max_seq_len=128, compute_dtype="float32")
  params = model_lib.init(cfg, jax.random.key(0))
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape), params)
  return cfg, params


def test_all_tasks_all_modes(tiny, sp_path, eval_data_dir, tmp_path):
  cfg, params = tiny
  sp = tok_lib.SentencePieceTokenizer(sp_path)
  res = ev.evaluate(params, cfg, sp, tasks.TASKS, ("ar", "prefix", "pll", "mc"),
                    data_dir=eval_data_dir, limit=3, mc_grid=2, row_len=128, step=7,
                    checkpoint="ckpt/7")
  assert set(res["tasks"]) == set(tasks.TASKS)
  for t, r in res["tasks"].items():
    assert r["num_examples"] == 3
    assert set(r["modes"]) == {"ar", "prefix", "pll1", "pll6", "pll", "mc"}
    for m in r["modes"].values():
      assert 0.0 <= m["acc"] <= 1.0
      assert m["score"] == pytest.approx(100 * (m["acc"] - r["baseline"]) / (1 - r["baseline"]))
    assert r["modes"]["pll"]["score"] == max(r["modes"]["pll1"]["score"],
                                             r["modes"]["pll6"]["score"])
  assert res["tasks"]["mmlu"]["modes"]["ar"]["subtasks"]  # Macro-averaged sub-tasks reported.
  for m, h in res["headline"].items():
    assert h["complete"] and h["score"] == pytest.approx(
        np.mean([res["tasks"][t]["modes"][m]["score"] for t in tasks.TASKS]))
  assert res["step"] == 7 and res["config"]["mc_grid"] == 2
  out, md = ev.write_results(res, tmp_path / "r.json")
  assert json.loads(out.read_text())["headline"]["ar"]["score"] == res["headline"]["ar"]["score"]
  assert "| ar |" in md.read_text() and "| pll |" in md.read_text()


def test_identical_blimp_pairs_tie(tiny, sp_path, eval_data_dir, tmp_path):
  """The upstream BLiMP pairs with identical sentences are scored once and tie: 1/2 credit."""
  cfg, params = tiny
  lines = (eval_data_dir / "blimp" / "passive_1.jsonl").read_text().splitlines()
  same = [l for l in lines if json.loads(l)["pairID"] in ("324", "810")]
  assert len(same) == 2
  (tmp_path / "blimp").mkdir()
  (tmp_path / "blimp" / "passive_1.jsonl").write_text("\n".join(same) + "\n")
  sp = tok_lib.SentencePieceTokenizer(sp_path)
  res = ev.evaluate(params, cfg, sp, ["blimp"], ["ar", "pll1"], data_dir=tmp_path)
  for m in ("ar", "pll1"):
    assert res["tasks"]["blimp"]["modes"][m]["acc"] == 0.5
    assert res["tasks"]["blimp"]["modes"][m]["score"] == 0.0


def _cli(*args, cwd=None):
  return subprocess.run([sys.executable, "-m", "dualjax.evaluate", *args], capture_output=True,
                        text=True, cwd=cwd, timeout=120)


def _parallel(cmds, cwd=REPO):
  """Runs the commands at once (each imports jax: seconds), returning CompletedProcess-likes."""
  procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)
           for c in cmds]
  out = []
  for p in procs:
    stdout, stderr = p.communicate(timeout=180)
    out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
  return out


def test_cli_bad_input_one_line_exit_2(eval_data_dir, tmp_path):
  out = tmp_path / "r.json"
  out.write_text("keep me")
  bad = tmp_path / "data"
  (bad / "piqa").mkdir(parents=True)
  (bad / "piqa" / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n{"goal": \n')
  (bad / "piqa" / "valid-labels.lst").write_text("0\n1\n")
  wd = tmp_path / "run"  # passes the path checks; the task errors come before any load
  wd.mkdir()
  (wd / "config.json").write_text("{}")
  cases = [
      ([f"--workdir={wd}", "--config.eval.tasks=piqa", f"--config.eval.data_dir={bad}"],
       f"{bad / 'piqa' / 'valid.jsonl'}:2: invalid JSON"),
      ([f"--workdir={wd}", "--config.eval.tasks=piqa,nope"], "unknown task 'nope'"),
      ([f"--workdir={wd}", "--config.eval.modes=ar,pll0"], "unknown scoring mode 'pll0'"),
      (["--config.eval.tasks=piqa", "--random_init"], "--random_init needs --config.data.tokenizer"),
      (["--config.eval.tasks=piqa", "--checkpoint=/nonexistent/ckpt"], "--checkpoint: not found"),
  ]
  results = _parallel([[sys.executable, "-m", "dualjax.evaluate", *args, f"--out={out}",
                        f"--config.eval.data_dir={eval_data_dir}" if "data_dir" not in
                        " ".join(args) else "--config.eval.limit=1"] for args, _ in cases])
  for (args, msg), r in zip(cases, results):
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0], r.stderr
  assert out.read_text() == "keep me"


@pytest.mark.slow
def test_cli_random_init(sp_path, eval_data_dir, tmp_path):
  _need("dualjax.model")
  _need("dualjax.tokenizer")
  out = tmp_path / "res.json"
  r = _cli("--random_init", f"--config={REPO / 'configs' / 'base.py'}:tiny",
           "--config.model.vocab_size=512", f"--config.data.tokenizer={sp_path}",
           "--config.eval.tasks=piqa,arc_challenge", "--config.eval.modes=ar,pll1",
           "--config.eval.limit=2", f"--config.eval.data_dir={eval_data_dir}", f"--out={out}")
  assert r.returncode == 0, r.stderr
  res = json.loads(out.read_text())
  assert set(res["tasks"]) == {"piqa", "arc_challenge"}
  assert (tmp_path / "res.md").read_text().startswith("Normalised zero-shot scores")


# ----- sample records (--log_samples) ------------------------------------------------------------


def test_sample_records_and_log(tiny, sp_path, eval_data_dir, tmp_path):
  """One record per (item, choice) and mode; per-token log-probs sum to the log-likelihood;
  `chosen`/`gold` reproduce each item's credit; SampleLog writes them as JSONL atomically."""
  cfg, params = tiny
  sp = tok_lib.SentencePieceTokenizer(sp_path)
  log = ev.SampleLog(ev.samples_path(tmp_path / "r.json"))
  assert log.path == tmp_path / "r_samples.jsonl"
  res = ev.evaluate(params, cfg, sp, ["arc_challenge", "openbookqa"], ["ar", "mc"],
                    data_dir=eval_data_dir, limit=3, mc_grid=2, row_len=128, on_sample=log)
  assert not log.path.exists()  # not before commit
  log.commit()
  recs = [json.loads(l) for l in log.path.read_text().splitlines()]
  n_choices = {t: sum(len(e.choices) for e in tasks.load_task(t, eval_data_dir, limit=3))
               for t in ("arc_challenge", "openbookqa")}
  assert len(recs) == 2 * sum(n_choices.values()) == log.count
  for r in recs:
    assert len(r["token_logprobs"]) == len(r["completion_ids"]) >= 1
    assert sum(r["token_logprobs"]) == pytest.approx(r["loglikelihood"], rel=1e-9, abs=1e-9)
    assert r["context"] and r["completion"] and isinstance(r["chosen"], bool)
    if r["task"] == "openbookqa":  # PMI: the unconditional request's tokens too
      assert r["context_uncond"] == prompts.UNCONDITIONAL_CONTEXT
      assert sum(r["token_logprobs_uncond"]) == pytest.approx(r["loglikelihood_uncond"], abs=1e-9)
      assert r["choice_score"] == pytest.approx(r["loglikelihood"] - r["loglikelihood_uncond"])
  for task in ("arc_challenge", "openbookqa"):
    for mode in ("ar", "mc"):
      items: dict[str, list] = {}
      for r in recs:
        if r["task"] == task and r["mode"] == mode:
          items.setdefault(r["doc_id"], []).append(r)
      credit = [sum(c["chosen"] and c["gold"] for c in cs) / sum(c["chosen"] for c in cs)
                for cs in items.values()]
      assert all(sum(c["gold"] for c in cs) == 1 for cs in items.values())
      assert np.mean(credit) == pytest.approx(res["tasks"][task]["modes"][mode]["acc"])
      assert res["tasks"][task]["modes"][mode]["n"] == 3
      assert res["tasks"][task]["modes"][mode]["acc_stderr"] == pytest.approx(
          np.std(credit, ddof=1) / np.sqrt(3))
  # An interrupted evaluation leaves the earlier file as it was.
  again = ev.SampleLog(log.path)
  again({"x": 1})
  again.discard()
  assert len(log.path.read_text().splitlines()) == len(recs)
  assert not again.tmp.exists()


# ----- the CLI checks its paths first --------------------------------------------------------------


def test_cli_path_checks_come_first(eval_data_dir, tmp_path):
  """Each bad path: one line, exit 2, before any task file is read (the task data given is
  broken, so a task read would report it instead) and nothing written."""
  bad = tmp_path / "data"
  (bad / "piqa").mkdir(parents=True)
  (bad / "piqa" / "valid.jsonl").write_text('{"goal": \n')
  (bad / "piqa" / "valid-labels.lst").write_text("0\n")
  not_run = tmp_path / "not_run"
  not_run.mkdir()
  (not_run / "checkpoints" / "5").mkdir(parents=True)
  a_file = tmp_path / "file.txt"
  a_file.write_text("x")
  run = tmp_path / "run"
  (run / "checkpoints" / "3").mkdir(parents=True)
  (run / "config.json").write_text("{}")
  data = f"--config.eval.data_dir={bad}"
  cases = [
      ([f"--workdir={tmp_path / 'missing'}", data], f"--workdir: not found: {tmp_path / 'missing'}"),
      ([f"--workdir={a_file}", data], f"--workdir: not a directory: {a_file}"),
      ([f"--workdir={not_run}", data], f"{not_run} is not a training workdir (no config.json)"),
      ([f"--checkpoint={not_run / 'checkpoints' / '5'}", data], "is not a training workdir"),
      ([f"--checkpoint={run}", data], "is not <workdir>/checkpoints/N"),
      ([f"--workdir={run}", f"--config.eval.data_dir={tmp_path / 'nodata'}"],
       f"--config.eval.data_dir: no such directory: {tmp_path / 'nodata'}"),
      ([f"--workdir={run}", data, f"--out={tmp_path}"], f"--out: {tmp_path} is a directory"),
      ([f"--workdir={run}", data, "--out=/proc/r.json"], "--out: cannot write under /proc"),
      (["--random_init", data], "--random_init needs --out=FILE"),
      ([f"--workdir={run}", f"--checkpoint={run}/checkpoints/3"], "give exactly one of"),
  ]
  t0 = time.monotonic()
  results = _parallel([[sys.executable, "-m", "dualjax.evaluate", *args] for args, _ in cases])
  secs = time.monotonic() - t0
  for (args, msg), r in zip(cases, results):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and msg in lines[0], (args, r.stderr)
  assert not (run / "eval").exists() and sorted(p.name for p in run.iterdir()) == [
      "checkpoints", "config.json"]
  # The whole batch (10 processes, mostly importing jax) is far from a task or checkpoint load.
  assert secs < 120, secs


# ----- a training workdir, end to end ---------------------------------------------------------------


@pytest.mark.slow
def test_cli_workdir_writes_eval_dir_quietly(embedded_prepared, eval_data_dir, tmp_path):
  """`--workdir=W` from another directory: W/eval/step_N.{json,md} and the samples file, absolute
  paths reported, nothing in the current directory, no Orbax/absl lines on stderr; then
  evaluate_combine reads W."""
  _need("dualjax.model")
  wd = tmp_path / "run"
  o = {"model.vocab_size": 1024, "model.d_model": 32, "model.num_heads": 2, "model.head_dim": 16,
       "model.mlp_dim": 64, "model.num_layers": 1, "data.source": "", "data.seq_len": 32,
       "data.global_batch": 8, "objective.lam": 0.5, "train.steps": 2, "checkpoint.every": 2,
       "log.val_every": 0, "data.prepared_dir": str(embedded_prepared)}
  r = subprocess.run([sys.executable, "-m", "dualjax.main", f"--config={REPO / 'configs' / 'rep1.py'}:tiny",
                      f"--workdir={wd}"] + [f"--config.{k}={v}" for k, v in o.items()],
                     cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  cwd = tmp_path / "elsewhere"
  cwd.mkdir()
  env = dict(os.environ, PYTHONPATH=str(REPO))
  r = subprocess.run([sys.executable, "-m", "dualjax.evaluate", f"--workdir={wd}",
                      "--config.eval.tasks=piqa,openbookqa", "--config.eval.modes=ar,mc",
                      "--config.eval.limit=3", "--config.eval.mc_grid=2",
                      f"--config.eval.data_dir={eval_data_dir}", "--log_samples"],
                     cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  ev_dir = wd / "eval"
  files = [ev_dir / "step_2.json", ev_dir / "step_2.md", ev_dir / "step_2_samples.jsonl"]
  assert sorted(ev_dir.iterdir()) == sorted(files) and list(cwd.iterdir()) == []
  lines = r.stderr.strip().splitlines()
  assert lines[-1] == "wrote " + ", ".join(str(f) for f in files), r.stderr
  assert [l.split(":")[0] for l in lines[:-1]] == ["ar", "mc"], r.stderr  # nothing else
  res = json.loads(files[0].read_text())
  assert res["step"] == 2 and res["checkpoint"] == str(wd)
  assert res["tasks"]["piqa"]["modes"]["ar"]["n"] == 3 and "acc_stderr" in res["tasks"]["piqa"]["modes"]["ar"]
  assert "| PIQA | ar | 3 |" in r.stdout
  recs = [json.loads(l) for l in files[2].read_text().splitlines()]
  assert len(recs) == 2 * (3 * 2 + 3 * 4)  # modes x (piqa 2 choices, openbookqa 4)
  for x in recs:
    assert sum(x["token_logprobs"]) == pytest.approx(x["loglikelihood"], abs=1e-9)
  r = subprocess.run([sys.executable, "-m", "dualjax.evaluate_combine", str(wd)], cwd=cwd, env=env,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0 and "| run/step_2 | 2 | ar |" in r.stdout, r.stderr

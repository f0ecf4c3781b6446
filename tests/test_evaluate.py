"""End-to-end evaluation (library and CLI) on a tiny random model and real task files."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import sentencepiece as spm

from dualjax.evaluation import suite as ev
from dualjax import tokenizer as tok_lib
from dualjax.evaluation import prompts, tasks

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


def test_cli_bad_input_one_line_exit_2(eval_data_dir, tmp_path):
  out = tmp_path / "r.json"
  out.write_text("keep me")
  bad = tmp_path / "data"
  (bad / "piqa").mkdir(parents=True)
  (bad / "piqa" / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n{"goal": \n')
  (bad / "piqa" / "valid-labels.lst").write_text("0\n1\n")
  cases = [
      (["--config.eval.tasks=piqa", f"--config.eval.data_dir={bad}"],
       f"{bad / 'piqa' / 'valid.jsonl'}:2: invalid JSON"),
      (["--config.eval.tasks=piqa,nope"], "unknown task 'nope'"),
      (["--config.eval.modes=ar,pll0"], "unknown scoring mode 'pll0'"),
      (["--config.eval.tasks=piqa", "--random_init"], "--random_init needs --config.data.tokenizer"),
      (["--config.eval.tasks=piqa", "--checkpoint=/nonexistent/ckpt"], "--checkpoint: not found"),
  ]
  for args, msg in cases:
    r = _cli(*args, f"--out={out}", f"--config.eval.data_dir={eval_data_dir}" if "data_dir" not in
             " ".join(args) else "--config.eval.limit=1")
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

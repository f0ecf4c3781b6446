"""The lm-evaluation-harness adapter: requests against naive references, the registry, and
lm-eval's accuracy against dualjax's suite on ARC-Easy, PIQA and BLiMP items (AR mode).

The accuracy check runs lm-eval's own evaluator (`lm_eval.evaluator.evaluate`: request building,
`process_results`, aggregation, BLiMP's group mean) on local tasks built from dualjax's task files
and prompts (`lm_eval_adapter.suite_task_dict`), and compares it item by item with
`dualjax.evaluation.suite.evaluate(..., modes=['ar'])` on the same model, items and prompts.
DUALJAX_LM_EVAL_LIMIT=N runs it on N items per task (default 10).
"""

import functools
import json
import logging
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

import lm_eval.evaluator  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model, model_registry  # noqa: E402

from dualjax import convert, generate, lm_eval_adapter, trained  # noqa: E402
from dualjax import model as model_lib  # noqa: E402
from dualjax import tokenizer as tok_lib  # noqa: E402
from dualjax.evaluation import metrics, prompts, scoring, suite, tasks  # noqa: E402
from interop_fixtures import sentencepiece_model, tiny_model  # noqa: E402

TASKS = ("arc_easy", "piqa", "blimp")
LIMIT = int(os.environ.get("DUALJAX_LM_EVAL_LIMIT", "10"))
logging.getLogger("lm_eval").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  d = tmp_path_factory.mktemp("lmeval")
  sp = sentencepiece_model(d / "sp.model")
  cfg, params = tiny_model("mlp", vocab_size=512)
  params = jax.tree.map(jnp.asarray, params)
  tok = tok_lib.load_tokenizer(sp)
  model = trained.Trained(params, cfg, tok, 0, None, d)
  return d, sp, cfg, params, tok, lm_eval_adapter.DualjaxLM(model=model, batch_size=4)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _apply(params, tokens_1xL, seg_1xL, *, cfg):
  return model_lib.apply(params, tokens_1xL, seg_1xL, cfg=cfg, mode="causal")


def logp(cfg, params, seq):
  """float64 log-softmax of the causal model on exactly `seq` (one unpadded row, padded to one
  compiled shape with segment 0)."""
  L = cfg.max_seq_len
  tok = np.zeros((1, L), np.int32)
  tok[0, :len(seq)] = seq
  seg = (np.arange(L) < len(seq)).astype(np.int32)[None]
  x = np.asarray(_apply(params, tok, seg, cfg=cfg)[0, :len(seq)], np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def naive_request(cfg, params, bos, ctx, comp):
  """(Σ log p(comp | <s> ctx), every comp token the argmax)."""
  seq = [bos, *ctx, *comp]
  lp = logp(cfg, params, seq[:-1])
  rows = lp[len(ctx) + np.arange(len(comp))]
  return float(rows[np.arange(len(comp)), comp].sum()), bool((rows.argmax(-1) == comp).all())


def _instances(kind, args):
  return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


# ----- requests -----------------------------------------------------------------------------------


def test_loglikelihood_equals_naive(setup):
  _, _, cfg, params, tok, lm = setup
  pairs = [("Question: What is heavy?\nAnswer:", " a rock"), ("", "The cat sat."),
           ("In the beginning", " God created"), ("Question: What is heavy?\nAnswer:", " a rock"),
           ("A" * 300, " and so on")]  # long context: the oldest tokens are dropped
  assert len(tok.encode(pairs[-1][0])) > cfg.max_seq_len
  got = lm.loglikelihood(_instances("loglikelihood", pairs))
  for (ctx, cont), (ll, greedy) in zip(pairs, got):
    r = scoring.fit(scoring.split_encode(tok, ctx, cont), cfg.max_seq_len)
    want_ll, want_greedy = naive_request(cfg, params, tok.bos_id, r.ctx, r.comp)
    assert ll == pytest.approx(want_ll, rel=1e-5, abs=1e-4)
    assert greedy == want_greedy
  assert got[0] == got[3]


def test_is_greedy(setup):
  _, _, cfg, params, tok, lm = setup
  ctx = tuple(tok.encode("Once upon a time"))
  out = generate.generate_ar(params, cfg, *generate.pad_prompts([[tok.bos_id, *ctx]]),
                             key=jax.random.key(0), max_new_tokens=5)
  greedy = tuple(np.asarray(out.tokens[0]).tolist())
  other = greedy[:-1] + ((greedy[-1] + 1) % cfg.vocab_size,)
  ll, is_greedy = lm.score_requests([scoring.Request(ctx, greedy), scoring.Request(ctx, other),
                                     scoring.Request(ctx, greedy[:2])])
  assert is_greedy.tolist() == [True, False, True]
  assert ll[0] == pytest.approx(naive_request(cfg, params, tok.bos_id, ctx, greedy)[0], abs=1e-4)


def test_loglikelihood_rolling(setup):
  _, _, cfg, params, tok, lm = setup
  long_text = " ".join(f"verse {i} of the long chapter." for i in range(60))
  short_text = "A short text."
  ids = tok.encode(long_text)
  assert len(ids) > 2 * cfg.max_seq_len  # several windows
  windows = lm.rolling_requests(long_text)
  assert len(windows) >= 3 and sum(len(w.comp) for w in windows) == len(ids)
  assert [t for w in windows for t in w.comp] == ids  # every token predicted exactly once
  for w in windows:
    assert 1 + len(w.ctx) + len(w.comp) <= cfg.max_seq_len
  got = lm.loglikelihood_rolling(_instances("loglikelihood_rolling",
                                            [(long_text,), (short_text,), ("",)]))
  want_long = sum(naive_request(cfg, params, tok.bos_id, w.ctx, w.comp)[0] for w in windows)
  want_short = naive_request(cfg, params, tok.bos_id, (), tuple(tok.encode(short_text)))[0]
  np.testing.assert_allclose(got, [want_long, want_short, 0.0], rtol=1e-5, atol=1e-3)
  # Every window after the first has the full context: <s> + ctx + comp fills max_seq_len.
  assert all(1 + len(w.ctx) + len(w.comp) == cfg.max_seq_len for w in windows[1:])


def naive_greedy(cfg, params, prompt, n, eos):
  seq = list(prompt)
  for _ in range(n):
    nxt = int(logp(cfg, params, seq)[-1].argmax())
    if nxt == eos:
      break
    seq.append(nxt)
  return seq[len(prompt):]


def test_generate_until(setup):
  _, _, cfg, params, tok, lm = setup
  ctxs = ["Question: What is heavy?\nAnswer:", "The", "x" * 400]
  assert len(tok.encode(ctxs[2])) > cfg.max_seq_len  # the oldest context tokens are dropped
  n = 6
  keep = cfg.max_seq_len - n - 1
  want = [tok.decode(naive_greedy(cfg, params, [tok.bos_id, *tok.encode(c)[-keep:]], n,
                                  tok.eos_id)) for c in ctxs]
  assert len(want[0]) > 3
  stop = want[0][1:3]  # an until string inside the greedy text
  reqs = [(ctxs[0], {"until": ["\n\n"], "max_gen_toks": n}),
          (ctxs[1], {"until": ["Q"], "max_gen_toks": n, "do_sample": False}),
          (ctxs[2], {"until": [], "max_gen_toks": n}),
          (ctxs[0], {"until": ["zzz", stop], "max_gen_toks": n})]
  got = lm.generate_until(_instances("generate_until", reqs))
  assert got == [want[0].split("\n\n")[0], want[1].split("Q")[0], want[2],
                 want[0][:want[0].index(stop)]]
  # Sampling (the same batch shape, hence the same compiled function): deterministic for the
  # adapter's seed, and not the greedy text.
  kw = {"until": [], "max_gen_toks": n, "do_sample": True, "temperature": 1.0, "top_k": 50}
  sampled = [(c, kw) for c in (ctxs[2], ctxs[0], ctxs[1], ctxs[0])]
  a = lm.generate_until(_instances("generate_until", sampled))
  assert a == lm.generate_until(_instances("generate_until", sampled))
  assert a != [want[2], want[0], want[1], want[0]]


@pytest.fixture(scope="module")
def workdir(setup):
  d, sp, cfg, params, _, _ = setup
  convert.write_workdir(params, cfg, sp, d / "work", step=7)
  return d / "work"


def test_registry_and_workdir(setup, workdir):
  cfg = setup[2]
  cls = get_model("dualjax")
  assert cls is lm_eval_adapter.DualjaxLM
  assert "hf" in model_registry  # lm-eval's own models are still registered
  lm = cls.create_from_arg_string(f"workdir={workdir},batch_size=2,greedy=False",
                                  {"device": "cpu", "batch_size": None})
  assert lm.model.step == 7 and lm.batch_size == 2 and lm.max_length == cfg.max_seq_len
  pairs = [("The", " cat"), ("", "A dog.")]
  got = lm.loglikelihood(_instances("loglikelihood", pairs))
  want = setup[-1].loglikelihood(_instances("loglikelihood", pairs))
  assert [g[1] for g in got] == [False, False]
  np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-6)
  with pytest.raises(ValueError, match="needs workdir=DIR"):
    cls()


@pytest.mark.slow
def test_lm_eval_command_line(setup, workdir, tmp_path, monkeypatch, capsys):
  """lm-eval's own CLI (`run --model dualjax`) on a local YAML task over a JSONL file."""
  lm = setup[-1]
  items = [{"question": "What is heavy?", "choices": ["a rock", "a feather"], "gold": 1},
           {"question": "Who made it?", "choices": ["God", "a cat", "the hacker"], "gold": 2},
           {"question": "Why?", "choices": ["no", "yes"], "gold": 0}]
  (tmp_path / "items.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
  (tmp_path / "local_mc.yaml").write_text(
      "task: local_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
      f"    test: {tmp_path / 'items.jsonl'}\n  cache_dir: {tmp_path / 'cache'}\n"
      "output_type: multiple_choice\ntest_split: test\n"
      "doc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_target: \"{{gold}}\"\n"
      "doc_to_choice: \"{{choices}}\"\nmetric_list:\n  - metric: acc\n    aggregation: mean\n"
      "    higher_is_better: true\nmetadata:\n  version: 1.0\n")
  monkeypatch.setattr(sys, "argv", ["lm_eval"])
  lm_eval_adapter.main(["run", "--model", "dualjax", "--model_args", f"workdir={workdir}",
                        "--tasks", "local_mc", "--include_path", str(tmp_path)])
  row = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("|local_mc"))
  acc = float(row.split("|")[7])
  want = []
  for x in items:
    lls = [ll for ll, _ in lm.loglikelihood(_instances("loglikelihood", [
        (f"Question: {x['question']}\nAnswer:", " " + c) for c in x["choices"]]))]
    want.append(float(np.argmax(lls) == x["gold"]))
  assert acc == pytest.approx(np.mean(want), abs=1e-4)


# ----- lm-eval's accuracy against the suite's -----------------------------------------------------


def lm_eval_item_view(sample, choices, norm):
  """lm-eval's per-item outcome, re-derived from its log-likelihoods with its conventions."""
  lls = np.array([r[0] for r in sample["filtered_resps"]], np.float64)
  gold = sample["target"]
  pred = int(np.argmax(lls))
  pred_norm = int(np.argmax(lls / np.array([len(c) for c in choices], np.float64)))
  assert sample["acc"] == float(pred == gold)
  if "acc_norm" in sample:
    assert sample["acc_norm"] == float(pred_norm == gold)
  return lls, (sample["acc_norm"] if norm == "per_char" else sample["acc"])


def explain(norm, lls, choices, completions, gold):
  """Why lm-eval's and dualjax's outcome of one item can differ with the same log-likelihoods:
  'normaliser' (len(choice) vs len(' ' + choice) change the argmax), 'tie' (dualjax gives 1/m to
  an m-way tie including gold, lm-eval's argmax the first), or None."""
  dj = metrics.choice_scores(norm, lls, completions)
  if norm == "per_char" and int(np.argmax(lls / np.array([len(c) for c in choices]))) != int(
      np.argmax(dj)):
    return "normaliser"
  if np.sum(dj == dj.max()) > 1:
    return "tie"
  return None


def test_explain_synthetic():
  choices, comps = ["a", "bbbb"], [" a", " bbbb"]
  lls = np.array([-2.0, -7.0])  # lm-eval: -2/1 < -7/4 -> 1; dualjax: -2/2 > -7/5 -> 0
  assert explain("per_char", lls, choices, comps, 0) == "normaliser"
  assert explain("raw", np.array([-3.0, -3.0]), choices, choices, 0) == "tie"
  assert explain("per_char", np.array([-1.0, -9.0]), choices, comps, 0) is None


def compare(lm, examples, tok, params, cfg):
  """lm-eval (its evaluator on `suite_task_dict`) against dualjax (the suite's requests, Scorer
  and summarise_task) on the same items: {task: (lm-eval acc, dualjax acc, differing items)},
  with every differing item explained."""
  res = lm_eval.evaluator.evaluate(lm, lm_eval_adapter.suite_task_dict(examples),
                                   bootstrap_iters=0, log_samples=True)
  requests, per_task = suite.build_requests(examples, tok)
  ll_all = scoring.Scorer(params, cfg, bos_id=tok.bos_id, mask_id=tok.mask_id).score(
      requests, "ar")
  out = {}
  for task, tr in per_task.items():
    norm = metrics.NORMALISATION[task]
    by_uid = {}
    for name, samples in res["samples"].items():
      if name == f"dualjax_{task}" or name.startswith(f"dualjax_{task}_"):
        by_uid.update({s["doc"]["uid"]: s for s in samples})
    assert len(by_uid) == len(tr.examples)
    lm_items, subs, diffs = [], [], []
    for i, ex in enumerate(tr.examples):
      s = by_uid[ex.uid]
      ctx, comps = prompts.render(ex)
      assert list(s["arguments"]) == [(ctx, c) for c in comps]  # the same prompts
      lls_lm, lm_acc = lm_eval_item_view(s, ex.choices, norm)
      lls_dj = ll_all[tr.cond[i]]
      np.testing.assert_allclose(lls_lm, lls_dj, rtol=1e-5, atol=1e-4)
      dj_acc = metrics.item_accuracy(metrics.choice_scores(norm, lls_dj, comps), ex.gold)
      lm_items.append(lm_acc)
      subs.append(ex.subtask)
      if lm_acc != dj_acc:
        why = explain(norm, lls_dj, ex.choices, comps, ex.gold)
        assert why is not None, (task, ex.uid, lls_dj, lm_acc, dj_acc)
        diffs.append((ex.uid, why, lm_acc, dj_acc))
    metric = "acc_norm,none" if norm == "per_char" else "acc,none"
    lm_acc = res["results"][f"dualjax_{task}"][metric]
    if task in metrics.MACRO_AVERAGED:  # lm-eval's group: the unweighted mean of its sub-tasks
      want = np.mean([np.mean([a for a, s in zip(lm_items, subs) if s == sub])
                      for sub in sorted(set(subs))])
    else:
      want = np.mean(lm_items)
    assert lm_acc == pytest.approx(want, abs=1e-12)
    dj_acc = metrics.summarise_task(task, tr.examples, tr.completions,
                                    [ll_all[i] for i in tr.cond])["acc"]
    if not diffs:
      assert lm_acc == pytest.approx(dj_acc, abs=1e-12)
    out[task] = (lm_acc, dj_acc, diffs, res["results"][f"dualjax_{task}"]["acc,none"])
  return out


def test_lm_eval_accuracy_equals_suite(setup, eval_data_dir):
  """ARC-Easy and PIQA: lm-eval's acc_norm (ll / len(choice)) against dualjax's per-character
  score (ll / len(' ' + choice)); BLiMP: acc (raw sum) against dualjax's raw sum."""
  _, _, cfg, params, tok, lm = setup
  examples = {t: tasks.load_task(t, eval_data_dir, limit=LIMIT, seed=0) for t in TASKS}
  got = compare(lm, examples, tok, params, cfg)
  ours = suite.evaluate(params, cfg, tok, TASKS, ["ar"], data_dir=eval_data_dir, limit=LIMIT,
                        seed=0)
  for task, (lm_acc, dj_acc, diffs, plain_acc) in got.items():
    assert ours["tasks"][task]["modes"]["ar"]["acc"] == pytest.approx(dj_acc, abs=1e-12)
    print(f"{task}: {len(examples[task])} items, lm-eval {lm_acc:.4f} (plain acc "
          f"{plain_acc:.4f}), dualjax {dj_acc:.4f}, differing: {diffs}")


def test_blimp_identical_pairs_are_ties(setup, eval_data_dir):
  """BLiMP's identical pairs: lm-eval's argmax takes the first (gold) choice, 1; dualjax 1/2."""
  _, _, cfg, params, tok, lm = setup
  same = [e for e in tasks.load_task("blimp", eval_data_dir) if e.choices[0] == e.choices[1]]
  assert len(same) == 7
  lm_acc, dj_acc, diffs, _ = compare(lm, {"blimp": same}, tok, params, cfg)["blimp"]
  assert lm_acc == 1.0 and dj_acc == 0.5
  assert [d[1:] for d in diffs] == [("tie", 1.0, 0.5)] * 7

"""Batched scoring modes against naive one-sequence-at-a-time references on a tiny model."""

import functools
import itertools
import math

import jax
import numpy as np
import pytest
import sentencepiece as spm

model_lib = pytest.importorskip(
    "dualjax.model", reason="dualjax.model (the model issue) has not landed in this checkout")

from dualjax import tokenizer as tok_lib
from dualjax.evaluation import metrics, prompts, scoring, suite, tasks
from interop_fixtures import authors_style_tokenizer, corpus_texts

BOS, MASK = 1, 4


@pytest.fixture(scope="module")
def sp(tmp_path_factory, eval_data_dir):
  """A real SentencePiece BPE model (byte fallback, the project's special-id layout)."""
  d = tmp_path_factory.mktemp("sp")
  lines = []
  for t in ("arc_easy", "siqa", "piqa"):
    for e in tasks.load_task(t, eval_data_dir, limit=300):
      ctx, comps = prompts.render(e)
      lines += [ctx] + comps
  (d / "corpus.txt").write_text("\n".join(lines))
  spm.SentencePieceTrainer.train(
      input=str(d / "corpus.txt"), model_prefix=str(d / "m"), vocab_size=512, model_type="bpe", character_coverage=0.995,
      byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
      user_defined_symbols=["<mask>"] + [f"<special_{i}>" for i in range(11)], minloglevel=2)
  return tok_lib.SentencePieceTokenizer(d / "m.model")


@pytest.fixture(scope="module")
def tiny():
  """A tiny random model; out-projections perturbed away from their zero init so attention
  (hence the mode) matters."""
  cfg = model_lib.ModelConfig(vocab_size=512, num_layers=2, d_model=32, num_heads=2, head_dim=16,
                              mlp_dim=64, max_seq_len=128, compute_dtype="float32")
  params = model_lib.init(cfg, jax.random.key(0))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [p + 0.3 * jax.random.normal(k, p.shape, p.dtype) * (np.std(p) + 0.05)
            for p, k in zip(leaves, keys)]
  return cfg, jax.tree.unflatten(tree, leaves)


@pytest.fixture(scope="module")
def requests(sp, eval_data_dir):
  out = []
  for t in ("arc_challenge", "siqa", "blimp", "hellaswag"):
    for e in tasks.load_task(t, eval_data_dir, limit=2, seed=5):
      ctx, comps = prompts.render(e)
      out += [scoring.split_encode(sp, ctx, c) for c in comps[:2]]
  out.append(scoring.split_encode(sp, prompts.UNCONDITIONAL_CONTEXT, " yes"))
  # HellaSwag contexts exceed max_seq_len=128: keep their newest 127 tokens (as Scorer does).
  return [scoring.fit(r, 128) for r in out]


# ----- naive references: one sequence per call, no packing, float64 log-softmax -----------------


@functools.partial(jax.jit, static_argnames=("cfg", "mode"))
def _apply_one(params, tokens_1xL, seg_1xL, prefix_len_1, *, cfg, mode):
  kw = {"prefix_len_B": prefix_len_1} if mode == "prefix" else {}
  return model_lib.apply(params, tokens_1xL, seg_1xL, cfg=cfg, mode=mode, **kw)


def _logp(cfg, params, tokens, mode, prefix_len=0):
  """float64 log-softmax for one sequence (right-padded to max_seq_len as segment 0, which it
  never attends, so that one compiled shape serves every length)."""
  s = len(tokens)
  tok = np.zeros((1, cfg.max_seq_len), np.int32)
  tok[0, :s] = tokens
  seg = (np.arange(cfg.max_seq_len) < s).astype(np.int32)[None]
  logits = np.asarray(_apply_one(params, tok, seg, np.array([prefix_len], np.int32), cfg=cfg,
                                 mode=mode)[0, :s], np.float64)
  m = logits.max(-1, keepdims=True)
  return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def naive_ar(cfg, params, r, prefix=False, bos=BOS):
  seq = [bos, *r.ctx, *r.comp]
  c = len(r.ctx)
  lp = _logp(cfg, params, seq[:-1], "prefix" if prefix else "causal", prefix_len=c + 1)
  return sum(lp[c + i, seq[c + 1 + i]] for i in range(len(r.comp)))


def naive_pll(cfg, params, r, k, bos=BOS, mask=MASK):
  c, n = len(r.ctx), len(r.comp)
  total = 0.0
  for i in range(n):
    toks = [bos, *r.ctx, *r.comp[:i]] + [mask] * min(k, n - i)
    total += _logp(cfg, params, toks, "bidirectional")[c + i, r.comp[i]]
  return total


def naive_all_remaining_masked(cfg, params, r):
  c, n = len(r.ctx), len(r.comp)
  return sum(_logp(cfg, params, [BOS, *r.ctx, *r.comp[:i]] + [MASK] * (n - i),
                   "bidirectional")[c + i, r.comp[i]] for i in range(n))


def naive_masked_sum(cfg, params, r, masked):
  """Σ_{i ∈ masked} log p(c_i | ctx, unmasked completion tokens), bidirectional."""
  c = len(r.ctx)
  toks = [BOS, *r.ctx] + [MASK if i in masked else t for i, t in enumerate(r.comp)]
  lp = _logp(cfg, params, toks, "bidirectional")
  return sum(lp[c + i, r.comp[i]] for i in masked)


def naive_mc(cfg, params, r, grid, seed):
  t = (np.arange(grid) + 0.5) / grid
  m = scoring.mc_masks(r, grid, seed)  # The estimator's randomness, shared on purpose.
  return sum(naive_masked_sum(cfg, params, r, set(np.flatnonzero(m[g]))) / t[g]
             for g in range(grid)) / grid


def exact_elbo(cfg, params, r):
  """∫₀¹ (1/t) E_m[Σ_{i∈m} log p] dt = Σ_m B(|m|, n−|m|+1) Σ_{i∈m} log p, by enumeration."""
  n = len(r.comp)
  total = 0.0
  for size in range(1, n + 1):
    beta = math.factorial(size - 1) * math.factorial(n - size) / math.factorial(n)
    for masked in itertools.combinations(range(n), size):
      total += beta * naive_masked_sum(cfg, params, r, set(masked))
  return total


# ----- tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ar", "prefix", "pll1", "pll6", "mc"])
def test_batched_mode_equals_naive(tiny, requests, mode):
  cfg, params = tiny
  # Rows of 32 tokens: several units per row, longer units in 64/128 buckets, 8-device mesh.
  scorer = scoring.Scorer(params, cfg, row_len=32, batch_tokens=512)
  got = scorer.score(requests, mode, mc_grid_size=4, mc_seed=3)
  if mode in ("ar", "prefix"):
    want = [naive_ar(cfg, params, r, prefix=mode == "prefix") for r in requests]
  elif mode.startswith("pll"):
    want = [naive_pll(cfg, params, r, int(mode[3:])) for r in requests]
  else:
    want = [naive_mc(cfg, params, r, 4, 3) for r in requests]
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-4)
  assert scorer.stats["units"] > scorer.stats["calls"]  # Many sequences per call.
  # Few compiled shapes: at most one per bucket row length.
  assert scorer._fns[scoring.attention_kind(scoring.parse_mode(mode)[0])]._cache_size() <= 3


@pytest.mark.parametrize("mode", ["ar", "pll1", "mc"])
def test_score_tokens_sum_to_the_score(tiny, requests, mode):
  """Per-token values sum to each request's log-likelihood; in 'ar' each is the naive float64
  log p(c_i | <s> ctx c_<i)."""
  cfg, params = tiny
  scorer = scoring.Scorer(params, cfg, row_len=32, batch_tokens=512)
  total = scorer.score(requests, mode, mc_grid_size=4, mc_seed=3)
  got, per_token = scorer.score_tokens(requests, mode, mc_grid_size=4, mc_seed=3)
  np.testing.assert_array_equal(got, total)
  assert [len(p) for p in per_token] == [len(r.comp) for r in requests]
  np.testing.assert_allclose([p.sum() for p in per_token], total, rtol=1e-12, atol=1e-9)
  if mode == "ar":
    for r, p in zip(requests[:4], per_token):
      seq, c = [BOS, *r.ctx, *r.comp], len(r.ctx)
      lp = _logp(cfg, params, seq[:-1], "causal")
      np.testing.assert_allclose(p, [lp[c + i, seq[c + 1 + i]] for i in range(len(r.comp))],
                                 rtol=2e-5, atol=2e-5)
  assert all((p <= 1e-6).all() for p in per_token)  # log-probabilities (mc: weighted sums)


def test_prefix_differs_from_ar_with_context(tiny, requests):
  cfg, params = tiny
  scorer = scoring.Scorer(params, cfg, row_len=64)
  with_ctx = [r for r in requests if r.ctx]
  ar, pre = scorer.score(with_ctx, "ar"), scorer.score(with_ctx, "prefix")
  assert np.abs(ar - pre).max() > 1e-3  # The bidirectional prefix is really used.


def test_prefix_blimp_equals_ar(tiny, sp, eval_data_dir):
  cfg, params = tiny
  reqs = [scoring.split_encode(sp, *[(ctx, c) for ctx, cs in [prompts.render(e)] for c in cs][j])
          for e in tasks.load_task("blimp", eval_data_dir, limit=6, seed=1) for j in range(2)]
  assert all(not r.ctx for r in reqs)
  scorer = scoring.Scorer(params, cfg, row_len=64)
  np.testing.assert_allclose(scorer.score(reqs, "prefix"), scorer.score(reqs, "ar"),
                             rtol=1e-6, atol=1e-5)


def test_pll_with_large_k_masks_all_remaining(tiny, requests):
  cfg, params = tiny
  reqs = requests[:5]
  n_max = max(len(r.comp) for r in reqs)
  scorer = scoring.Scorer(params, cfg, row_len=64)
  got = scorer.score(reqs, f"pll{n_max}")
  np.testing.assert_allclose(got, scorer.score(reqs, "pll1000"), rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(got, [naive_all_remaining_masked(cfg, params, r) for r in reqs],
                             rtol=2e-5, atol=2e-4)


def test_mc_converges_to_exact_elbo(tiny, sp):
  cfg, params = tiny
  r = scoring.Request(tuple(sp.encode("Question: why?\nAnswer:")), tuple(sp.encode(" ok then")))
  n = len(r.comp)
  assert 2 <= n <= 5
  exact = exact_elbo(cfg, params, r)
  # Per-mask scores S(m), for the estimator's exact mean and variance at grid size G.
  subsets = [frozenset(s) for k in range(n + 1) for s in itertools.combinations(range(n), k)]
  s_m = {m: naive_masked_sum(cfg, params, r, m) if m else 0.0 for m in subsets}

  def moments(grid):
    t = (np.arange(grid) + 0.5) / grid
    mean = var = 0.0
    for tg in t:
      p = {m: tg ** len(m) * (1 - tg) ** (n - len(m)) for m in subsets}
      e1 = sum(p[m] * s_m[m] / tg for m in subsets)
      e2 = sum(p[m] * (s_m[m] / tg) ** 2 for m in subsets)
      mean += e1 / grid
      var += (e2 - e1 ** 2) / grid ** 2
    return mean, var

  scorer = scoring.Scorer(params, cfg, row_len=128, batch_tokens=8192)
  errs = {}
  for grid in (8, 4096):
    mean, var = moments(grid)
    est = scorer.score([r] * 4, "mc", mc_grid_size=grid, mc_seed=11)[0]
    assert abs(est - mean) < 5 * math.sqrt(var)  # Unbiased for the midpoint rule...
    errs[grid] = (abs(mean - exact), math.sqrt(var))
  # ...whose bias and spread both vanish as G grows.
  assert errs[4096][0] < 1e-3 * abs(exact)
  assert errs[4096][1] < 0.05 * abs(exact) and errs[4096][1] < errs[8][1] / 10


def test_sharded_equals_single_device(tiny, requests):
  cfg, params = tiny
  one = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  a = scoring.Scorer(params, cfg, row_len=32, mesh=one).score(requests, "pll1")
  b = scoring.Scorer(params, cfg, row_len=32).score(requests, "pll1")
  assert jax.device_count() == 8
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_split_encode(sp):
  ctx, comp = "Question: Which café?\nAnswer:", " é naïve"
  r = scoring.split_encode(sp, ctx, comp)
  assert list(r.ctx) + list(r.comp) == sp.encode(ctx + comp)  # Joint encoding, no seam.
  assert sp.decode(list(r.comp)).strip() == comp.strip()
  assert sp.decode(list(r.ctx)) == sp.decode(sp.encode(ctx))
  assert scoring.split_encode(sp, "", "Cats sleep.") == scoring.Request((), tuple(
      sp.encode("Cats sleep.")))

  class NoOffsets:  # Only the plain protocol: lm-eval's context-prefix rule.
    def encode(self, text):
      return sp.encode(text)

  assert scoring.split_encode(NoOffsets(), ctx, comp) == r


def test_fit_and_bad_mode():
  r = scoring.Request(tuple(range(10, 20)), (5, 6, 7))
  assert scoring.fit(r, 8) == scoring.Request((16, 17, 18, 19), (5, 6, 7))
  assert scoring.fit(r, 3) == scoring.Request((), (5, 6))
  with pytest.raises(ValueError, match="unknown scoring mode 'pll0'"):
    scoring.parse_mode("pll0")


# ----- special ids from the tokenizer -----------------------------------------------------------

# An imported (authors-style) tokenizer.json whose <s> and <mask> are not dualjax's 1 and 4.
HF_SPECIALS = ["<pad>", "<unk>", "</s>", "<mask>", "<s>"] + [f"<special_{i}>" for i in range(11)]


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory, eval_data_dir):
  d = tmp_path_factory.mktemp("hf")
  texts = corpus_texts(20) + ["".join([ctx, *comps]) for e in tasks.load_task(
      "arc_easy", eval_data_dir, limit=200) for ctx, comps in [prompts.render(e)]]
  tok = tok_lib.HFTokenizer(authors_style_tokenizer(d / "tokenizer.json", texts, vocab_size=400,
                                                    specials=HF_SPECIALS))
  assert (tok.bos_id, tok.mask_id) == (4, 3)
  return tok


def test_scorer_and_suite_use_the_tokenizers_special_ids(tiny, hf_tok, eval_data_dir):
  cfg, params = tiny
  examples = tasks.load_task("arc_easy", eval_data_dir, limit=2, seed=2)
  rendered = [prompts.render(e) for e in examples]
  reqs = [[scoring.split_encode(hf_tok, ctx, c) for c in cs] for ctx, cs in rendered]
  flat = [r for rs in reqs for r in rs]
  naive = {"ar": lambda r: naive_ar(cfg, params, r, bos=4),
           "pll1": lambda r: naive_pll(cfg, params, r, 1, bos=4, mask=3)}
  want = {m: [np.array([f(r) for r in rs]) for rs in reqs] for m, f in naive.items()}
  assert scoring.special_ids(hf_tok) == (4, 3)
  # The scorer: dualjax's defaults (1, 4) until told the tokenizer's.
  scorer = scoring.Scorer(params, cfg, row_len=64)
  for mode in naive:
    default = scorer.score(flat, mode)
    got = scorer.with_special_ids(4, 3).score(flat, mode)
    scorer.with_special_ids(1, 4)
    np.testing.assert_allclose(got, np.concatenate(want[mode]), rtol=2e-5, atol=2e-4)
    assert np.abs(default - got).max() > 1e-2  # the ids matter
  # The suite sets them from the tokenizer, on a scorer it is given (e.g. the trainer's, made
  # with the defaults) and on one it makes.
  res = suite.evaluate(params, cfg, hf_tok, ["arc_easy"], list(naive), data_dir=eval_data_dir,
                       limit=2, seed=2, scorer=scorer)
  assert (scorer.bos_id, scorer.mask_id) == (4, 3)
  assert res["config"]["special_ids"] == {"bos": 4, "mask": 3}
  fresh = suite.evaluate(params, cfg, hf_tok, ["arc_easy"], ["pll1"], data_dir=eval_data_dir,
                         limit=2, seed=2, row_len=64)
  for mode in naive:
    acc = metrics.summarise_task("arc_easy", examples, [cs for _, cs in rendered],
                                 want[mode])["acc"]
    assert res["tasks"]["arc_easy"]["modes"][mode]["acc"] == acc
  assert fresh["tasks"]["arc_easy"]["modes"]["pll1"]["acc"] == res["tasks"]["arc_easy"][
      "modes"]["pll1"]["acc"]
  with pytest.raises(ValueError, match="mask_id=600 is outside the model's vocabulary of 512"):
    scoring.Scorer(params, cfg, mask_id=600)

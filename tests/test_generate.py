"""Generation: KV-cache decoding against full recomputation, sampling filters against NumPy,
masked diffusion against a naive NumPy re-implementation, and the CLI."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualjax import convert, generate
from dualjax import model as model_lib
from dualjax import tokenizer as tok_lib
from interop_fixtures import sentencepiece_model, tiny_model

MASK, PAD = 4, 3
PROMPTS = [[1, 20, 21, 22, 23, 24], [1], [1, 40, 41, 42, 43, 44, 45, 46, 47], [1, 60, 61]]


@pytest.fixture(scope="module")
def tiny():
  cfg, params = tiny_model("mlp", vocab_size=512)
  return cfg, jax.tree.map(jnp.asarray, params)


@functools.partial(jax.jit, static_argnames=("cfg", "mode"))
def _apply_padded(params, tokens_1xL, seg_1xL, *, cfg, mode):
  return model_lib.apply(params, tokens_1xL, seg_1xL, cfg=cfg, mode=mode)


def full_logits(cfg, params, tokens, mode="causal"):
  """float64 logits of `model.apply` on exactly these tokens (one row, positions 0.., right-padded
  as segment 0 that no token attends, so one compiled shape serves every length)."""
  L = cfg.max_seq_len
  tok = np.zeros((1, L), np.int32)
  tok[0, :len(tokens)] = tokens
  seg = (np.arange(L) < len(tokens)).astype(np.int32)[None]
  return np.asarray(_apply_padded(params, tok, seg, cfg=cfg, mode=mode)[0, :len(tokens)],
                    np.float64)


# ----- sampling filters ---------------------------------------------------------------------------


def reference_probs(logits, temperature, top_k, top_p):
  """float64 sampling distribution: softmax(l / T) restricted to the top-k tokens (ties with the
  k-th kept), renormalised, then to the smallest set of most probable tokens whose mass reaches
  top_p (ties with the last kept token kept), renormalised."""
  x = np.asarray(logits, np.float64) / temperature
  keep = np.ones(len(x), bool)
  if top_k > 0:
    keep &= x >= np.sort(x)[::-1][min(top_k, len(x)) - 1]
  p = np.where(keep, np.exp(x - x[keep].max()), 0.0)
  p /= p.sum()
  if top_p < 1:
    mass, last = 0.0, None
    for i in sorted(np.flatnonzero(keep), key=lambda i: -p[i]):
      if mass >= top_p:
        break
      mass += p[i]
      last = p[i]
    keep &= p >= last
  p = np.where(keep, p, 0.0)
  return p / p.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.6), (0.9, 12, 0.8), (2.0, 1, 1.0), (1.0, 0, 1e-6)])
def test_filter_logits_matches_numpy(temperature, top_k, top_p):
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 2, (6, 40)).astype(np.float32)
  logits[1, :3] = logits[1, 3]  # ties
  got = jax.nn.softmax(generate.filter_logits(jnp.asarray(logits), temperature, top_k, top_p))
  for b in range(len(logits)):
    want = reference_probs(logits[b], temperature, top_k, top_p)
    np.testing.assert_array_equal(np.asarray(got[b]) > 0, want > 0)
    np.testing.assert_allclose(np.asarray(got[b]), want, atol=1e-6)


def test_sampling_frequencies_and_greedy():
  logits = jnp.asarray(np.log([0.05, 0.3, 0.1, 0.25, 0.2, 0.1]), jnp.float32)
  n = 40_000
  draws = generate.sample_logits(jax.random.key(3), jnp.tile(logits, (n, 1)), 0.8, 4, 0.9)
  freq = np.bincount(np.asarray(draws), minlength=6) / n
  want = reference_probs(np.asarray(logits), 0.8, 4, 0.9)
  assert set(np.flatnonzero(freq)) == set(np.flatnonzero(want))
  np.testing.assert_allclose(freq, want, atol=0.01)
  greedy = generate.sample_logits(jax.random.key(3), logits[None], 0.0, 0, 1.0)
  assert int(greedy[0]) == 1


# ----- autoregressive decoding --------------------------------------------------------------------


def ar(tiny, prompts=PROMPTS, side="left", key=0, **kw):
  """generate_ar in one compiled shape per batch size: prompts padded to 11, 12 new tokens."""
  cfg, params = tiny
  return generate.generate_ar(params, cfg, *generate.pad_prompts(prompts, side=side, length=11),
                              key=jax.random.key(key), max_new_tokens=12, return_logits=True,
                              pad_id=PAD, **kw)


@pytest.mark.parametrize("side", ["left", "right"])
def test_kv_cache_equals_full_recomputation(tiny, side):
  """Each row of a padded batch, token by token, against model.apply on its unpadded prefix."""
  cfg, params = tiny
  out = ar(tiny, side=side)
  got_tokens, got_logits = np.asarray(out.tokens), np.asarray(out.logits)
  assert np.asarray(out.lengths).tolist() == [12] * len(PROMPTS)
  for b, prompt in enumerate(PROMPTS):
    seq = list(prompt) + got_tokens[b].tolist()
    ref = full_logits(cfg, params, seq[:-1])[len(prompt) - 1:]
    np.testing.assert_allclose(got_logits[b], ref, atol=1e-4, rtol=1e-4)
    assert (ref.argmax(-1) == got_tokens[b]).all()  # greedy tokens identical
  # The uncached path (model.apply over the whole buffer each step) agrees too.
  again = ar(tiny, side=side, use_cache=False)
  np.testing.assert_array_equal(np.asarray(again.tokens), got_tokens)
  np.testing.assert_allclose(np.asarray(again.logits), got_logits, atol=1e-4)


def test_kv_cache_bfloat16(tiny):
  cfg, params = tiny
  cfg = dataclasses.replace(cfg, compute_dtype="bfloat16")
  out = ar((cfg, params))
  for b, prompt in enumerate(PROMPTS):
    seq = list(prompt) + np.asarray(out.tokens[b]).tolist()
    ref = full_logits(cfg, params, seq[:-1])[len(prompt) - 1:]
    np.testing.assert_allclose(np.asarray(out.logits[b]), ref, atol=1e-2)
    assert (ref.argmax(-1) == np.asarray(out.tokens[b])).all()


def test_prompt_positions_start_at_zero():
  """Wherever padding puts a prompt, its tokens get positions 0..n-1 (as in training)."""
  for side in ("left", "right"):
    _, seg = generate.pad_prompts(PROMPTS, side=side, length=12)
    real, n, start, end, pos = (np.asarray(x) for x in generate.row_layout(jnp.asarray(seg)))
    for b, prompt in enumerate(PROMPTS):
      assert pos[b][real[b]].tolist() == list(range(len(prompt)))
      assert n[b] == len(prompt) and end[b] - start[b] == len(prompt)
      assert end[b] == (12 if side == "left" else len(prompt))


def test_sampling_padding_batch_and_key(tiny):
  """Sampling is deterministic for a key, the same left- or right-padded; a row's greedy tokens
  do not depend on the batch; top-k 1 and a tiny top-p are greedy."""
  tokens = lambda **kw: np.asarray(ar(tiny, **kw).tokens)
  sampled = tokens(key=5, temperature=1.0, top_k=20)
  np.testing.assert_array_equal(sampled, tokens(key=5, temperature=1.0, top_k=20, side="right"))
  assert (sampled != tokens(key=6, temperature=1.0, top_k=20)).any()
  greedy = tokens()
  assert (sampled != greedy).any()
  np.testing.assert_array_equal(tokens(prompts=PROMPTS[2:3])[0], greedy[2])
  np.testing.assert_array_equal(tokens(key=1, temperature=1.5, top_k=1), greedy)
  np.testing.assert_array_equal(tokens(key=1, temperature=1.0, top_p=1e-6), greedy)


def test_stop_tokens(tiny):
  free = np.asarray(ar(tiny).tokens)
  stop = int(free[0, 3])
  first = [int(np.flatnonzero(r == stop)[0]) if stop in r else None for r in free]
  out = ar(tiny, stop_ids=(stop, 9999))
  got = np.asarray(out.tokens)
  for b, f in enumerate(first):
    if f is None:
      assert not out.stopped[b] and out.lengths[b] == 12
      np.testing.assert_array_equal(got[b], free[b])
    else:
      assert out.stopped[b] and out.lengths[b] == f + 1
      np.testing.assert_array_equal(got[b, :f + 1], free[b, :f + 1])
      assert (got[b, f + 1:] == PAD).all()
  assert first[0] <= 3


def test_bad_prompts(tiny):
  cfg, params = tiny
  with pytest.raises(generate.GenerateError, match="prompt 1 is not one contiguous"):
    generate.generate_ar(params, cfg, np.ones((2, 4), np.int32),
                         np.array([[1, 1, 1, 1], [1, 0, 1, 0]]), key=jax.random.key(0),
                         max_new_tokens=2)
  with pytest.raises(generate.GenerateError, match="exceeds the model's max_seq_len=128"):
    generate.generate_ar(params, cfg, *generate.pad_prompts([[1] * 100]), key=jax.random.key(0),
                         max_new_tokens=29)
  with pytest.raises(generate.GenerateError, match="use_cache=False recomputes a buffer"):
    generate.generate_ar(params, cfg, *generate.pad_prompts([[1]], length=120),
                         key=jax.random.key(0), max_new_tokens=9, use_cache=False)
  with pytest.raises(generate.GenerateError, match="top_p must be in"):
    generate.generate_ar(params, cfg, *generate.pad_prompts([[1]]), key=jax.random.key(0),
                         max_new_tokens=2, top_p=0.0)


# ----- masked diffusion ---------------------------------------------------------------------------


def naive_diffusion(cfg, params, prompt, n, schedule, block_size, suppress):
  """Greedy confidence-ordered unmasking, one unpadded row, float64 (a re-implementation)."""
  seq = list(prompt) + [MASK] * n
  c = len(prompt)
  masked, step_of = [True] * n, [-1] * n
  for s, (block, count) in enumerate(zip(*schedule)):
    pred = full_logits(cfg, params, seq, mode="bidirectional")[c - 1:c - 1 + n]  # j from j - 1
    pred[:, suppress] = -np.inf
    x0 = pred.argmax(-1)
    p = np.exp(pred - pred.max(-1, keepdims=True))
    conf = (p / p.sum(-1, keepdims=True))[np.arange(n), x0]
    cand = [i for i in range(n) if masked[i] and i // (block_size or n) == block]
    for i in sorted(cand, key=lambda i: (-conf[i], i))[:count]:
      seq[c + i], masked[i], step_of[i] = int(x0[i]), False, s
  return seq[c:], step_of


def test_diffusion_schedule():
  assert generate.diffusion_schedule(8, 4) == ((0, 0, 0, 0), (2, 2, 2, 2))
  assert generate.diffusion_schedule(10, 6, 4) == ((0, 0, 1, 1, 2, 2), (2, 2, 2, 2, 1, 1))
  blocks, counts = generate.diffusion_schedule(7, 5, 3)  # blocks of 3, 3, 1 over 2, 2, 1 steps
  assert blocks == (0, 0, 1, 1, 2) and counts == (1, 2, 1, 2, 1)
  assert generate.diffusion_schedule(2, 4) == ((0,) * 4, (0, 1, 0, 1))
  with pytest.raises(generate.GenerateError, match="fewer than the 3 blocks"):
    generate.diffusion_schedule(7, 2, 3)


@pytest.mark.parametrize("steps,block_size", [(6, 0), (6, 4)])
def test_diffusion_greedy_equals_naive(tiny, steps, block_size):
  cfg, params = tiny
  n = 10
  tokens, seg = generate.pad_prompts(PROMPTS, side="left")
  out = generate.generate_diffusion(params, cfg, tokens, seg, key=jax.random.key(0),
                                    max_new_tokens=n, steps=steps, block_size=block_size)
  schedule = generate.diffusion_schedule(n, steps, block_size)
  for b, prompt in enumerate(PROMPTS):
    want, step_of = naive_diffusion(cfg, params, prompt, n, schedule, block_size, [MASK, 1, PAD])
    assert np.asarray(out.tokens[b]).tolist() == want
    assert np.asarray(out.step[b]).tolist() == step_of


def test_diffusion_fills_every_mask_keeps_prompt_and_is_deterministic(tiny):
  cfg, params = tiny
  n, steps, bs = 12, 8, 4
  tokens, seg = generate.pad_prompts(PROMPTS, side="right")
  run = lambda k, order: generate.generate_diffusion(
      params, cfg, tokens, seg, key=jax.random.key(k), max_new_tokens=n, steps=steps,
      block_size=bs, order=order, temperature=1.0, top_p=0.95)
  blocks, counts = generate.diffusion_schedule(n, steps, bs)
  for order in generate.ORDERS:
    out = run(4, order)
    toks, seq, step = (np.asarray(x) for x in (out.tokens, out.sequence, out.step))
    assert not np.isin(toks, [MASK, 1, PAD]).any()  # every mask filled, never <s>/<pad>/<mask>
    for b, prompt in enumerate(PROMPTS):
      assert seq[b, :len(prompt)].tolist() == prompt  # the prompt never changes
      assert seq[b, len(prompt):len(prompt) + n].tolist() == toks[b].tolist()
      assert (seq[b, len(prompt) + n:] == PAD).all()
      assert np.bincount(step[b], minlength=steps).tolist() == list(counts)
      for i in range(n):  # semi-autoregressive: token i is committed during its block's steps
        assert blocks[step[b, i]] == i // bs
    again = run(4, order)
    np.testing.assert_array_equal(np.asarray(again.tokens), toks)
    np.testing.assert_array_equal(np.asarray(again.step), step)
    assert (np.asarray(run(5, order).tokens) != toks).any()


def test_diffusion_long_padding(tiny):
  """Padding to P with P + N > max_seq_len: rows move left, the canvas is max_seq_len long."""
  cfg, params = tiny
  kw = dict(key=jax.random.key(0), max_new_tokens=20, steps=4)
  long = generate.generate_diffusion(params, cfg, *generate.pad_prompts(PROMPTS, length=120), **kw)
  short = generate.generate_diffusion(params, cfg, *generate.pad_prompts(PROMPTS), **kw)
  assert long.sequence.shape == (len(PROMPTS), cfg.max_seq_len)
  np.testing.assert_array_equal(np.asarray(long.tokens), np.asarray(short.tokens))


def test_diffusion_stop_ids(tiny):
  cfg, params = tiny
  kw = dict(key=jax.random.key(0), max_new_tokens=10, steps=6)  # as in the naive test
  out = generate.generate_diffusion(params, cfg, *generate.pad_prompts(PROMPTS), **kw)
  toks = np.asarray(out.tokens)
  stop = int(toks[1, 2])
  out2 = generate.generate_diffusion(params, cfg, *generate.pad_prompts(PROMPTS), stop_ids=[stop],
                                     **kw)
  np.testing.assert_array_equal(np.asarray(out2.tokens), toks)
  assert bool(out2.stopped[1]) and int(out2.lengths[1]) == toks[1].tolist().index(stop) + 1


# ----- CLI ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  d = tmp_path_factory.mktemp("gen")
  sp = sentencepiece_model(d / "sp.model")
  cfg, params = tiny_model("mlp", vocab_size=512)
  convert.write_workdir(params, cfg, sp, d / "work", lam=0.5)
  return d / "work", cfg, jax.tree.map(jnp.asarray, params), tok_lib.load_tokenizer(sp)


def test_cli_ar_equals_library(workdir, capsys, tmp_path):
  wd, cfg, params, tok = workdir
  texts = ["The quick brown fox", "Once upon a time, in a land far away"]
  out_file = tmp_path / "out.jsonl"
  assert generate.main(["generate", f"--workdir={wd}", f"--prompt={texts[0]}",
                        f"--prompt={texts[1]}", "--max_new_tokens=7", f"--output={out_file}",
                        "--ignore_eos"]) == 0
  printed = capsys.readouterr().out
  ids = generate.encode_prompts(tok, texts)
  want = generate.generate_ar(params, cfg, *generate.pad_prompts(ids, pad_id=tok.pad_id),
                              key=jax.random.key(0), max_new_tokens=7)
  rows = [json.loads(l) for l in out_file.read_text().splitlines()]
  for b, text in enumerate(texts):
    assert rows[b]["prompt"] == text
    assert rows[b]["tokens"] == np.asarray(want.tokens[b]).tolist()
    assert rows[b]["completion"] == tok.decode(rows[b]["tokens"])
    assert f"=== {b} ===\n{text}{rows[b]['completion']}" in printed


def test_cli_diffusion_and_prompt_file(workdir, capsys, tmp_path):
  wd, cfg, params, tok = workdir
  f = tmp_path / "p.jsonl"
  f.write_text(json.dumps({"prompt": "Question: why?\nAnswer:"}) + "\n" + json.dumps("Hi") + "\n")
  out_file = tmp_path / "out.jsonl"
  assert generate.main(["generate", f"--workdir={wd}", f"--prompt_file={f}", "--mode=diffusion",
                        "--max_new_tokens=6", "--steps=3", "--block_size=2",
                        f"--output={out_file}"]) == 0
  rows = [json.loads(l) for l in out_file.read_text().splitlines()]
  assert [r["prompt"] for r in rows] == ["Question: why?\nAnswer:", "Hi"]
  ids = generate.encode_prompts(tok, [r["prompt"] for r in rows])
  want = generate.generate_diffusion(params, cfg, *generate.pad_prompts(ids, pad_id=tok.pad_id),
                                     key=jax.random.key(0), max_new_tokens=6, steps=3,
                                     block_size=2, mask_id=tok.mask_id)
  for b, r in enumerate(rows):
    full = np.asarray(want.tokens[b]).tolist()
    assert full[:len(r["tokens"])] == r["tokens"]


@pytest.mark.parametrize("args,message", [
    ([], "no prompt: give --prompt=TEXT or --prompt_file=FILE"),
    (["--prompt=x", "--max_new_tokens=0"], "max_new_tokens must be a positive integer"),
    (["--prompt=x", "--top_p=1.5"], "top_p must be in (0, 1]"),
    (["--prompt=x", "--mode=beam"], "--mode"),
    (["--prompt=x", "--mode=diffusion", "--steps=2", "--block_size=1", "--max_new_tokens=4"],
     "steps=2 is fewer than the 4 blocks"),
    (["--prompt=x", "--stop_ids=a"], "--stop_ids must be integers"),
    (["--prompt=" + "word " * 200], "prompt 0 has"),
    (["--prompt_file=/nonexistent.jsonl"], "--prompt_file /nonexistent.jsonl does not exist"),
    (["--prompt_file=BAD"], "p.jsonl:2: not JSON"),
])
def test_cli_bad_input(workdir, capsys, tmp_path, args, message):
  wd = workdir[0]
  bad = tmp_path / "p.jsonl"
  bad.write_text('"ok"\n{broken\n')
  args = [a.replace("BAD", str(bad)) for a in args]
  with pytest.raises(SystemExit) as e:
    generate.main(["generate", f"--workdir={wd}", *args])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "\n" not in err and message in err, err


def test_cli_not_a_workdir(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    generate.main(["generate", f"--workdir={tmp_path}", "--prompt=x"])
  assert e.value.code == 2
  assert "not a training workdir" in capsys.readouterr().err

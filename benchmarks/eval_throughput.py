"""Evaluation throughput: scored tokens/s and MFU per scoring mode, and full-suite extrapolation.

  python benchmarks/eval_throughput.py --tokenizer=PATH              # tiny model on CPU
  python benchmarks/eval_throughput.py --tokenizer=PATH --gpu        # 470M architecture, random
  python benchmarks/eval_throughput.py --tokenizer=PATH --count_only # suite sizes per mode

It first counts, for the real nine tasks (../shared/eval-data), the candidate completions and the
scoring tokens every mode touches (packed, so padding is not counted). It then times each mode
on a fixed-seed subsample (`--limit` items per task) and extrapolates the full suite's wall time
as (full-suite tokens) / (measured tokens/s). Useful FLOPs per scoring sequence of S tokens:
2·N·S for the matmul parameters N (embedding lookup excluded, output head included) plus
4·layers·heads·head_dim·pairs for attention, pairs = S(S+1)/2 causal, S² bidirectional, and the
prefix's exact count in prefix mode (DESIGN.md §11: causal attention counts half). MFU = useful
FLOPs/s over the peak (dense bf16 datasheet value on GPU; on CPU the measured fp32 matmul rate).
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from dualjax import model as model_lib
from dualjax import tokenizer as tok_lib
from dualjax.evaluation import scoring, suite as ev, tasks as tasks_lib

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "MI250X": 383e12}


def unit_shapes(reqs: list[scoring.Request], mode: str, mc_grid: int) -> tuple[np.ndarray,
                                                                               np.ndarray]:
  """(length S, bidirectional-pairs) of every scoring sequence of `mode`."""
  kind, k = scoring.parse_mode(mode)
  c = np.array([len(r.ctx) for r in reqs], np.int64)
  n = np.array([len(r.comp) for r in reqs], np.int64)
  if kind in ("ar", "prefix"):
    s = c + n
    pairs = s * (s + 1) // 2 + (c * (c + 1) // 2 if kind == "prefix" else 0)
    return s, pairs
  if kind == "pll":
    req = np.repeat(np.arange(len(reqs)), n)
    i = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    s = 1 + c[req] + i + np.minimum(k, n[req] - i)
    return s, s * s
  t = scoring.mc_grid(mc_grid)
  runs = np.array([(1 - (1 - t) ** m).sum() for m in n])  # Expected non-empty grid points.
  s = 1 + c + n
  return s * runs, s * s * runs


def matmul_params(params) -> int:
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = jax.tree_util.keystr(path).lower()
    if leaf.ndim >= 2 and "embed" not in name:
      total += leaf.size
  return total


def flops(reqs, mode, cfg, n_matmul, mc_grid) -> float:
  s, pairs = unit_shapes(reqs, mode, mc_grid)
  return float(2 * n_matmul * s.sum() + 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim
               * pairs.sum())


def peak_flops() -> tuple[float, str]:
  dev = jax.devices()[0]
  if dev.platform == "gpu":
    for name, peak in PEAK_BF16.items():
      if name in dev.device_kind:
        return peak, f"{dev.device_kind} dense bf16 datasheet"
    return float("nan"), dev.device_kind
  x = jnp.ones((2048, 2048), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(5):
    f(x).block_until_ready()
  return 5 * 2 * 2048 ** 3 / (time.perf_counter() - t0), "measured fp32 2048² matmul"


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tokenizer", required=True, help="SentencePiece model file")
  p.add_argument("--data_dir", default=str(ev.DEFAULT_DATA_DIR))
  p.add_argument("--gpu", action="store_true", help="470M architecture (random weights)")
  p.add_argument("--count_only", action="store_true")
  p.add_argument("--limit", type=int, default=None, help="items per task to time (default: "
                 "30 on CPU, 400 on GPU)")
  p.add_argument("--modes", default="ar,prefix,pll1,pll6,mc")
  p.add_argument("--mc_grid", type=int, default=32)
  p.add_argument("--row_len", type=int, default=None)
  p.add_argument("--batch_tokens", type=int, default=None)
  p.add_argument("--out", default=None, help="write the numbers as JSON here")
  args = p.parse_args()
  tok = tok_lib.load_tokenizer(args.tokenizer)
  modes = args.modes.split(",")

  # Count the full suite.
  t0 = time.perf_counter()
  examples = ev.load_examples(tasks_lib.TASKS, args.data_dir, None, 0)
  reqs, per_task = ev.build_requests(examples, tok)
  n_choices = sum(len(c) for tr in per_task.values() for c in tr.completions)
  counts = {"tokenizer_vocab": tok.vocab_size, "completions": n_choices,
            "unique_requests": len(reqs), "encode_seconds": time.perf_counter() - t0,
            "tokens": {}, "sequences": {}}
  for m in modes:
    s, _ = unit_shapes(reqs, m, args.mc_grid)
    counts["tokens"][m] = int(s.sum())
    if m == "mc":  # Expected number of grid points with a non-empty mask.
      t = scoring.mc_grid(args.mc_grid)
      counts["sequences"][m] = int(sum((1 - (1 - t) ** len(r.comp)).sum() for r in reqs))
    else:
      counts["sequences"][m] = len(s)
  print(json.dumps(counts, indent=1))
  report = {"counts": counts, "device": str(jax.devices()[0].device_kind),
            "num_devices": jax.device_count(), "modes": {}}
  if args.count_only:
    return

  vocab = tok.vocab_size
  if args.gpu:
    cfg = model_lib.ModelConfig(vocab_size=vocab)
    limit, row_len, batch_tokens = args.limit or 400, args.row_len or 512, (
        args.batch_tokens or 32768)
  else:
    cfg = model_lib.ModelConfig(vocab_size=vocab, num_layers=2, d_model=64, num_heads=4,
                                head_dim=16, mlp_dim=128, max_seq_len=512,
                                compute_dtype="float32")
    limit, row_len, batch_tokens = args.limit or 30, args.row_len or 256, (
        args.batch_tokens or 8192)
  params = model_lib.init(cfg, jax.random.key(0))
  n_matmul = matmul_params(params)
  peak, peak_src = peak_flops()
  sub = ev.load_examples(tasks_lib.TASKS, args.data_dir, limit, 0)
  sub_reqs, _ = ev.build_requests(sub, tok)
  scorer = scoring.Scorer(params, cfg, row_len=row_len, batch_tokens=batch_tokens)
  for m in modes:
    scorer.score(sub_reqs[:64], m, mc_grid_size=args.mc_grid)  # Compile the buckets.
    before = dict(scorer.stats)
    t0 = time.perf_counter()
    scorer.score(sub_reqs, m, mc_grid_size=args.mc_grid)
    secs = time.perf_counter() - t0
    toks = scorer.stats["unit_tokens"] - before["unit_tokens"]
    rows = scorer.stats["row_tokens"] - before["row_tokens"]
    f = flops(sub_reqs, m, cfg, n_matmul, args.mc_grid)
    full_s = counts["tokens"][m] / (toks / secs)
    report["modes"][m] = {"tokens": toks, "row_tokens": rows, "seconds": secs,
                          "tokens_per_s": toks / secs, "packing_efficiency": toks / rows,
                          "useful_tflops_per_s": f / secs / 1e12, "mfu": f / secs / peak,
                          "full_suite_tokens": counts["tokens"][m], "full_suite_seconds": full_s}
    print(f"{m:7s} {toks:10d} tok {secs:8.2f}s {toks / secs:12.0f} tok/s  packing "
          f"{toks / rows:.3f}  MFU {f / secs / peak:.3%}  full suite ≈ {full_s / 60:.1f} min")
  report.update(model=("470M" if args.gpu else "tiny"), matmul_params=n_matmul, peak_flops=peak,
                peak_source=peak_src, limit=limit, row_len=row_len, batch_tokens=batch_tokens)
  if args.out:
    with open(args.out, "w") as fh:
      json.dump(report, fh, indent=1)


if __name__ == "__main__":
  main()

"""Decode throughput of dualjax.generate: AR with the KV cache vs full recomputation, and
masked diffusion (new tokens per second, after compilation; random weights, no stop token).

  python benchmarks/generate_throughput.py --preset tiny      # CPU-sized
  python benchmarks/generate_throughput.py --preset paper     # the 470M model (an accelerator)
"""

import argparse
import time

import jax
import numpy as np

from dualjax import generate
from dualjax import model as model_lib

PRESETS = {
    "tiny": dict(model=dict(vocab_size=2048, num_layers=2, d_model=64, num_heads=4, head_dim=16,
                            mlp_dim=192, max_seq_len=128, compute_dtype="float32"),
                 prompt=16, new=96, batches=(1, 8)),
    "paper": dict(model=dict(attention_impl="auto"), prompt=128, new=512, batches=(1, 16, 64)),
}


def timed(fn, repeats: int) -> float:
  jax.block_until_ready(fn().tokens)  # compile
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn().tokens)
    best = min(best, time.perf_counter() - t0)
  return best


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
  ap.add_argument("--no_uncached", action="store_true", help="skip the recomputation baseline")
  args = ap.parse_args()
  pre = PRESETS[args.preset]
  cfg = model_lib.ModelConfig(**pre["model"])
  params = model_lib.init(cfg, jax.random.key(0))
  dev = jax.devices()[0]
  P, N = pre["prompt"], pre["new"]
  print(f"device: {dev.device_kind} ({dev.platform})  preset={args.preset}  prompt={P} new={N}  "
        f"temperature={args.temperature}  "
        f"params={model_lib.count_params(params)['total']}")
  rng = np.random.default_rng(0)
  for B in pre["batches"]:
    prompts = [[1] + rng.integers(16, cfg.vocab_size, P - 1).tolist() for _ in range(B)]
    tokens, seg = generate.pad_prompts(prompts)
    kw = dict(key=jax.random.key(0), max_new_tokens=N, temperature=args.temperature)
    runs = {"ar_cached": lambda: generate.generate_ar(params, cfg, tokens, seg, **kw)}
    if not args.no_uncached:
      runs["ar_uncached"] = lambda: generate.generate_ar(params, cfg, tokens, seg,
                                                         use_cache=False, **kw)
    runs["diffusion"] = lambda: generate.generate_diffusion(params, cfg, tokens, seg, steps=N,
                                                            **kw)
    for name, fn in runs.items():
      secs = timed(fn, args.repeats)
      print(f"  batch {B:3d}  {name:12s} {B * N / secs:10.0f} new tokens/s  "
            f"({secs * 1e3 / N:.2f} ms per step)")


if __name__ == "__main__":
  main()

"""Forward+backward throughput of the model under each objective (tokens/s, FLOP/s, MFU).

  python benchmarks/model_step.py --preset tiny        # CPU-sized
  python benchmarks/model_step.py --preset paper       # the 470M model (an accelerator)

FLOPs per token (fwd+bwd) = 6 * matmul params (blocks, head projection, output matrix) +
12 * layers * L * H*Dh for attention, counted half for causal rows (MaxText's accounting).
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from dualjax import model as model_lib
from dualjax import objectives

PRESETS = {
    "tiny": dict(model=dict(vocab_size=2048, num_layers=2, d_model=64, num_heads=4, head_dim=16,
                            mlp_dim=192, max_seq_len=128, compute_dtype="float32"),
                 seq_len=128, rows=16),
    "small": dict(model=dict(vocab_size=8192, num_layers=4, d_model=256, num_heads=4, head_dim=64,
                             mlp_dim=768, max_seq_len=256), seq_len=256, rows=8),
    "paper": dict(model=dict(attention_impl="auto", remat="full"), seq_len=2048, rows=8),
}
PEAK_FLOPS = {"gpu": 989e12, "tpu": 459e12}  # bf16 dense: H100/H200 SXM, v5p per chip


def flops_per_token(cfg: model_lib.ModelConfig, seq_len: int, causal: bool) -> float:
  D, HD = cfg.d_model, cfg.num_heads * cfg.head_dim
  matmul = cfg.num_layers * (3 * D * HD + HD * D + 3 * D * cfg.mlp_dim) + D * cfg.vocab_size
  if cfg.head == "mlp":
    matmul += D * D
  attn = 12 * cfg.num_layers * seq_len * HD * (0.5 if causal else 1.0)
  return 6 * matmul + attn


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
  ap.add_argument("--steps", type=int, default=5)
  args = ap.parse_args()
  pre = PRESETS[args.preset]
  cfg = model_lib.ModelConfig(**pre["model"])
  L, B = pre["seq_len"], pre["rows"]
  rng = np.random.default_rng(0)
  tokens = rng.integers(16, cfg.vocab_size, (B, L + 1)).astype(np.int32)
  tokens[:, ::97] = 1
  batch = {"tokens": tokens, "segment_ids": np.cumsum(tokens == 1, 1).astype(np.int32)}
  params = model_lib.init(cfg, jax.random.key(0))
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind} ({dev.platform})  preset={args.preset}  rows={B} seq={L}  "
        f"params={model_lib.count_params(params)}")
  fns = {
      "ar": lambda p, b, k: objectives.ar_loss(p, b, cfg=cfg)[0],
      "mdm": lambda p, b, k: objectives.mdm_loss(p, b, k, cfg=cfg)[0],
  }
  for name, fn in fns.items():
    step = jax.jit(jax.value_and_grad(fn))
    key = jax.random.key(1)
    t0 = time.perf_counter()
    jax.block_until_ready(step(params, batch, key))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(args.steps):
      out = step(params, batch, jax.random.fold_in(key, i))
    jax.block_until_ready(out)
    dt = (time.perf_counter() - t0) / args.steps
    tok_s = B * L / dt
    flops = tok_s * flops_per_token(cfg, L, causal=(name == "ar"))
    peak = PEAK_FLOPS.get(dev.platform)
    mfu = f"  MFU {100 * flops / peak:.1f}%" if peak else ""
    print(f"{name:4s} fwd+bwd: {dt * 1e3:8.1f} ms/step  {tok_s:10.0f} tokens/s  "
          f"{flops / 1e9:8.2f} GFLOP/s{mfu}  (compile {compile_s:.1f}s)")


if __name__ == "__main__":
  main()

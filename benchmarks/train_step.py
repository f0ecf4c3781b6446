"""Dual step vs AR-only vs MDM-only at equal batch, and the step's host overhead (issue 4).

  python benchmarks/train_step.py                 # tiny model on the CPU devices present
  python benchmarks/train_step.py --preset=paper  # the 470M model (GPU/TPU), batch per device 8

Prints tokens/s, MFU (causal attention counts half; MDM attention counts full) and, for the dual
step, its time relative to the AR-only step. Host overhead = wall time per step of the full
training loop's host work (batch -> global array, dispatch, metric fetch) minus device time.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from dualjax import mesh as mesh_lib
from dualjax import model as model_lib
from dualjax import optim
from dualjax import sharding
from dualjax import split as split_lib
from dualjax import step as step_lib

PRESETS = {
    "tiny": dict(model=dict(vocab_size=2048, num_layers=2, d_model=64, num_heads=4, head_dim=16,
                            mlp_dim=192, max_seq_len=128, compute_dtype="float32",
                            attention_impl="xla"), seq_len=128, rows_per_device=4),
    "small": dict(model=dict(vocab_size=8192, num_layers=4, d_model=256, num_heads=4,
                             head_dim=64, mlp_dim=768, max_seq_len=256, attention_impl="auto"),
                  seq_len=256, rows_per_device=4),
    "paper": dict(model=dict(attention_impl="auto"), seq_len=2048, rows_per_device=8),
}
PEAK_FLOPS = {"cpu": None, "gpu": 989e12, "tpu": 459e12}  # bf16 dense: H100/H200 SXM, v5p


def train_flops_per_token(cfg: model_lib.ModelConfig, seq_len: int, causal_fraction: float) -> float:
  """6 * matmul params + attention (12 * layers * L * D, causal half), per token, fwd+bwd."""
  n = model_lib.count_params(cfg)["non_embedding"] + cfg.d_model * cfg.vocab_size  # + unembedding
  attn = 12 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim
  attn *= causal_fraction * 0.5 + (1 - causal_fraction)
  return 6 * n + attn


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
  ap.add_argument("--steps", type=int, default=10, help="steps per timed round")
  ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median reported)")
  ap.add_argument("--lam", type=float, default=0.5)
  args = ap.parse_args()
  preset = PRESETS[args.preset]
  cfg = model_lib.ModelConfig(**preset["model"])
  L = preset["seq_len"]
  mesh = mesh_lib.make_mesh(-1, 1, 1)
  R = mesh.shape["replica"]
  rows = preset["rows_per_device"] * jax.device_count()
  rng = np.random.default_rng(0)
  tokens = rng.integers(16, cfg.vocab_size, (rows, L + 1)).astype(np.int32)
  tokens[:, ::97] = 1
  seg = np.cumsum(tokens == 1, axis=1).astype(np.int32) + 1
  batch = mesh_lib.to_global({"tokens": tokens, "segment_ids": seg}, mesh)
  axes = model_lib.logical_axes(cfg)
  opt = optim.make_optimizer(optim.wsd_schedule(0.007, 1000), axes)
  abstract = model_lib.abstract_params(cfg)
  st_sh = sharding.state_shardings(axes, abstract, opt, mesh)
  kind = jax.devices()[0].platform
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  preset={args.preset}  "
        f"rows={rows} seq={L}")
  variants = {}
  # dual: the fewest microsteps (the device split where replicas differ); dual_whole: every
  # microstep one objective on all devices (what tensor-parallel meshes use).
  for name, lam, whole in (("ar", 1.0, False), ("mdm", 0.0, False), ("dual", args.lam, False),
                           ("dual_whole", args.lam, True)):
    split = split_lib.make_split(lam, rows, R, whole_microsteps=whole)
    fn = jax.jit(step_lib.make_train_step(cfg, split, mesh, opt, ar_loss_scale=1.0, z_loss=1e-4),
                 donate_argnums=(0,))

    def init():
      p = model_lib.init(cfg, jax.random.key(0))
      return {"params": p, "opt_state": opt.init(p), "step": jnp.zeros((), jnp.int32),
              "rng": jax.random.key_data(jax.random.key(1))}
    state = jax.jit(init, out_shardings=st_sh)()
    state, m = fn(state, batch)  # compile
    jax.block_until_ready(m)
    variants[name] = [split, fn, state]

  # Interleaved rounds, median per variant: machine noise hits all variants alike.
  local = {"tokens": tokens, "segment_ids": seg}
  dev_t = {k: [] for k in variants}
  loop_t = {k: [] for k in variants}
  for _ in range(args.rounds):
    for name, v in variants.items():
      _, fn, state = v
      t = time.perf_counter()
      for _ in range(args.steps):
        state, m = fn(state, batch)
      jax.block_until_ready(m)
      dev_t[name].append((time.perf_counter() - t) / args.steps)
      # The trainer's host loop: numpy rows -> global array, dispatch, fetch metrics every step.
      t = time.perf_counter()
      for _ in range(args.steps):
        state, m = fn(state, mesh_lib.to_global(local, mesh))
        jax.device_get(m)
      loop_t[name].append((time.perf_counter() - t) / args.steps)
      v[2] = state
  results = {}
  for name, (split, _, _) in variants.items():
    dev, loop = float(np.median(dev_t[name])), float(np.median(loop_t[name]))
    tok_s = rows * L / dev
    flops = train_flops_per_token(cfg, L, causal_fraction=split.lam) * rows * L / dev
    peak = PEAK_FLOPS.get(kind)
    mfu = f"{100 * flops / (peak * jax.device_count()):.1f}%" if peak else "n/a (CPU)"
    results[name] = dev
    print(f"{name:10s} lam={split.lam:.3f} microsteps={split.microsteps}  step {dev * 1e3:8.2f} ms  "
          f"{tok_s:12,.0f} tok/s  MFU {mfu}  host overhead/step {1e3 * (loop - dev):6.2f} ms")
  print(f"dual / AR step time: {results['dual'] / results['ar']:.3f}  (target <= 1.05); "
        f"dual_whole / AR: {results['dual_whole'] / results['ar']:.3f}")


if __name__ == "__main__":
  main()

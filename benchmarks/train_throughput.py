"""Training throughput: tokens/s and MFU of AR-only, MDM-only and dual steps, with and without
document masking, Muon on, in one run (interleaved rounds, median), as a table.

  python benchmarks/train_throughput.py                       # tiny model on the local devices
  python benchmarks/train_throughput.py --preset=gpu          # the 470M model, seq 2048 (one H200)
  python benchmarks/train_throughput.py --preset=gpu --rows=16 --remat=none --microsteps=2

Every variant runs the trainer's jitted step (dualjax.step + the Muon/AdamW optimizer) on the same
rows with the same number of microsteps (so dual/AR measures the dual objective, not a different
microbatch). Document masking: rows packed from documents of 50-1500 tokens (segment ids); without
it every row is one document. MFU = useful FLOPs (dualjax.flops: 6N + attention, causal at half)
/ time / peak of the chips (dense bf16 datasheet; unknown on CPU).
"""

import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from dualjax import cli
from dualjax import flops as flops_lib
from dualjax import mesh as mesh_lib
from dualjax import model as model_lib
from dualjax import optim
from dualjax import sharding
from dualjax import split as split_lib
from dualjax import state as state_lib
from dualjax import step as step_lib

PRESETS = {
    "tiny": dict(model=dict(vocab_size=2048, num_layers=2, d_model=64, num_heads=4, head_dim=16,
                            mlp_dim=192, max_seq_len=128, compute_dtype="float32",
                            attention_impl="xla"), seq_len=128, rows=8),
    "small": dict(model=dict(vocab_size=8192, num_layers=4, d_model=256, num_heads=4,
                             head_dim=64, mlp_dim=768, max_seq_len=256), seq_len=256, rows=8),
    "gpu": dict(model=dict(mlp_multiple=128), seq_len=2048, rows=8),  # the paper's 470M model
}

FLAGS = flags.FlagValues()
_PRESET = flags.DEFINE_enum("preset", "tiny", sorted(PRESETS), "model and sequence length",
                            flag_values=FLAGS)
_ROWS = flags.DEFINE_integer("rows", None, "rows per device per step (default: the preset's)",
                             flag_values=FLAGS)
_MICROSTEPS = flags.DEFINE_integer("microsteps", 2, "microsteps per step (every variant)",
                                   flag_values=FLAGS)
_LAM = flags.DEFINE_float("lam", 0.5, "AR share of the dual variant", flag_values=FLAGS)
_REMAT = flags.DEFINE_string("remat", None, "remat policy (default: the model's)",
                             flag_values=FLAGS)
_ATTENTION = flags.DEFINE_string("attention_impl", None, "default: the preset's ('auto')",
                                 flag_values=FLAGS)
_STEPS = flags.DEFINE_integer("steps", 5, "steps per timed round", flag_values=FLAGS)
_ROUNDS = flags.DEFINE_integer("rounds", 3, "interleaved rounds (median reported)",
                               flag_values=FLAGS)


def packed_rows(rows: int, length: int, vocab: int, documents: bool, seed: int = 0
                ) -> dict[str, np.ndarray]:
  """[rows, length + 1] tokens and segment ids: documents of 50-1500 tokens, or one per row."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(16, vocab, (rows, length + 1)).astype(np.int32)
  seg = np.ones((rows, length + 1), np.int32)
  tokens[:, 0] = 1
  if documents:
    for r in range(rows):
      pos, doc = 0, 1
      while pos < length + 1:
        n = int(rng.integers(50, 1500))
        tokens[r, pos] = 1
        seg[r, pos:pos + n] = doc
        pos, doc = pos + n, doc + 1
  return {"tokens": tokens, "segment_ids": seg}


def main(argv: list[str]) -> int:
  if cli.parse(argv, __doc__, FLAGS) is None:
    return 0
  preset = PRESETS[_PRESET.value]
  cfg = model_lib.ModelConfig(**preset["model"])
  if _REMAT.value:
    cfg = dataclasses.replace(cfg, remat=_REMAT.value)
  if _ATTENTION.value:
    cfg = dataclasses.replace(cfg, attention_impl=_ATTENTION.value)
  L, M = preset["seq_len"], _MICROSTEPS.value
  mesh = mesh_lib.make_mesh(-1, 1, 1)
  R, n = mesh.shape["replica"], jax.device_count()
  rows = (_ROWS.value or preset["rows"]) * n
  axes = model_lib.logical_axes(cfg)
  # Muon divided as the trainer divides it (ZeRO-1 on this data-parallel mesh): the optimizer,
  # its momentum's sharding and the gradients' reduce-scatter come from one `division`.
  division = optim.muon_shards(mesh, optim.OptimConfig())
  opt = optim.make_optimizer(optim.wsd_schedule(0.007, 1000), axes,
                             logical_shapes=model_lib.logical_shapes(cfg), division=division)
  override, grad_shardings = state_lib.muon_layout(division, cfg)
  st_sh = sharding.state_shardings(axes, model_lib.abstract_params(cfg), opt, mesh,
                                   override=override)
  dev = jax.devices()[0]
  peak = flops_lib.peak_flops(dev)
  print(f"device: {dev.device_kind} x{n}  preset={_PRESET.value}  "
        f"{model_lib.count_params(cfg)['total']:,} params  rows/step={rows} seq={L} "
        f"microsteps={M} remat={cfg.remat} attention={cfg.attention_impl}")

  def init():
    p = model_lib.init(cfg, jax.random.key(0))
    return {"params": p, "opt_state": opt.init(p), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(1))}

  variants = {}
  for docs in (True, False):
    batch = mesh_lib.to_global(packed_rows(rows, L, cfg.vocab_size, docs), mesh)
    for name, lam in (("ar", 1.0), ("mdm", 0.0), ("dual", _LAM.value)):
      split = split_lib.make_split(lam, rows, R, M)
      fn = jax.jit(step_lib.make_train_step(cfg, split, mesh, opt, ar_loss_scale=2.0,
                                            z_loss=1e-4, grad_shardings=grad_shardings),
                   in_shardings=(st_sh, mesh_lib.batch_sharding(mesh)),
                   out_shardings=(st_sh, None), donate_argnums=(0,))
      state = jax.jit(init, out_shardings=st_sh)()
      state, m = fn(state, batch)  # compile
      jax.block_until_ready(m)
      variants[(name, docs)] = [split, fn, state, batch]
  times = {k: [] for k in variants}
  for _ in range(_ROUNDS.value):
    for k, v in variants.items():
      _, fn, state, batch = v
      t = time.perf_counter()
      for _ in range(_STEPS.value):
        state, m = fn(state, batch)
      jax.block_until_ready(m)
      times[k].append((time.perf_counter() - t) / _STEPS.value)
      v[2] = state
  print(f"{'variant':10s} {'documents':9s} {'step ms':>9s} {'tokens/s':>12s} {'MFU':>7s}")
  med = {k: float(np.median(t)) for k, t in times.items()}
  for (name, docs), secs in med.items():
    split = variants[(name, docs)][0]
    tok_s = rows * L / secs
    mfu = flops_lib.mfu(tok_s, flops_lib.train_flops_per_token(cfg, L, split.lam), peak, n)
    print(f"{name:10s} {'packed' if docs else 'one/row':9s} {secs * 1e3:9.2f} {tok_s:12,.0f} "
          + (f"{100 * mfu:6.1f}%" if mfu == mfu else "    n/a"))
  for docs in (True, False):
    print(f"dual / AR ({'packed' if docs else 'one/row'}): "
          f"{med[('dual', docs)] / med[('ar', docs)]:.3f}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))

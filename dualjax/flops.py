"""Useful FLOPs of a training step and the accelerators' peak rates (MFU, DESIGN.md §4, §11).

Per input token of a row of L tokens, forward: 2 FLOPs per matmul parameter (every 2-D weight of
the blocks and the head, the output matrix included; the embedding lookup is not a matmul) plus
attention 4·L·H·Dh per layer (QK^T and AV), counted at half for causal rows (MaxText's
convention). Training = 3 × forward (backward twice the forward); recomputation (remat) is not
useful work and is not counted. A dual step with AR share lam has a fraction lam of causal rows.
"""

import math
from typing import Any

import jax

from dualjax import model as model_lib
from dualjax import optim

# Dense bf16 peak FLOP/s per chip (vendor datasheets); matched against `device_kind`.
# (First match wins: libtpu calls a v5p chip "TPU v5", a v5e chip "TPU v5 lite".)
PEAK_BF16 = (
    ("H100", 989e12), ("H200", 989e12), ("H800", 989e12), ("A100", 312e12), ("L40S", 362e12),
    ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12), ("TPU v6", 918e12),
    ("TPU v4", 275e12),
)


def layer_matmul_params(cfg: model_lib.ModelConfig) -> int:
  """Matrix parameters of one block (q, k, v, o, up, gate, down)."""
  D, HD, F = cfg.d_model, cfg.num_heads * cfg.head_dim, cfg.mlp_dim
  return 4 * D * HD + 3 * D * F


def head_matmul_params(cfg: model_lib.ModelConfig) -> int:
  """Matrix parameters of the output head (projection and output matrix)."""
  return cfg.d_model * cfg.vocab_size + (cfg.d_model ** 2 if cfg.head == "mlp" else 0)


def matmul_params(cfg: model_lib.ModelConfig) -> int:
  """Parameters that multiply activations per token: the blocks' and the head's matrices."""
  return cfg.num_layers * layer_matmul_params(cfg) + head_matmul_params(cfg)


def attention_flops_per_token(cfg: model_lib.ModelConfig, seq_len: int,
                              causal_fraction: float) -> float:
  """Forward attention FLOPs per token (QK^T and AV), causal rows at half."""
  full = 4 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim
  return full * (0.5 * causal_fraction + (1.0 - causal_fraction))


def forward_flops_per_token(cfg: model_lib.ModelConfig, seq_len: int,
                            causal_fraction: float) -> float:
  return 2 * matmul_params(cfg) + attention_flops_per_token(cfg, seq_len, causal_fraction)


def train_flops_per_token(cfg: model_lib.ModelConfig, seq_len: int, lam: float) -> float:
  """Useful training FLOPs per input token of a step with AR share `lam`."""
  return 3 * forward_flops_per_token(cfg, seq_len, lam)


def train_step_flops(cfg: model_lib.ModelConfig, seq_len: int, global_batch: int,
                     lam: float) -> float:
  """Useful FLOPs of one optimizer step (global batch x seq_len input tokens)."""
  return train_flops_per_token(cfg, seq_len, lam) * global_batch * seq_len


def peak_flops(device: Any) -> float | None:
  """The chip's dense bf16 peak FLOP/s, or None when unknown (e.g. a CPU)."""
  kind = str(getattr(device, "device_kind", device))
  for name, peak in PEAK_BF16:
    if name.lower() in kind.lower():
      return peak
  return None


def mfu(tokens_per_s: float, flops_per_token: float, peak_per_chip: float | None,
        chips: int) -> float:
  """Model FLOPs utilisation (NaN when the peak is unknown)."""
  if not peak_per_chip:
    return math.nan
  return tokens_per_s * flops_per_token / (peak_per_chip * chips)


def newton_schulz_flops(m: int, n: int, steps: int = 5) -> float:
  """Matmul FLOPs of quintic Newton-Schulz on one [m, n] matrix (wide form, m <= n): per step
  A = X X^T (2 m^2 n), A A (2 m^3), (bA + cA^2) X (2 m^2 n)."""
  m, n = min(m, n), max(m, n)
  return steps * (4.0 * m * m * n + 2.0 * m ** 3)


def muon_flops_per_device(cfg: model_lib.ModelConfig, devices: int, steps: int = 5) -> float:
  """Newton-Schulz FLOPs per device per optimizer step when each wide-shape group of Muon's
  matrices (all layers of q, k, v, o, ...; of up, gate, down) is divided among `devices`
  (each takes ceil(K / devices) of a group's K; 1 = every matrix on every device)."""
  labels = optim.param_labels(model_lib.logical_axes(cfg))
  groups: dict[tuple[int, int], int] = {}
  for label, p in zip(_leaves(labels), _leaves(model_lib.abstract_params(cfg))):
    if label == "muon":
      wide = tuple(sorted(p.shape[-2:]))
      groups[wide] = groups.get(wide, 0) + math.prod(p.shape[:-2])
  return sum(-(-k // devices) * newton_schulz_flops(*wide, steps) for wide, k in groups.items())


def _leaves(tree: Any) -> list[Any]:
  return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, str))

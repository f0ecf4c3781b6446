"""Muon for hidden matrices + AdamW for the rest, partitioned by role; WSD schedule (DESIGN.md §5).

The authors' variant (Moonlight, Liu et al. 2025):

  Muon   buf = mu buf + g;  g' = g + mu buf;  O = NS5(g' / (|g'|_F + 1e-7)) in bf16
         p <- p (1 - lr wd) - lr * 0.2 * sqrt(max(rows, cols)) * O
  AdamW  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
         p <- p (1 - lr wd) - lr * (m / (1 - b1^t)) / ((sqrt(v) + eps) / sqrt(1 - b2^t))
         (eps is added to sqrt(v) *before* bias correction; optax.adamw adds it after, so the
         moment update is ours; the difference is eps vs eps * sqrt(1 - b2^t).)

Layout: our kernels are [D_in, D_out] (torch Linear stores [D_out, D_in]). Newton-Schulz runs on
the wide orientation (transpose when rows > cols), which is the same matrix in either layout
for non-square kernels; for square ones NS5(W^T) = NS5(W)^T up to bf16 rounding. Leading axes
(stacked layers) are batch axes: every 2-D matrix is orthogonalised on its own.
"""

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

NS_COEFFS = (3.4445, -4.7750, 2.0315)
ScalarOrSchedule = float | Callable[[jax.Array], jax.Array]


def _lr(learning_rate: ScalarOrSchedule, count: jax.Array) -> jax.Array:
  return jnp.asarray(learning_rate(count) if callable(learning_rate) else learning_rate,
                     jnp.float32)


def newton_schulz(g_xMxN: jax.Array, steps: int = 5, eps: float = 1e-7,
                  dtype: Any = jnp.bfloat16) -> jax.Array:
  """Quintic Newton-Schulz orthogonalisation of each matrix in the last two axes (fp32 out)."""
  x = g_xMxN.astype(jnp.float32)
  x = x / (jnp.linalg.norm(x, axis=(-2, -1), keepdims=True) + eps)
  x = x.astype(dtype)
  tall = x.shape[-2] > x.shape[-1]
  if tall:
    x = jnp.swapaxes(x, -1, -2)
  a, b, c = NS_COEFFS
  for _ in range(steps):
    A = x @ jnp.swapaxes(x, -1, -2)
    B = b * A + c * (A @ A)
    x = a * x + B @ x
  if tall:
    x = jnp.swapaxes(x, -1, -2)
  return x.astype(jnp.float32)


class MuonState(NamedTuple):
  count: jax.Array
  momentum: Any


def muon(learning_rate: ScalarOrSchedule, *, momentum: float = 0.95, ns_steps: int = 5,
         weight_decay: float = 0.1, eps: float = 1e-7, ns_dtype: Any = jnp.bfloat16
         ) -> optax.GradientTransformation:
  """Muon on every leaf (each >= 2-D; leading axes are batch); returns ready updates."""

  def init_fn(params):
    for path, p in jax.tree_util.tree_leaves_with_path(params):
      if p.ndim < 2:
        raise ValueError(f"muon: parameter {jax.tree_util.keystr(path)} has shape {p.shape}; "
                         "Muon needs matrices (route it to AdamW)")
    return MuonState(jnp.zeros((), jnp.int32),
                     jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("muon: update needs params (decoupled weight decay)")
    lr = _lr(learning_rate, state.count)
    buf = jax.tree.map(lambda b, g: momentum * b + g.astype(jnp.float32), state.momentum, updates)

    def one(g, b, p):
      o = newton_schulz(g.astype(jnp.float32) + momentum * b, ns_steps, eps, ns_dtype)
      scale = 0.2 * max(g.shape[-2], g.shape[-1]) ** 0.5
      return (-lr * weight_decay * p.astype(jnp.float32) - lr * scale * o).astype(p.dtype)
    new = jax.tree.map(one, updates, buf, params)
    return new, MuonState(optax.safe_increment(state.count), buf)

  return optax.GradientTransformation(init_fn, update_fn)


class AdamState(NamedTuple):
  count: jax.Array
  mu: Any
  nu: Any


def adamw(learning_rate: ScalarOrSchedule, *, b1: float = 0.9, b2: float = 0.95,
          eps: float = 1e-8, weight_decay: float = 0.1) -> optax.GradientTransformation:
  """AdamW with eps added to sqrt(v) before bias correction and decoupled decay lr * wd."""

  def init_fn(params):
    z = lambda p: jnp.zeros(p.shape, jnp.float32)
    return AdamState(jnp.zeros((), jnp.int32), jax.tree.map(z, params), jax.tree.map(z, params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("adamw: update needs params (decoupled weight decay)")
    lr = _lr(learning_rate, state.count)
    t = optax.safe_increment(state.count)
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g.astype(jnp.float32), state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g.astype(jnp.float32)),
                      state.nu, updates)
    tf = t.astype(jnp.float32)
    bc1, bc2 = 1 - b1 ** tf, 1 - b2 ** tf

    def one(m, v, p):
      step = (m / bc1) / ((jnp.sqrt(v) + eps) / jnp.sqrt(bc2))
      return (-lr * weight_decay * p.astype(jnp.float32) - lr * step).astype(p.dtype)
    return jax.tree.map(one, mu, nu, params), AdamState(t, mu, nu)

  return optax.GradientTransformation(init_fn, update_fn)


HIDDEN_AXES = frozenset({"embed", "heads", "mlp", "embed_out"})
ADAMW_AXES = frozenset({"vocab", "norm"})


def role(axes: Any) -> str | None:
  """'muon' for a 2-D hidden matrix (its logical axes, leading 'layers' aside, are two hidden
  axes), 'adamw' for vocabulary-sized tensors and norm scales, None if the axes say neither."""
  if not isinstance(axes, tuple):
    return None
  axes = tuple(a for a in axes if a != "layers")
  if len(axes) == 2 and set(axes) <= HIDDEN_AXES:
    return "muon"
  if axes and set(axes) & ADAMW_AXES and set(axes) <= ADAMW_AXES | HIDDEN_AXES:
    return "adamw"
  return None


def param_labels(logical_axes: Any) -> Any:
  """'muon' or 'adamw' for every parameter, from its declared logical axes."""
  def label(path, axes):
    r = role(axes)
    if r is None:
      raise ValueError(f"param_labels: no optimizer role for parameter "
                       f"{jax.tree_util.keystr(path)} (logical axes {axes!r})")
    return r
  return jax.tree_util.tree_map_with_path(label, logical_axes,
                                          is_leaf=lambda x: isinstance(x, tuple) or x is None)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """The optimizer's hyper-parameters; defaults are the paper's (DESIGN.md §5)."""
  learning_rate: float = 0.007
  weight_decay: float = 0.1
  warmup_steps: int = 0
  decay_fraction: float = 0.25
  momentum: float = 0.95
  ns_steps: int = 5
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8


def make_optimizer(learning_rate: ScalarOrSchedule, logical_axes: Any,
                   cfg: OptimConfig = OptimConfig()) -> optax.GradientTransformation:
  """Muon for the hidden matrices, AdamW for embedding, output, bias and norms (routed by the
  parameters' logical axes, `dualjax.model.logical_axes`); `cfg.learning_rate` is not used."""
  return optax.multi_transform(
      {"muon": muon(learning_rate, momentum=cfg.momentum, ns_steps=cfg.ns_steps,
                    weight_decay=cfg.weight_decay),
       "adamw": adamw(learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                      weight_decay=cfg.weight_decay)},
      param_labels(logical_axes))


def wsd_schedule(peak_lr: float, total_steps: int, warmup_steps: int = 0,
                 decay_fraction: float = 0.25) -> optax.Schedule:
  """Warmup-stable-decay: linear 0 -> peak over warmup, constant, linear -> 0 over the last
  round(decay_fraction * total_steps) steps (lr(total_steps) = 0)."""
  if not isinstance(total_steps, int) or total_steps <= 0:
    raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
  if not 0.0 <= decay_fraction <= 1.0:
    raise ValueError(f"decay_fraction must be in [0, 1], got {decay_fraction!r}")
  decay_steps = round(decay_fraction * total_steps)
  if warmup_steps < 0 or warmup_steps + decay_steps > total_steps:
    raise ValueError(f"warmup_steps={warmup_steps} + decay steps {decay_steps} must fit in "
                     f"total_steps={total_steps}")
  stable_end = total_steps - decay_steps
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak_lr, warmup_steps), optax.constant_schedule(peak_lr),
       optax.linear_schedule(peak_lr, 0.0, decay_steps)],
      boundaries=[warmup_steps, stable_end])


def optim_config(section: Any) -> OptimConfig:
  """An `optim` config section (ConfigDict or dict) as an OptimConfig; unknown fields raise."""
  c = dict(section.to_dict() if hasattr(section, "to_dict") else section)
  known = [f.name for f in dataclasses.fields(OptimConfig)]
  unknown = sorted(set(c) - set(known))
  if unknown:
    raise ValueError(f"optim: unknown config field(s) {unknown}; known: {known}")
  return OptimConfig(**c)


def make_optimizer_from_config(section: Any, logical_axes: Any, *, total_steps: int
                               ) -> optax.GradientTransformation:
  """`make_optimizer` with the WSD schedule from an `optim` config section."""
  c = optim_config(section)
  sched = wsd_schedule(c.learning_rate, total_steps, c.warmup_steps, c.decay_fraction)
  return make_optimizer(sched, logical_axes, c)

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
import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dualjax import mesh as mesh_lib
from dualjax import typed_config

NS_COEFFS = (3.4445, -4.7750, 2.0315)
ScalarOrSchedule = float | Callable[[jax.Array], jax.Array]


def _lr(learning_rate: ScalarOrSchedule, count: jax.Array) -> jax.Array:
  return jnp.asarray(learning_rate(count) if callable(learning_rate) else learning_rate,
                     jnp.float32)


def _rounded(x: jax.Array, dtype: Any) -> jax.Array:
  """fp32 `x` rounded to the nearest `dtype` value (kept in fp32). An explicit reduce-precision:
  XLA keeps it, where it may drop a convert pair to fp32 and back (excess precision)."""
  fi = jnp.finfo(dtype)
  return jax.lax.reduce_precision(x, exponent_bits=fi.nexp, mantissa_bits=fi.nmant)


def newton_schulz(g_xMxN: jax.Array, steps: int = 5, eps: float = 1e-7,
                  dtype: Any = jnp.bfloat16) -> jax.Array:
  """Quintic Newton-Schulz orthogonalisation of each matrix in the last two axes (fp32 out).

  The authors' torch.compile'd NS in `dtype` (bf16): each matmul takes `dtype` operands,
  accumulates in fp32 and is rounded to `dtype`; the multiply-adds b A + c A^2 and a X + B X are
  fused in fp32 with the exact coefficients and rounded to `dtype` once (coefficients rounded to
  bf16 would be 3.4375, -4.78125, 2.03125: 4-7% from exact instead of 1.5-3%). Every rounding is
  explicit, so the result does not depend on how XLA fuses the surrounding computation.
  """
  return _ns_iterations(_normalised(g_xMxN.astype(jnp.float32), eps, dtype), steps, dtype)


def _normalised(x: jax.Array, eps: float, dtype: Any) -> jax.Array:
  """x / (|x|_F + eps), rounded to `dtype` (kept in fp32): NS's input."""
  return _rounded(x / (jnp.linalg.norm(x, axis=(-2, -1), keepdims=True) + eps), dtype)


def _ns_iterations(x: jax.Array, steps: int, dtype: Any) -> jax.Array:
  """The quintic iterations on normalised matrices (`newton_schulz`'s roundings)."""
  f32 = jnp.float32
  tall = x.shape[-2] > x.shape[-1]
  if tall:
    x = jnp.swapaxes(x, -1, -2)

  def mm(u, v):
    return _rounded(jnp.matmul(u.astype(dtype), v.astype(dtype), preferred_element_type=f32),
                    dtype)

  a, b, c = NS_COEFFS
  for _ in range(steps):
    A = mm(x, jnp.swapaxes(x, -1, -2))
    B = _rounded(b * A + c * mm(A, A), dtype)
    x = _rounded(a * x + mm(B, x), dtype)
  if tall:
    x = jnp.swapaxes(x, -1, -2)
  return x


class MuonState(NamedTuple):
  count: jax.Array
  momentum: Any


def _wide(x: jax.Array) -> tuple[jax.Array, bool]:
  """[..., m, n] with m <= n (transposed when taller than wide)."""
  tall = x.shape[-2] > x.shape[-1]
  return (jnp.swapaxes(x, -1, -2) if tall else x), tall


NsFn = Callable[[jax.Array], jax.Array]  # [K, m, n] -> NS of each of the K matrices (fp32)


def orthogonalise_all(gs: list[jax.Array], ns: Callable[..., jax.Array],
                      specs: list[Any] | None = None) -> list[jax.Array]:
  """`ns` of every matrix of `gs` (each [..., m, n]), batched by wide shape.

  Matrices of one wide shape (all layers of q, k, v, o; of up, gate and down^T) are stacked into
  one batch, so that `ns` can divide a batch among devices (`sharded_ns`). With `specs` (one
  hashable per matrix: how its wide form is sharded), matrices are batched by (shape, spec) and
  `ns(stack, spec)` is called.
  """
  groups: dict[Any, list[int]] = {}
  wide = []
  for i, g in enumerate(gs):
    w, tall = _wide(g.astype(jnp.float32))
    wide.append((w.reshape((-1,) + w.shape[-2:]), tall, g.shape))
    groups.setdefault((w.shape[-2:], specs[i] if specs else None), []).append(i)
  out: list[jax.Array | None] = [None] * len(gs)
  for (_, spec), members in groups.items():
    stack = jnp.concatenate([wide[i][0] for i in members])
    o = ns(stack, spec) if specs else ns(stack)
    start = 0
    for i in members:
      w, tall, shape = wide[i]
      part = o[start:start + w.shape[0]].reshape(shape[:-2] + w.shape[-2:])
      start += w.shape[0]
      out[i] = jnp.swapaxes(part, -1, -2) if tall else part
  return out


def sharded_ns(mesh: Any, steps: int = 5, eps: float = 1e-7, dtype: Any = jnp.bfloat16
               ) -> NsFn | None:
  """Newton-Schulz of a replicated [K, m, n] stack divided among every device of `mesh`: each
  device orthogonalises its K/n matrices (K padded with zero matrices, NS(0) = 0), then one
  all-gather of the results in the NS dtype (DESIGN.md §4). None on one device."""
  if mesh is None or mesh.size == 1:
    return None
  mesh = mesh_lib.torus_mesh(mesh)  # the same devices; per-torus-axis gathers on a TPU slice
  axes = tuple(mesh.axis_names)
  n = mesh.size

  def local(stack):
    K = stack.shape[0]
    k = -(-K // n)
    stack = jnp.concatenate([stack, jnp.zeros((k * n - K,) + stack.shape[1:], stack.dtype)])
    i = jax.lax.axis_index(axes)
    mine = jax.lax.dynamic_slice_in_dim(stack, i * k, k, axis=0)
    # NS ends in `dtype` (bf16): gathering that is exact and half the bytes of fp32.
    o = newton_schulz(mine, steps, eps, dtype).astype(dtype)
    return mesh_lib.gather_all(o, axes, 0)[:K].astype(jnp.float32)

  return jax.shard_map(local, mesh=mesh, in_specs=jax.sharding.PartitionSpec(),
                       out_specs=jax.sharding.PartitionSpec(), check_vma=False)


def _ns_of_shards(x: jax.Array, cuts: list[tuple[int, tuple[str, ...]]], g: int, steps: int,
                  eps: float, dtype: Any, gather: bool) -> jax.Array:
  """Inside a shard_map: NS of every matrix of a stack [K, m, n] of which this device holds a
  shard, cut along stack dims `cuts` ((dim, mesh axes) each; g devices in all). Normalised with
  the psum of the shards' sums of squares and rounded to `dtype`; all-to-alls give each device
  ceil(K/g) whole matrices (K padded with zero matrices, NS(0) = 0); the results come back
  all-gathered whole (`gather`) or by the inverse all-to-alls to this device's shards. fp32 out."""
  every = tuple(a for _, axes in cuts for a in axes)
  K = x.shape[0]
  k = -(-K // g)
  sq = jax.lax.psum(jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True), every)
  x = _rounded(x / (jnp.sqrt(sq) + eps), dtype).astype(dtype)
  x = jnp.concatenate([x, jnp.zeros((k * g - K,) + x.shape[1:], dtype)])
  for dim, axes in cuts:  # whole matrices: k of them per device
    x = jax.lax.all_to_all(x, axes, split_axis=0, concat_axis=dim, tiled=True)
  x = _ns_iterations(x.astype(jnp.float32), steps, dtype).astype(dtype)
  if gather:
    return mesh_lib.gather_all(x, every, 0)[:K].astype(jnp.float32)
  for dim, axes in reversed(cuts):  # back to this device's shard of every matrix
    x = jax.lax.all_to_all(x, axes, split_axis=dim, concat_axis=0, tiled=True)
  return x[:K].astype(jnp.float32)


class MuonShards:
  """ZeRO-1 for Muon on a data-parallel mesh (every device holds the parameters whole).

  Each Muon matrix's momentum is stored sharded over all devices along its wide dimension
  (`sharding`), so the step's summed gradient arrives reduce-scattered (fp32, half an
  all-reduce) and the momentum update is local. Newton-Schulz then needs whole matrices:
  `ns` normalises each matrix (a psum of K sums of squares), moves the bf16 shards with one
  all-to-all so that each device holds K/n whole matrices, orthogonalises them and all-gathers
  the bf16 results. Per device on the wire, per Muon parameter: 4 (reduce-scatter) + 2/n (all-
  to-all) + 2 (all-gather) bytes, against one fp32 all-reduce's 8, plus the zero matrices that
  pad each group's K to a multiple of n; NS FLOPs / n. On a TPU slice the reduce-scatter and
  the all-gather run one torus axis at a time (`mesh.torus_mesh`). A matrix whose wide
  dimension n does not divide keeps a replicated momentum and `sharded_ns` (whole-matrix
  shares, one all-gather).
  """

  def __init__(self, mesh: Any, steps: int = 5, eps: float = 1e-7, dtype: Any = jnp.bfloat16):
    self.mesh, self.steps, self.eps, self.dtype = mesh, steps, eps, dtype
    self.axes = tuple(mesh.axis_names)
    self.n = mesh.size
    self._whole = sharded_ns(mesh, steps, eps, dtype)
    # The same devices in the same order: on a TPU slice the reduce-scatter (`step.
    # reduce_replicas`) and the all-gather run one torus axis at a time (`mesh.torus_mesh`).
    self._torus = mesh_lib.torus_mesh(mesh)

  def spec(self, shape: tuple[int, ...]) -> jax.sharding.PartitionSpec | None:
    """The momentum's PartitionSpec: the wide dimension (the larger of the last two; the last
    when square) over every device; None (replicated) when it does not divide."""
    wide = len(shape) - 1 if shape[-1] >= shape[-2] else len(shape) - 2
    if shape[wide] % self.n:
      return None
    spec: list[Any] = [None] * len(shape)
    spec[wide] = self.axes
    return jax.sharding.PartitionSpec(*spec)

  def sharding(self, shape: tuple[int, ...]) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(self.mesh, self.spec(shape) or jax.sharding.PartitionSpec())

  def constrain(self, x: jax.Array) -> jax.Array:
    return jax.lax.with_sharding_constraint(x, self.sharding(x.shape))

  def ns(self, stack_KxMxN: jax.Array) -> jax.Array:
    """NS of each wide [m, n] matrix of a stack whose n is sharded (`spec`); replicated out."""
    n = self.n
    if self.spec(stack_KxMxN.shape) is None:
      return self._whole(stack_KxMxN)
    axes = tuple(self._torus.axis_names)

    def local(x):  # [K, m, n/devices] fp32 -> [K, m, n]
      return _ns_of_shards(x, [(2, axes)], n, self.steps, self.eps, self.dtype, gather=True)

    P = jax.sharding.PartitionSpec
    return jax.shard_map(local, mesh=self._torus, in_specs=P(None, None, axes), out_specs=P(),
                         check_vma=False)(self.constrain(stack_KxMxN))


class ShardedMatrixNS:
  """Newton-Schulz on an fsdp/tensor mesh, where each Muon matrix is stored sharded (DESIGN.md
  §4). A stack of wide matrices sharded along one of its two matrix dimensions goes to whole-
  matrix shares by a bf16 all-to-all over that dimension's mesh axes, is orthogonalised there
  (NS FLOPs / the axes' size) and returns to its sharding by the inverse all-to-all, instead of
  being gathered whole onto every device (or, sharded along both, having each NS matmul's
  partial sums all-reduced). A stack sharded along both dimensions (fsdp x tensor) takes one
  all-to-all per dimension each way; a replicated one runs `newton_schulz` as it is.
  """

  def __init__(self, mesh: Any, param_specs: Mapping[str, Any], steps: int = 5,
               eps: float = 1e-7, dtype: Any = jnp.bfloat16):
    self.mesh, self.param_specs = mesh, dict(param_specs)
    self.steps, self.eps, self.dtype = steps, eps, dtype

  def wide_spec(self, key: str, shape: tuple[int, ...]) -> tuple[Any, Any] | None:
    """(m entry, n entry) of the wide form of parameter `key`; None if a leading axis is sharded."""
    spec = tuple(self.param_specs.get(key, ()))
    spec = spec + (None,) * (len(shape) - len(spec))
    if any(e is not None for e in spec[:-2]):
      return None
    m, n = spec[-2], spec[-1]
    return (n, m) if shape[-2] > shape[-1] else (m, n)

  def __call__(self, stack_KxMxN: jax.Array, wide: tuple[Any, Any] | None) -> jax.Array:
    steps, eps, dtype = self.steps, self.eps, self.dtype
    if wide is None or wide == (None, None):
      return newton_schulz(stack_KxMxN, steps, eps, dtype)
    # (matrix dim of the stack, its mesh axes) for each sharded dimension
    cuts = [(d, e if isinstance(e, tuple) else (e,)) for d, e in zip((1, 2), wide)
            if e is not None]
    g = math.prod(self.mesh.shape[a] for _, axes in cuts for a in axes)

    def local(x):  # [K, m/gm, n/gn], fp32, back in the same sharding
      return _ns_of_shards(x, cuts, g, steps, eps, dtype, gather=False)

    spec = jax.sharding.PartitionSpec(None, *wide)
    return jax.shard_map(local, mesh=self.mesh, in_specs=spec, out_specs=spec,
                         check_vma=False)(stack_KxMxN)


def muon(learning_rate: ScalarOrSchedule, *, momentum: float = 0.95, ns_steps: int = 5,
         weight_decay: float = 0.1, eps: float = 1e-7, ns_dtype: Any = jnp.bfloat16,
         scale_dims: Mapping[str, int] | None = None,
         ns: NsFn | MuonShards | ShardedMatrixNS | None = None) -> optax.GradientTransformation:
  """Muon on every leaf (each >= 2-D; leading axes are batch); returns ready updates.

  `scale_dims`: parameter path (`jax.tree_util.keystr`) -> max(rows, cols) of its LOGICAL shape,
  for parameters stored padded (the FFN); default: the stored shape. `ns`: how a stack of
  matrices is orthogonalised (e.g. `sharded_ns(mesh)`), or a `MuonShards` (momentum sharded
  over the devices; the gradients then arrive reduce-scattered), or a `ShardedMatrixNS` (fsdp/
  tensor meshes); default `newton_schulz` here.
  """
  on_shards = ns if isinstance(ns, ShardedMatrixNS) else None
  shards = ns if isinstance(ns, MuonShards) else None
  constrain = shards.constrain if shards else (lambda x: x)
  ns = (shards.ns if shards else ns) or (
      lambda stack: newton_schulz(stack, ns_steps, eps, ns_dtype))

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
    updates = jax.tree.map(constrain, updates)  # with MuonShards: reduce-scattered
    buf = jax.tree.map(lambda b, g: constrain(momentum * b + g.astype(jnp.float32)),
                       state.momentum, updates)
    paths_g, treedef = jax.tree_util.tree_flatten_with_path(updates)
    bs, ps = jax.tree.leaves(buf), jax.tree.leaves(params)
    specs = ([on_shards.wide_spec(jax.tree_util.keystr(path), g.shape) for path, g in paths_g]
             if on_shards else None)
    os = orthogonalise_all([g.astype(jnp.float32) + momentum * b for (_, g), b in zip(paths_g, bs)],
                           on_shards or ns, specs)
    new = []
    for (path, g), o, p in zip(paths_g, os, ps):
      dim = (scale_dims or {}).get(jax.tree_util.keystr(path), max(g.shape[-2], g.shape[-1]))
      new.append((-lr * weight_decay * p.astype(jnp.float32)
                  - lr * 0.2 * dim ** 0.5 * o).astype(p.dtype))
    return jax.tree.unflatten(treedef, new), MuonState(optax.safe_increment(state.count), buf)

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
  # Muon divided among the devices instead of repeated on every one: momentum and Newton-Schulz
  # on a data-parallel mesh (`MuonShards`), Newton-Schulz on whole-matrix shares of the sharded
  # matrices on an fsdp/tensor mesh (`ShardedMatrixNS`).
  sharded_ns: bool = True


def muon_shards(mesh: Any, cfg: OptimConfig, param_specs: Mapping[str, Any] | None = None
                ) -> MuonShards | ShardedMatrixNS | None:
  """How Muon is divided among the devices of `mesh` when `cfg.sharded_ns` (None: not, or one
  device): `MuonShards` on a data-parallel mesh; with `param_specs` (parameter path ->
  PartitionSpec of a sharded parameter: fsdp/tensor meshes), `ShardedMatrixNS`."""
  if mesh is None or mesh.size == 1 or not cfg.sharded_ns:
    return None
  if param_specs is not None:
    return ShardedMatrixNS(mesh, param_specs, cfg.ns_steps)
  return MuonShards(mesh, cfg.ns_steps)


def make_optimizer(learning_rate: ScalarOrSchedule, logical_axes: Any,
                   cfg: OptimConfig = OptimConfig(), *, logical_shapes: Any = None,
                   division: MuonShards | ShardedMatrixNS | None = None
                   ) -> optax.GradientTransformation:
  """Muon for the hidden matrices, AdamW for embedding, output, bias and norms (routed by the
  parameters' logical axes, `dualjax.model.logical_axes`); `cfg.learning_rate` is not used.

  `logical_shapes` (`model.logical_shapes`): Muon's scale uses them for padded parameters.
  `division`: how Muon is divided among the devices (`muon_shards`); None: not divided.
  """
  scale_dims = None
  if logical_shapes is not None:
    scale_dims = {jax.tree_util.keystr(path): max(shape[-2:])
                  for path, shape in jax.tree_util.tree_leaves_with_path(
                      logical_shapes, is_leaf=lambda x: isinstance(x, tuple))
                  if len(shape) >= 2}
  return optax.multi_transform(
      {"muon": muon(learning_rate, momentum=cfg.momentum, ns_steps=cfg.ns_steps,
                    weight_decay=cfg.weight_decay, scale_dims=scale_dims,
                    ns=division),
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
  return typed_config.from_section(OptimConfig, section, "optim")


def make_optimizer_from_config(section: Any, logical_axes: Any, *, total_steps: int,
                               logical_shapes: Any = None,
                               division: MuonShards | ShardedMatrixNS | None = None
                               ) -> optax.GradientTransformation:
  """`make_optimizer` with the WSD schedule from an `optim` config section."""
  c = optim_config(section)
  sched = wsd_schedule(c.learning_rate, total_steps, c.warmup_steps, c.decay_fraction)
  return make_optimizer(sched, logical_axes, c, logical_shapes=logical_shapes,
                        division=division)

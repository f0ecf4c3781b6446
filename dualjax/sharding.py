"""Logical-axis sharding of parameters, optimizer state and activations (DESIGN.md §4).

Every parameter declares its logical axes in the model (`dualjax.model.logical_axes`); the
config's rules map logical names to mesh axes (Flax's `nn.logical_to_mesh_axes`), e.g.
('embed', 'fsdp') shards every hidden-size dimension over 'fsdp' (FSDP), ('mlp', 'tensor') the
MLP width over 'tensor', ('activation_batch', ('replica', 'fsdp')) the rows of activations. A mesh
axis of size 1, or one that does not divide the dimension, is dropped (that dimension stays
replicated), so one rule set serves every mesh.
"""

import contextlib
import contextvars
import math
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = Sequence[tuple[str, Any]]

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("embed", "fsdp"), ("vocab", "tensor"), ("heads", "tensor"), ("mlp", "tensor"),
    ("activation_batch", ("replica", "fsdp")), ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"), ("activation_vocab", "tensor"))


def normalize_rules(rules: Rules) -> tuple[tuple[str, Any], ...]:
  """Rules as a tuple of (logical name, mesh axis | tuple of mesh axes | None)."""
  out = []
  for rule in rules:
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(f"a rule must be (logical name, mesh axis or axes), got {rule!r}")
    name, axes = rule
    out.append((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes))
  return tuple(out)


def _mesh_axes_of(entry: Any) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


def spec_for(shape: Sequence[int], axes: Sequence[str | None], mesh: Mesh, rules: Rules) -> P:
  """The mesh PartitionSpec of one array with logical `axes`, fitted to `mesh` and `shape`."""
  rules = normalize_rules(rules)
  for name, entry in rules:
    for a in _mesh_axes_of(entry):
      if a not in mesh.shape:
        raise ValueError(f"rule ({name!r}, {entry!r}) names mesh axis {a!r}; the mesh has "
                         f"{tuple(mesh.axis_names)}")
  logical = nn.logical_to_mesh_axes(tuple(axes), rules)
  out: list[Any] = []
  for dim, entry in zip(shape, logical):
    kept: list[str] = []
    for a in _mesh_axes_of(entry):
      if mesh.shape[a] > 1 and dim % math.prod(mesh.shape[k] for k in (*kept, a)) == 0:
        kept.append(a)
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*out)


def param_shardings(logical_axes: Any, abstract_params: Any, mesh: Mesh,
                    rules: Rules = DEFAULT_RULES) -> Any:
  """NamedShardings for a params pytree from its logical axes (`model.logical_axes(cfg)`)."""
  return jax.tree.map(
      lambda axes, x: NamedSharding(mesh, spec_for(x.shape, axes, mesh, rules)),
      logical_axes, abstract_params, is_leaf=lambda x: isinstance(x, tuple))


def _names(path: Sequence[Any]) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def state_shardings(logical_axes: Any, abstract_params: Any,
                    optimizer: optax.GradientTransformation, mesh: Mesh,
                    rules: Rules = DEFAULT_RULES, override: Any = None) -> dict[str, Any]:
  """Shardings of the train state {params, opt_state, step, rng}.

  An optimizer-state leaf whose path ends with a parameter's path and has its shape (moments,
  momentum buffers) is sharded like that parameter; anything else (counts) is replicated.
  `override(path names, shape)` may give an optimizer-state leaf its own sharding (None: the
  rule above).
  """
  p_sh = param_shardings(logical_axes, abstract_params, mesh, rules)
  by_path = {}
  for (path, x), sh in zip(jax.tree_util.tree_leaves_with_path(abstract_params),
                           jax.tree_util.tree_leaves(p_sh)):
    by_path[_names(path)] = (x.shape, sh)
  replicated = NamedSharding(mesh, P())

  def opt_leaf(path, x):
    names = _names(path)
    own = override(names, x.shape) if override else None
    if own is not None:
      return own
    for start in range(len(names)):
      hit = by_path.get(names[start:])
      if hit is not None and tuple(hit[0]) == tuple(x.shape):
        return hit[1]
    return replicated

  abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
  opt_sh = jax.tree_util.tree_map_with_path(opt_leaf, abstract_opt)
  return {"params": p_sh, "opt_state": opt_sh, "step": replicated, "rng": replicated}


def without_axes(rules: Rules, axes: Sequence[str]) -> tuple[tuple[str, Any], ...]:
  """`rules` with the mesh axes `axes` removed (e.g. axes that are manual inside a shard_map)."""
  out = []
  for name, entry in normalize_rules(rules):
    kept = tuple(a for a in _mesh_axes_of(entry) if a not in axes)
    out.append((name, None if not kept else kept[0] if len(kept) == 1 else kept))
  return tuple(out)


_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("dualjax_mesh", default=None)
_VMAPPED: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("dualjax_vmapped",
                                                                           default=())


@contextlib.contextmanager
def activation_rules(mesh: Mesh | None, rules: Rules, vmapped_axes: Sequence[str] = ()
                     ) -> Iterator[None]:
  """Model code traced inside applies `rules` to its activation constraints.

  Enter it inside the traced function. `mesh` sets the abstract mesh the constraints refer to
  (and the mesh per-device kernels run on, `current_mesh`); None keeps the current one (inside a
  shard_map body, whose manual axes `rules` must not name: see `without_axes`). `vmapped_axes`:
  mesh axes that a surrounding `vmap(spmd_axis_name=...)` already maps (nested shard_maps must
  not name them either).
  """
  with contextlib.ExitStack() as stack:
    if mesh is not None:
      stack.enter_context(jax.sharding.use_abstract_mesh(mesh.abstract_mesh))
      token = _MESH.set(mesh)
      stack.callback(_MESH.reset, token)
    token = _VMAPPED.set(tuple(vmapped_axes))
    stack.callback(_VMAPPED.reset, token)
    stack.enter_context(nn.logical_axis_rules(normalize_rules(rules)))
    yield


def vmapped_axes() -> tuple[str, ...]:
  """The mesh axes a surrounding spmd vmap maps (see `activation_rules`)."""
  return _VMAPPED.get()


def current_mesh() -> Mesh | jax.sharding.AbstractMesh | None:
  """The mesh a nested shard_map should use: the context's abstract mesh inside a manual region,
  else the concrete mesh `activation_rules` was given; None outside both."""
  ctx = jax.sharding.get_abstract_mesh()
  if not ctx.empty and any(t == jax.sharding.AxisType.Manual for t in ctx.axis_types):
    return ctx
  mesh = _MESH.get()
  if mesh is not None and (ctx.empty or ctx == mesh.abstract_mesh):
    return mesh
  return None if ctx.empty else ctx

"""Logical-axis sharding of parameters and optimizer state (DESIGN.md §4).

Each parameter gets logical axis names from its role (its leaf name); the config's rules map
logical names to mesh axes, e.g. ('embed', 'fsdp') shards every hidden-size dimension over 'fsdp'
(FSDP) and ('mlp', 'tensor') the MLP width over 'tensor'. A rule is skipped for a dimension its
mesh axis does not divide, and a mesh axis is used at most once per tensor.
"""

from typing import Any, Sequence

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Leaf name -> logical axes of its trailing dimensions (a leading scanned-layer axis is 'layers').
LOGICAL_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"),
    "q": ("embed", "heads"), "k": ("embed", "heads"), "v": ("embed", "heads"),
    "o": ("heads", "embed"),
    "up": ("embed", "mlp"), "gate": ("embed", "mlp"), "down": ("mlp", "embed"),
    "proj": ("embed", "embed_out"),
    "out": ("embed", "vocab"), "out_bias": ("vocab",),
}

DEFAULT_RULES: tuple[tuple[str, str], ...] = (
    ("embed", "fsdp"), ("vocab", "tensor"), ("heads", "tensor"), ("mlp", "tensor"))


def _leaf_name(path: Sequence[Any]) -> str:
  last = path[-1]
  return str(getattr(last, "key", getattr(last, "name", last)))


def logical_axes(path: Sequence[Any], ndim: int) -> tuple[str | None, ...]:
  axes = LOGICAL_AXES.get(_leaf_name(path), ())
  if len(axes) > ndim:
    axes = axes[-ndim:]
  return (None,) * (ndim - len(axes)) + tuple(axes)


def spec_for(shape: Sequence[int], axes: Sequence[str | None], mesh: Mesh,
             rules: Sequence[tuple[str, str]]) -> P:
  rule = dict(rules)
  used: set[str] = set()
  out: list[str | None] = []
  for dim, name in zip(shape, axes):
    mesh_axis = rule.get(name) if name else None
    if (mesh_axis and mesh_axis not in used and mesh.shape.get(mesh_axis, 1) > 1
        and dim % mesh.shape[mesh_axis] == 0):
      out.append(mesh_axis)
      used.add(mesh_axis)
    else:
      out.append(None)
  return P(*out)


def param_shardings(abstract_params: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, str]] = DEFAULT_RULES) -> Any:
  """NamedShardings for a params pytree (arrays or ShapeDtypeStructs)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, spec_for(x.shape, logical_axes(path, x.ndim), mesh, rules)),
      abstract_params)


def _names(path: Sequence[Any]) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def state_shardings(abstract_params: Any, optimizer: optax.GradientTransformation, mesh: Mesh,
                    rules: Sequence[tuple[str, str]] = DEFAULT_RULES) -> dict[str, Any]:
  """Shardings of the train state {params, opt_state, step, rng}.

  An optimizer-state leaf whose path ends with a parameter's path and has its shape (moments,
  momentum buffers) is sharded like that parameter; anything else (counts) is replicated.
  """
  p_sh = param_shardings(abstract_params, mesh, rules)
  by_path = {}
  for (path, x), sh in zip(jax.tree_util.tree_leaves_with_path(abstract_params),
                           jax.tree_util.tree_leaves(p_sh)):
    by_path[_names(path)] = (x.shape, sh)
  replicated = NamedSharding(mesh, P())

  def opt_leaf(path, x):
    names = _names(path)
    for start in range(len(names)):
      hit = by_path.get(names[start:])
      if hit is not None and tuple(hit[0]) == tuple(x.shape):
        return hit[1]
    return replicated

  abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
  opt_sh = jax.tree_util.tree_map_with_path(opt_leaf, abstract_opt)
  return {"params": p_sh, "opt_state": opt_sh, "step": replicated, "rng": replicated}

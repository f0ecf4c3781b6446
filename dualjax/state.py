"""The training state {params, opt_state, step, rng}: optimizer, initial value, shardings.

Parameters and optimizer state are sharded by the model's declared logical axes and the config's
`mesh.rules` (dualjax.sharding); step and rng are replicated. The rng is the key data of
fold_in(key(seed), 1); the step's noise key is fold_in(rng, step) (dualjax.step).
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from dualjax import config_lib
from dualjax import model as model_lib
from dualjax import optim
from dualjax import sharding
from dualjax.errors import ConfigError

State = dict[str, Any]


def _data_parallel(mesh: jax.sharding.Mesh | None) -> bool:
  return mesh is not None and mesh.shape.get("fsdp", 1) == mesh.shape.get("tensor", 1) == 1


def muon_shards(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None
                ) -> optim.MuonShards | None:
  """ZeRO-1 for Muon (`optim.MuonShards`) on a mesh whose devices all hold the parameters whole
  (no fsdp/tensor sharding), if `optim.sharded_ns`."""
  if not _data_parallel(mesh):
    return None
  try:
    return optim.muon_shards(mesh, optim.optim_config(cfg.optim))
  except (TypeError, ValueError) as e:
    raise ConfigError(str(e) if str(e).startswith("optim") else f"optim: {e}") from None


def make_optimizer(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None
                   ) -> optax.GradientTransformation:
  """Muon + AdamW with the WSD schedule of the config, routed by the model's logical axes; Muon
  divided among the devices of `mesh` (`optim.muon_shards`): ZeRO-1 on a data-parallel mesh,
  Newton-Schulz on whole-matrix shares of the sharded matrices on an fsdp/tensor mesh."""
  mc = config_lib.model_config(cfg)
  param_specs = None
  if mesh is not None and not _data_parallel(mesh):
    shardings = sharding.param_shardings(model_lib.logical_axes(mc), model_lib.abstract_params(mc),
                                         mesh, config_lib.rules(cfg))
    param_specs = {jax.tree_util.keystr(path): sh.spec
                   for path, sh in jax.tree_util.tree_leaves_with_path(shardings)}
  try:
    return optim.make_optimizer_from_config(
        cfg.optim, model_lib.logical_axes(mc), total_steps=cfg.train.steps,
        logical_shapes=model_lib.logical_shapes(mc), mesh=mesh, param_specs=param_specs)
  except (TypeError, ValueError) as e:
    raise ConfigError(str(e) if str(e).startswith("optim") else f"optim: {e}") from None


def init_state_fn(seed: int, model_cfg: model_lib.ModelConfig,
                  optimizer: optax.GradientTransformation) -> Callable[[], State]:
  """The initial training state as a function of nothing (jit it with out_shardings)."""
  def init_state():
    params = model_lib.init(model_cfg, jax.random.key(seed))
    return {"params": params, "opt_state": optimizer.init(params),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1))}
  return init_state


def param_shardings(model_cfg: model_lib.ModelConfig, mesh: jax.sharding.Mesh,
                    rules: sharding.Rules) -> Any:
  return sharding.param_shardings(model_lib.logical_axes(model_cfg),
                                  model_lib.abstract_params(model_cfg), mesh, rules)


def abstract_params(model_cfg: model_lib.ModelConfig, mesh: jax.sharding.Mesh,
                    rules: sharding.Rules) -> Any:
  """ShapeDtypeStructs of the parameters with their shardings (what a restore needs)."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      model_lib.abstract_params(model_cfg),
                      param_shardings(model_cfg, mesh, rules))


@dataclasses.dataclass
class StateSpec:
  """What building or restoring the training state needs."""
  abstract: State            # ShapeDtypeStructs with shardings
  shardings: State
  init: Callable[[], State]  # the initial state (unsharded: jit with out_shardings)
  optimizer: optax.GradientTransformation
  # Per parameter: the sharding its summed gradient should arrive in (Muon's momentum sharding
  # under optim.MuonShards), or None (replicated, as the parameter); None when there is none.
  grad_shardings: Any = None


def state_spec(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> StateSpec:
  """The state's structure, shardings and initial value for a run config on `mesh`."""
  mc = config_lib.model_config(cfg)
  optimizer = make_optimizer(cfg, mesh)
  init = init_state_fn(cfg.seed, mc, optimizer)
  shards = muon_shards(cfg, mesh)
  shardings = sharding.state_shardings(
      model_lib.logical_axes(mc), model_lib.abstract_params(mc), optimizer, mesh,
      config_lib.rules(cfg), override=_momentum_sharding(shards) if shards else None)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          jax.eval_shape(init), shardings)
  grad_shardings = None
  if shards:
    labels = optim.param_labels(model_lib.logical_axes(mc))
    grad_shardings = jax.tree.map(
        lambda label, p: shards.sharding(tuple(p.shape)) if label == "muon" else None,
        labels, model_lib.abstract_params(mc))
  return StateSpec(abstract, shardings, init, optimizer, grad_shardings)


def _momentum_sharding(shards: optim.MuonShards) -> Callable[[tuple[str, ...], tuple[int, ...]],
                                                               Any]:
  """Muon's momentum buffers sharded as `shards` keeps them (None: the default rule)."""
  def override(names, shape):
    if "muon" in names and "momentum" in names and len(shape) >= 2:
      return shards.sharding(tuple(shape))
    return None
  return override


def initial_state(spec: StateSpec) -> State:
  """The initial state, created sharded."""
  return jax.jit(spec.init, out_shardings=spec.shardings)()

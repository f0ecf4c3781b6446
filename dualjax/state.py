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
from dualjax import mesh as mesh_lib
from dualjax import model as model_lib
from dualjax import optim
from dualjax import sharding
from dualjax.errors import ConfigError

State = dict[str, Any]


def muon_division(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None
                  ) -> optim.MuonShards | optim.ShardedMatrixNS | None:
  """How Muon is divided among the devices of `mesh` (`optim.muon_shards`, if
  `optim.sharded_ns`): ZeRO-1 on a mesh whose devices all hold the parameters whole, Newton-
  Schulz on whole-matrix shares of the sharded matrices on an fsdp/tensor mesh."""
  if mesh is None:
    return None
  mc = config_lib.model_config(cfg)
  param_specs = None
  if not mesh_lib.params_whole(mesh):
    shardings = sharding.param_shardings(model_lib.logical_axes(mc), model_lib.abstract_params(mc),
                                         mesh, config_lib.rules(cfg))
    param_specs = {jax.tree_util.keystr(path): sh.spec
                   for path, sh in jax.tree_util.tree_leaves_with_path(shardings)}
  return optim.muon_shards(mesh, _optim_config(cfg), param_specs)


def _optim_config(cfg: ml_collections.ConfigDict) -> optim.OptimConfig:
  try:
    return optim.optim_config(cfg.optim)
  except (TypeError, ValueError) as e:
    raise _optim_error(e) from None


def _optim_error(e: Exception) -> ConfigError:
  return ConfigError(str(e) if str(e).startswith("optim") else f"optim: {e}")


def make_optimizer(cfg: ml_collections.ConfigDict,
                   division: optim.MuonShards | optim.ShardedMatrixNS | None = None
                   ) -> optax.GradientTransformation:
  """Muon + AdamW with the WSD schedule of the config, routed by the model's logical axes; Muon
  divided among the devices as `division` says (`muon_division`)."""
  mc = config_lib.model_config(cfg)
  try:
    return optim.make_optimizer_from_config(
        cfg.optim, model_lib.logical_axes(mc), total_steps=cfg.train.steps,
        logical_shapes=model_lib.logical_shapes(mc), division=division)
  except (TypeError, ValueError) as e:
    raise _optim_error(e) from None


def muon_layout(division: Any, model_cfg: model_lib.ModelConfig) -> tuple[Any, Any]:
  """(`override` for `sharding.state_shardings`, `grad_shardings` for `step.make_train_step`)
  that ZeRO-1 (`optim.MuonShards`) needs: Muon's momentum stored sharded and its gradients
  reduce-scattered into it; (None, None) for any other `division`."""
  if not isinstance(division, optim.MuonShards):
    return None, None

  def override(names, shape):
    if "muon" in names and "momentum" in names and len(shape) >= 2:
      return division.sharding(tuple(shape))
    return None

  labels = optim.param_labels(model_lib.logical_axes(model_cfg))
  grad_shardings = jax.tree.map(
      lambda label, p: division.sharding(tuple(p.shape)) if label == "muon" else None,
      labels, model_lib.abstract_params(model_cfg))
  return override, grad_shardings


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
  division = muon_division(cfg, mesh)
  optimizer = make_optimizer(cfg, division)
  init = init_state_fn(cfg.seed, mc, optimizer)
  override, grad_shardings = muon_layout(division, mc)
  shardings = sharding.state_shardings(
      model_lib.logical_axes(mc), model_lib.abstract_params(mc), optimizer, mesh,
      config_lib.rules(cfg), override=override)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          jax.eval_shape(init), shardings)
  return StateSpec(abstract, shardings, init, optimizer, grad_shardings)


def initial_state(spec: StateSpec) -> State:
  """The initial state, created sharded."""
  return jax.jit(spec.init, out_shardings=spec.shardings)()

"""The dual training step: one jitted SPMD program, objectives split over mesh cells (DESIGN.md §4).

The global batch is cut into cells = replicas x microsteps (`dualjax.split.ObjectiveSplit`); each
cell runs the AR or the MDM objective with its own noise key fold_in(step_key, cell). Gradients
are the mean over cells, so the step's loss is

  lam * ar_loss_scale * mean_{AR cells} L_AR + (1 - lam) * mean_{MDM cells} L_MDM,

i.e. the dual loss with L_AR and L_MDM averaged over their own cells, as in the authors' DDP code.
Two programs compute exactly these cells, both over `accumulate` (a scan over microsteps):
`time_split_grad_fn` (whole single-objective microsteps, plain SPMD, any mesh) and
`device_split_grad_fn` (the paper's AR/MDM sub-meshes: a partial-manual `shard_map` over 'replica'
with `lax.cond` on the cell). lam in {0, 1} compiles without any conditional.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from dualjax import model as model_lib
from dualjax import objectives
from dualjax import sharding
from dualjax.split import ObjectiveSplit

Params = Any
Batch = dict[str, jax.Array]
GradFn = Callable[[Params, Batch, jax.Array], tuple[Params, dict[str, jax.Array]]]
# (params, rows, keys[C]) -> ((scaled loss, raw loss), grads); C = cells in `rows`.
ValueAndGrad = Callable[[Params, Batch, jax.Array], tuple[tuple[jax.Array, jax.Array], Params]]


def cell_rows(batch: Batch, microsteps: int) -> Batch:
  """[B_r, ...] -> [microsteps, B_r / microsteps, ...]; microbatch m holds rows m, m+M, m+2M, ...

  Rows stay on the device that holds them (the sharded row axis stays major).
  """
  def cut(x):
    return x.reshape(x.shape[0] // microsteps, microsteps, *x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(cut, batch)


def objective_grads(model_cfg: model_lib.ModelConfig, *, ar_loss_scale: float, z_loss: float
                    ) -> tuple[ValueAndGrad, ValueAndGrad]:
  """(AR, MDM) value-and-grad functions of (params, rows, keys[C]) for C cells of rows."""
  def ar(params, rows, keys_C):  # the keys only give the number of cells
    loss, _ = objectives.ar_loss(params, rows, cfg=model_cfg, z_loss=z_loss,
                                 num_cells=keys_C.shape[0])
    return ar_loss_scale * loss, loss

  def mdm(params, rows, keys_C):
    loss, _ = objectives.mdm_loss(params, rows, keys_C, cfg=model_cfg, z_loss=z_loss)
    return loss, loss

  return jax.value_and_grad(ar, has_aux=True), jax.value_and_grad(mdm, has_aux=True)


def accumulate(params: Params, micro: Batch, cell_keys: Callable[[jax.Array], jax.Array],
               is_ar: Callable[[Any], Any], ar_vg: ValueAndGrad, mdm_vg: ValueAndGrad,
               cells_per_call: int) -> tuple[Params, jax.Array, jax.Array]:
  """Scans the microsteps of `micro`; returns (mean gradient, sum of AR / MDM cell losses).

  `is_ar(m)` is a Python bool (static: no conditional in the program) or a traced bool.
  """
  microsteps = jax.tree.leaves(micro)[0].shape[0]

  def one(acc, inp):
    grads_acc, ar_sum, mdm_sum = acc
    m, rows = inp
    keys = cell_keys(m)
    flag = is_ar(m)
    if isinstance(flag, bool):
      (_, raw), grads = (ar_vg if flag else mdm_vg)(params, rows, keys)
    else:
      (_, raw), grads = lax.cond(flag, ar_vg, mdm_vg, params, rows, keys)
    grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
    raw = raw * cells_per_call  # the call's mean over its cells -> their sum
    return (grads_acc, ar_sum + jnp.where(flag, raw, 0.0),
            mdm_sum + jnp.where(flag, 0.0, raw)), None

  init = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32),
          jnp.zeros((), jnp.float32))
  (grads, ar_sum, mdm_sum), _ = lax.scan(one, init, (jnp.arange(microsteps), micro))
  return jax.tree.map(lambda g: g / microsteps, grads), ar_sum, mdm_sum


def _metrics(split: ObjectiveSplit, ar_sum: jax.Array, mdm_sum: jax.Array,
             ar_loss_scale: float) -> dict[str, jax.Array]:
  ar_loss = ar_sum / max(split.n_ar, 1)
  mdm_loss = mdm_sum / max(split.n_mdm, 1)
  metrics = {"loss": (split.n_ar * ar_loss_scale * ar_loss + split.n_mdm * mdm_loss) / split.cells}
  if split.n_ar:
    metrics["ar_loss"] = ar_loss
  if split.n_mdm:
    metrics["mdm_loss"] = mdm_loss
  return metrics


def _check_mesh(split: ObjectiveSplit, mesh: Mesh) -> None:
  if mesh.shape["replica"] != split.replicas:
    raise ValueError(f"split has {split.replicas} replicas but the mesh's replica axis is "
                     f"{mesh.shape['replica']}")


def time_split_grad_fn(model_cfg: model_lib.ModelConfig, split: ObjectiveSplit, mesh: Mesh, *,
                       ar_loss_scale: float, z_loss: float,
                       rules: sharding.Rules = sharding.DEFAULT_RULES) -> GradFn:
  """Whole single-objective microsteps: the first `split.ar_microsteps` are AR on every device.

  A plain SPMD program on any mesh (fsdp, tensor); lam in {0, 1} has no conditional.
  """
  _check_mesh(split, mesh)
  if split.program != "time":
    raise ValueError(f"the time split needs n_ar ({split.n_ar}) divisible by the replicas "
                     f"({split.replicas})")
  R = split.replicas
  ar_vg, mdm_vg = objective_grads(model_cfg, ar_loss_scale=ar_loss_scale, z_loss=z_loss)

  def is_ar(m):
    if split.n_ar in (0, split.cells):
      return split.n_ar == split.cells
    return m < split.ar_microsteps

  def grad_fn(params, batch, key):
    def cell_keys(m):
      return jax.vmap(lambda c: jax.random.fold_in(key, c))(m * R + jnp.arange(R))
    with sharding.activation_rules(mesh, rules):
      grads, ar_sum, mdm_sum = accumulate(params, cell_rows(batch, split.microsteps), cell_keys,
                                          is_ar, ar_vg, mdm_vg, R)
    return grads, _metrics(split, ar_sum, mdm_sum, ar_loss_scale)
  return grad_fn


def device_split_grad_fn(model_cfg: model_lib.ModelConfig, split: ObjectiveSplit, mesh: Mesh, *,
                         ar_loss_scale: float, z_loss: float,
                         rules: sharding.Rules = sharding.DEFAULT_RULES) -> GradFn:
  """Replicas branch per cell (AR sub-mesh / MDM sub-mesh) inside a shard_map over 'replica'.

  fsdp stays automatic inside; one pmean of the gradients. Needs mesh tensor = 1 (XLA cannot
  partition tensor-parallel collectives inside replica-dependent branches, jax 0.10).
  """
  _check_mesh(split, mesh)
  if mesh.shape["tensor"] > 1:
    raise ValueError("replicas running different objectives in one microstep need mesh tensor = 1 "
                     "(XLA cannot partition it); use a split with n_ar divisible by replicas "
                     "(make_split(..., whole_microsteps=True))")
  R = split.replicas
  ar_vg, mdm_vg = objective_grads(model_cfg, ar_loss_scale=ar_loss_scale, z_loss=z_loss)
  inner_rules = sharding.without_axes(rules, ("replica",))

  def body(params, batch, key):
    replica = lax.axis_index("replica")

    def cell_keys(m):
      return jax.random.fold_in(key, m * R + replica)[None]

    def is_ar(m):
      return m * R + replica < split.n_ar
    with sharding.activation_rules(None, inner_rules):
      grads, ar_sum, mdm_sum = accumulate(params, cell_rows(batch, split.microsteps), cell_keys,
                                          is_ar, ar_vg, mdm_vg, 1)
    grads = lax.pmean(grads, "replica")
    ar_sum, mdm_sum = lax.psum((ar_sum, mdm_sum), "replica")
    return grads, _metrics(split, ar_sum, mdm_sum, ar_loss_scale)

  return jax.shard_map(body, mesh=mesh, in_specs=(P(), P("replica"), P()),
                       out_specs=(P(), P()), axis_names={"replica"}, check_vma=False)


def make_grad_fn(model_cfg: model_lib.ModelConfig, split: ObjectiveSplit, mesh: Mesh, *,
                 ar_loss_scale: float, z_loss: float,
                 rules: sharding.Rules = sharding.DEFAULT_RULES) -> GradFn:
  """`grad_fn(params, batch, key) -> (grads, metrics)` for one optimizer step (`split.program`)."""
  make = time_split_grad_fn if split.program == "time" else device_split_grad_fn
  return make(model_cfg, split, mesh, ar_loss_scale=ar_loss_scale, z_loss=z_loss, rules=rules)


def make_train_step(model_cfg: model_lib.ModelConfig, split: ObjectiveSplit, mesh: Mesh,
                    optimizer: optax.GradientTransformation, *, ar_loss_scale: float,
                    z_loss: float, rules: sharding.Rules = sharding.DEFAULT_RULES
                    ) -> Callable[[dict[str, Any], Batch], tuple[dict[str, Any], dict]]:
  """`train_step(state, batch) -> (state, metrics)`; state = {params, opt_state, step, rng}.

  The step's noise key is `fold_in(rng, step)`, so a resumed run draws the same noise.
  """
  grad_fn = make_grad_fn(model_cfg, split, mesh, ar_loss_scale=ar_loss_scale, z_loss=z_loss,
                         rules=rules)

  def train_step(state, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    grads, metrics = grad_fn(state["params"], batch, key)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["param_norm"] = optax.tree.norm(params)
    return dict(state, params=params, opt_state=opt_state, step=state["step"] + 1), metrics

  return train_step


def make_eval_fn(model_cfg: model_lib.ModelConfig, *, z_loss: float = 0.0, span_mask: bool = False,
                 mesh: Mesh | None = None, rules: sharding.Rules = sharding.DEFAULT_RULES
                 ) -> Callable[[Params, Batch, jax.Array], dict[str, jax.Array]]:
  """Held-out losses of both objectives on one batch (MDM with the training noise process).

  `span_mask` adds the authors' validation loss (BERT-style 10% span masking) as 'span_loss'.
  """
  def eval_fn(params, batch, key):
    k_mdm, k_span = jax.random.split(key)
    with sharding.activation_rules(mesh, rules):
      ar, _ = objectives.ar_loss(params, batch, cfg=model_cfg, z_loss=z_loss)
      mdm, _ = objectives.mdm_loss(params, batch, k_mdm, cfg=model_cfg, z_loss=z_loss)
      out = {"ar_loss": ar, "mdm_loss": mdm}
      if span_mask:
        out["span_loss"], _ = objectives.span_mask_loss(params, batch, k_span, cfg=model_cfg)
    return out
  return eval_fn

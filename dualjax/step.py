"""The dual training step: one jitted SPMD program, objectives split over mesh cells (DESIGN.md §4).

The global batch is cut into cells = replicas x microsteps (`dualjax.mesh.Split`); each cell runs
the AR or the MDM objective with its own noise key fold_in(step_key, cell). Gradients are the
mean over cells, so the step's loss is

  lam * ar_loss_scale * mean_{AR cells} L_AR + (1 - lam) * mean_{MDM cells} L_MDM,

i.e. the dual loss with L_AR and L_MDM averaged over their own cells, as in the authors' DDP code.
Two programs compute exactly these cells (see `make_grad_fn`): whole single-objective microsteps
as plain SPMD, or the paper's device split inside a partial-manual `shard_map` over 'replica'
with `lax.cond` on the cell index. lam in {0, 1} compiles without any conditional.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from dualjax import model as model_lib
from dualjax import objectives
from dualjax.mesh import Split

Params = Any
Batch = dict[str, jax.Array]


def cell_rows(batch: Batch, microsteps: int) -> Batch:
  """[B_r, ...] -> [microsteps, B_r / microsteps, ...]; microbatch m holds rows m, m+M, m+2M, ...

  Rows stay on the device that holds them (the sharded row axis stays major).
  """
  def cut(x):
    return x.reshape(x.shape[0] // microsteps, microsteps, *x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(cut, batch)


def make_grad_fn(model_cfg: model_lib.ModelConfig, split: Split, mesh: Mesh, *,
                 ar_loss_scale: float, z_loss: float
                 ) -> Callable[[Params, Batch, jax.Array], tuple[Params, dict[str, jax.Array]]]:
  """Returns `grad_fn(params, batch, key) -> (grads, metrics)` for one optimizer step.

  Two programs compute the same cells (rows, noise keys, per-cell losses):
    whole microsteps (n_ar divisible by replicas, e.g. lam in {0, 1}): every microstep is one
      objective for all devices; a plain SPMD program, any mesh (fsdp, tensor);
    device split (otherwise): replicas run different objectives in the same microstep inside a
      partial-manual shard_map over 'replica' (the paper's sub-meshes); tensor = 1 (see plan()).
  """
  R, M, n_ar = split.replicas, split.microsteps, split.n_ar
  if mesh.shape["replica"] != R:
    raise ValueError(f"split has {R} replicas but the mesh's replica axis is {mesh.shape['replica']}")
  n_mdm = split.cells - n_ar

  def ar(params, rows, keys_R):  # keys only give the number of cells in `rows`
    loss, _ = objectives.ar_loss(params, rows, cfg=model_cfg, z_loss=z_loss,
                                 num_cells=keys_R.shape[0])
    return ar_loss_scale * loss, loss

  def mdm(params, rows, keys_R):
    loss, _ = objectives.mdm_loss(params, rows, keys_R, cfg=model_cfg, z_loss=z_loss)
    return loss, loss

  ar_vg = jax.value_and_grad(ar, has_aux=True)
  mdm_vg = jax.value_and_grad(mdm, has_aux=True)

  def accumulate(params, micro, cell_keys, is_ar, cells_per_call):
    """Scans microsteps; `is_ar(m)` is a Python bool (static: no conditional) or a traced one."""
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
    (grads, ar_sum, mdm_sum), _ = lax.scan(one, init, (jnp.arange(M), micro))
    return jax.tree.map(lambda g: g / M, grads), ar_sum, mdm_sum

  def metrics_of(ar_sum, mdm_sum):
    ar_loss = ar_sum / max(n_ar, 1)
    mdm_loss = mdm_sum / max(n_mdm, 1)
    metrics = {"loss": (n_ar * ar_loss_scale * ar_loss + n_mdm * mdm_loss) / split.cells}
    if n_ar:
      metrics["ar_loss"] = ar_loss
    if n_mdm:
      metrics["mdm_loss"] = mdm_loss
    return metrics

  if n_ar % R == 0:
    def is_ar_microstep(m):
      return True if n_ar == split.cells else False if n_ar == 0 else m < n_ar // R

    def whole(params, batch, key):
      def cell_keys(m):
        return jax.vmap(lambda c: jax.random.fold_in(key, c))(m * R + jnp.arange(R))
      grads, ar_sum, mdm_sum = accumulate(params, cell_rows(batch, M), cell_keys,
                                          is_ar_microstep, R)
      return grads, metrics_of(ar_sum, mdm_sum)
    return whole

  if mesh.shape["tensor"] > 1:
    raise ValueError("replicas running different objectives in one microstep need mesh tensor = 1 "
                     "(XLA cannot partition it); use a split with n_ar divisible by replicas "
                     "(make_split(..., whole_microsteps=True))")

  def body(params, batch, key):
    replica = lax.axis_index("replica")

    def cell_keys(m):
      return jax.random.fold_in(key, m * R + replica)[None]

    def is_ar_cell(m):
      return m * R + replica < n_ar
    grads, ar_sum, mdm_sum = accumulate(params, cell_rows(batch, M), cell_keys, is_ar_cell, 1)
    grads = lax.pmean(grads, "replica")
    ar_sum, mdm_sum = lax.psum((ar_sum, mdm_sum), "replica")
    return grads, metrics_of(ar_sum, mdm_sum)

  return jax.shard_map(body, mesh=mesh, in_specs=(P(), P("replica"), P()),
                       out_specs=(P(), P()), axis_names={"replica"}, check_vma=False)


def make_train_step(model_cfg: model_lib.ModelConfig, split: Split, mesh: Mesh,
                    optimizer: optax.GradientTransformation, *, ar_loss_scale: float,
                    z_loss: float) -> Callable[[dict[str, Any], Batch], tuple[dict[str, Any], dict]]:
  """`train_step(state, batch) -> (state, metrics)`; state = {params, opt_state, step, rng}.

  The step's noise key is `fold_in(rng, step)`, so a resumed run draws the same noise.
  """
  grad_fn = make_grad_fn(model_cfg, split, mesh, ar_loss_scale=ar_loss_scale, z_loss=z_loss)

  def train_step(state, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    grads, metrics = grad_fn(state["params"], batch, key)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["param_norm"] = optax.tree.norm(params)
    return dict(state, params=params, opt_state=opt_state, step=state["step"] + 1), metrics

  return train_step


def make_eval_fn(model_cfg: model_lib.ModelConfig, *, z_loss: float = 0.0, span_mask: bool = False
                 ) -> Callable[[Params, Batch, jax.Array], dict[str, jax.Array]]:
  """Held-out losses of both objectives on one batch (MDM with the training noise process).

  `span_mask` adds the authors' validation loss (BERT-style 10% span masking) as 'span_loss'.
  """
  def eval_fn(params, batch, key):
    k_mdm, k_span = jax.random.split(key)
    ar, _ = objectives.ar_loss(params, batch, cfg=model_cfg, z_loss=z_loss)
    mdm, _ = objectives.mdm_loss(params, batch, k_mdm, cfg=model_cfg, z_loss=z_loss)
    out = {"ar_loss": ar, "mdm_loss": mdm}
    if span_mask:
      out["span_loss"], _ = objectives.span_mask_loss(params, batch, k_span, cfg=model_cfg)
    return out
  return eval_fn

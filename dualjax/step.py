"""The dual training step: one jitted SPMD program, objectives split over mesh cells (DESIGN.md §4).

Inside a partial-manual `shard_map` over 'replica' every replica takes its rows of the global
batch, cuts them into `microsteps` microbatches and, for each (microstep, replica) cell, runs the
AR or the MDM objective (chosen with `lax.cond` on the cell index, or statically when lam is 0 or
1). Gradients are averaged over microsteps, then over replicas with one `pmean`; 'fsdp' and
'tensor' stay automatic axes, so parameters keep their sharding inside the body. The mean over
cells of the per-cell losses is

  lam * ar_loss_scale * mean_{AR cells} L_AR + (1 - lam) * mean_{MDM cells} L_MDM,

i.e. the dual loss with L_AR and L_MDM averaged over their own cells, as in the authors' DDP code.
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
  """Returns `grad_fn(params, batch, key) -> (grads, metrics)` for one optimizer step."""
  R, M, n_ar = split.replicas, split.microsteps, split.n_ar
  if mesh.shape["replica"] != R:
    raise ValueError(f"split has {R} replicas but the mesh's replica axis is {mesh.shape['replica']}")

  def ar(params, rows, key):
    del key
    loss, _ = objectives.ar_loss(params, rows, cfg=model_cfg, z_loss=z_loss)
    return ar_loss_scale * loss, loss

  def mdm(params, rows, key):
    loss, _ = objectives.mdm_loss(params, rows, key, cfg=model_cfg, z_loss=z_loss)
    return loss, loss

  ar_vg = jax.value_and_grad(ar, has_aux=True)
  mdm_vg = jax.value_and_grad(mdm, has_aux=True)

  def body(params, batch, key):
    replica = lax.axis_index("replica")
    micro = cell_rows(batch, M)

    def one_cell(acc, inp):
      grads_acc, ar_sum, mdm_sum = acc
      m, rows = inp
      cell = m * R + replica
      cell_key = jax.random.fold_in(key, cell)
      if n_ar == split.cells:
        (_, raw), grads = ar_vg(params, rows, cell_key)
      elif n_ar == 0:
        (_, raw), grads = mdm_vg(params, rows, cell_key)
      else:
        (_, raw), grads = lax.cond(cell < n_ar, ar_vg, mdm_vg, params, rows, cell_key)
      is_ar = cell < n_ar
      grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
      return (grads_acc, ar_sum + jnp.where(is_ar, raw, 0.0),
              mdm_sum + jnp.where(is_ar, 0.0, raw)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    (grads, ar_sum, mdm_sum), _ = lax.scan(one_cell, init, (jnp.arange(M), micro))
    grads = jax.tree.map(lambda g: g / M, grads)
    grads = lax.pmean(grads, "replica")
    ar_sum, mdm_sum = lax.psum((ar_sum, mdm_sum), "replica")
    n_mdm = split.cells - n_ar
    ar_loss = ar_sum / max(n_ar, 1)
    mdm_loss = mdm_sum / max(n_mdm, 1)
    loss = (n_ar * ar_loss_scale * ar_loss + n_mdm * mdm_loss) / split.cells
    metrics = {"loss": loss}
    if n_ar:
      metrics["ar_loss"] = ar_loss
    if n_mdm:
      metrics["mdm_loss"] = mdm_loss
    return grads, metrics

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

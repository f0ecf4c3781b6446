"""The dual training step: one jitted SPMD program, objectives split over mesh cells (DESIGN.md §4).

The global batch is cut into cells = replicas x microsteps (`dualjax.split.ObjectiveSplit`); each
cell runs the AR or the MDM objective with its own noise key fold_in(step_key, cell). Gradients
are the mean over cells, so the step's loss is

  lam * ar_loss_scale * mean_{AR cells} L_AR + (1 - lam) * mean_{MDM cells} L_MDM,

i.e. the dual loss with L_AR and L_MDM averaged over their own cells, as in the authors' DDP code.

Each replica accumulates the gradient of its own cells over the microsteps, and the gradients are
reduced over replicas ONCE per optimizer step (`make_grad_fn` has the three programs). The
microsteps are cut into static runs by objective (`accumulate`): the AR microsteps, at most one
mixed microstep where an AR sub-mesh of replicas runs AR and the rest MDM (the device split: a
`lax.cond` on the replica index), and the MDM microsteps. The time split (whole single-objective
microsteps) and lam in {0, 1} have no conditional at all.
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


Acc = tuple[Params, jax.Array, jax.Array]  # (gradient sum, AR loss sum, MDM loss sum)
# (params, rows of one microstep, microstep index) -> (sum of the cells' raw losses, gradient)
Call = Callable[[Params, Batch, jax.Array], tuple[jax.Array, Params]]


def _run(acc: Acc, call: Call, is_ar: bool, params: Params, micro: Batch, first: int,
         count: int) -> Acc:
  """Adds microsteps first .. first+count-1 of one objective (a scan; static, no conditional)."""
  if count == 0:
    return acc
  rows = jax.tree.map(lambda x: x[first:first + count], micro)

  def one(acc, inp):
    grads_acc, ar_sum, mdm_sum = acc
    m, r = inp
    raw, grads = call(params, r, m)
    grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
    return ((grads_acc, ar_sum + raw, mdm_sum) if is_ar else (grads_acc, ar_sum, mdm_sum + raw)), None

  acc, _ = lax.scan(one, acc, (first + jnp.arange(count), rows))
  return acc


def accumulate(params: Params, micro: Batch, split: ObjectiveSplit, ar: Call, mdm: Call,
               zeros: Params, mixed: Callable[[Params, Batch, jax.Array], tuple[jax.Array,
                                                                             jax.Array, Params]]
               | None = None) -> Acc:
  """Sums gradients and cell losses over the microsteps `micro` [M, ...]: the AR microsteps, the
  mixed one (device split: `mixed` returns (AR loss sum, MDM loss sum, grads)), the MDM ones."""
  M, A = split.microsteps, split.ar_microsteps
  acc = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
  acc = _run(acc, ar, True, params, micro, 0, A)
  start = A
  if split.program == "device":
    a, b, grads = mixed(params, jax.tree.map(lambda x: x[A], micro), jnp.asarray(A))
    acc = (jax.tree.map(jnp.add, acc[0], grads), acc[1] + a, acc[2] + b)
    start += 1
  return _run(acc, mdm, False, params, micro, start, M - start)


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


def _single_cell(vg: ValueAndGrad, key_of: Callable[[jax.Array], jax.Array]) -> Call:
  def call(params, rows, m):
    (_, raw), grads = vg(params, rows, key_of(m)[None])
    return raw, grads
  return call


def make_grad_fn(model_cfg: model_lib.ModelConfig, split: ObjectiveSplit, mesh: Mesh, *,
                 ar_loss_scale: float, z_loss: float,
                 rules: sharding.Rules = sharding.DEFAULT_RULES) -> GradFn:
  """`grad_fn(params, batch, key) -> (grads, metrics)` for one optimizer step (module docstring).

  Three programs, each with ONE reduction of the gradients over replicas per step:
    one replica: plain SPMD;
    time split, R > 1: the replicas' cells side by side, `vmap` over a leading replica axis
      (spmd_axis_name='replica'), so each replica's gradient is accumulated locally and summed
      once at the end; any mesh (fsdp, tensor);
    device split: a partial-manual `shard_map` over 'replica' with the mixed microstep's
      `lax.cond`, one `pmean`; needs mesh tensor = 1 (XLA cannot partition tensor-parallel
      collectives inside a partial-manual region, jax 0.10).
  """
  R, M = split.replicas, split.microsteps
  if mesh.shape["replica"] != R:
    raise ValueError(f"split has {R} replicas but the mesh's replica axis is "
                     f"{mesh.shape['replica']}")
  if split.program == "device" and mesh.shape["tensor"] > 1:
    raise ValueError("replicas running different objectives in one microstep need mesh tensor = 1 "
                     "(XLA cannot partition it); use a split with n_ar divisible by replicas "
                     "(make_split(..., whole_microsteps=True))")
  ar_vg, mdm_vg = objective_grads(model_cfg, ar_loss_scale=ar_loss_scale, z_loss=z_loss)

  def finish(grads, ar_sum, mdm_sum):
    return jax.tree.map(lambda g: g / M, grads), _metrics(split, ar_sum, mdm_sum, ar_loss_scale)

  if R == 1:
    def plain(params, batch, key):
      key_of = lambda m: jax.random.fold_in(key, m)
      with sharding.activation_rules(mesh, rules):
        acc = accumulate(params, cell_rows(batch, M), split, _single_cell(ar_vg, key_of),
                         _single_cell(mdm_vg, key_of), jax.tree.map(jnp.zeros_like, params))
      return finish(*acc)
    return plain

  inner_rules = sharding.without_axes(rules, ("replica",))
  if split.program == "time":
    def replicas(vg: ValueAndGrad, key: jax.Array) -> Call:
      one = jax.vmap(lambda p, rows, k: vg(p, rows, k[None]), in_axes=(None, 0, 0),
                     spmd_axis_name="replica")

      def call(params, rows_R, m):
        keys = jax.vmap(lambda r: jax.random.fold_in(key, m * R + r))(jnp.arange(R))
        (_, raw_R), grads_R = one(params, rows_R, keys)
        return raw_R.sum(), grads_R
      return call

    def time_split(params, batch, key):
      per_replica = jax.tree.map(lambda x: x.reshape(R, x.shape[0] // R, *x.shape[1:]), batch)
      micro = jax.tree.map(lambda x: x.swapaxes(0, 1), jax.vmap(
          lambda b: cell_rows(b, M))(per_replica))  # [M, R, rows, ...]
      zeros = jax.tree.map(lambda p: jnp.zeros((R,) + p.shape, p.dtype), params)
      with sharding.activation_rules(mesh, inner_rules, vmapped_axes=("replica",)):
        grads_R, ar_sum, mdm_sum = accumulate(params, micro, split, replicas(ar_vg, key),
                                              replicas(mdm_vg, key), zeros)
      return finish(jax.tree.map(lambda g: g.sum(0) / R, grads_R), ar_sum, mdm_sum)
    return time_split

  n_ar_mixed = split.n_ar % R  # replicas that run AR in the mixed microstep

  def body(params, batch, key):
    replica = lax.axis_index("replica")
    key_of = lambda m: jax.random.fold_in(key, m * R + replica)

    def mixed(params, rows, m):
      flag = replica < n_ar_mixed
      (_, raw), grads = lax.cond(flag, ar_vg, mdm_vg, params, rows, key_of(m)[None])
      return jnp.where(flag, raw, 0.0), jnp.where(flag, 0.0, raw), grads

    with sharding.activation_rules(None, inner_rules):
      grads, ar_sum, mdm_sum = accumulate(
          params, cell_rows(batch, M), split, _single_cell(ar_vg, key_of),
          _single_cell(mdm_vg, key_of), jax.tree.map(jnp.zeros_like, params), mixed)
    grads = lax.pmean(grads, "replica")  # the one reduction
    ar_sum, mdm_sum = lax.psum((ar_sum, mdm_sum), "replica")
    return finish(grads, ar_sum, mdm_sum)

  return jax.shard_map(body, mesh=mesh, in_specs=(P(), P("replica"), P()),
                       out_specs=(P(), P()), axis_names={"replica"}, check_vma=False)


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

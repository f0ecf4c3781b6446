"""The dual training step: one jitted SPMD program, objectives split over mesh cells (DESIGN.md §4).

Which rows are AR or MDM, and their noise, depend only on (seed, step, global row index), never on
the mesh or the microsteps (so a run resumed on another device count follows the same
trajectory up to float summation order): the first lam * B rows of the global batch are AR, the
rest MDM, and an MDM row's noise comes from fold_in(step_key, global row). The step's loss is

  lam * ar_loss_scale * L_AR + (1 - lam) * L_MDM,
  L_AR  = sum of CE (+ z-loss) over the AR rows' scorable targets / their number (a token mean),
  L_MDM = sum of 1/p-weighted CE (+ z-loss) over the MDM rows / (MDM rows x L).

The rows are arranged over cells = replicas x microsteps (`dualjax.split.ObjectiveSplit`): global
cell q = microstep * replicas + replica holds global rows [q c, (q + 1) c), c = B / cells, so the
first n_ar cells are AR. Each cell adds the gradient of its share of the loss; the sum over cells
is reduced over replicas ONCE per step (`make_grad_fn` has the three programs). The microsteps
run as static scans by objective (`accumulate`): the AR microsteps, at most one mixed microstep
where an AR sub-mesh of replicas runs AR and the rest MDM (the device split: a `lax.cond` on the
replica index), and the MDM microsteps; the time split and lam in {0, 1} have no conditional.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from dualjax import mesh as mesh_lib
from dualjax import model as model_lib
from dualjax import objectives
from dualjax import sharding
from dualjax.split import ObjectiveSplit

Params = Any
Batch = dict[str, jax.Array]
GradFn = Callable[[Params, Batch, jax.Array], tuple[Params, dict[str, jax.Array]]]
# (params, rows of one cell with their global 'rows' ids, step key, normalizer)
#   -> ((weighted loss, raw loss), grads)
ValueAndGrad = Callable[[Params, Batch, jax.Array, jax.Array],
                        tuple[tuple[jax.Array, jax.Array], Params]]


def cell_rows(batch: Batch, microsteps: int) -> Batch:
  """[B_r, ...] -> [microsteps, B_r / microsteps, ...]; microbatch m holds rows m, m+M, m+2M, ...

  Rows stay on the device that holds them (the sharded row axis stays major).
  """
  def cut(x):
    return x.reshape(x.shape[0] // microsteps, microsteps, *x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(cut, batch)


def arrangement(split: ObjectiveSplit, global_batch: int) -> np.ndarray:
  """perm[p] = the global row at position p of the arranged batch: replica r's rows (positions
  r B/R ...) are its cells' rows, local row i in microstep i mod M (`cell_rows`), global cell
  q = m R + r holding global rows [q c, (q + 1) c)."""
  R, M = split.replicas, split.microsteps
  c = global_batch // split.cells
  p = np.arange(global_batch)
  r, i = p // (M * c), p % (M * c)
  m, j = i % M, i // M
  return ((m * R + r) * c + j).astype(np.int32)


def objective_grads(model_cfg: model_lib.ModelConfig, split: ObjectiveSplit, *,
                    ar_loss_scale: float, z_loss: float) -> tuple[ValueAndGrad, ValueAndGrad]:
  """(AR, MDM) value-and-grad of a cell's share of the step's loss (module docstring)."""
  lam = split.lam

  def ar(params, rows, key, normalizer):
    del key
    loss, _ = objectives.ar_loss(params, rows, cfg=model_cfg, z_loss=z_loss,
                                 normalizer=normalizer)
    return lam * ar_loss_scale * loss, loss

  def mdm(params, rows, key, normalizer):
    keys = jax.vmap(lambda g: jax.random.fold_in(key, g))(rows["rows"])  # one per global row
    loss, _ = objectives.mdm_loss(params, rows, keys, cfg=model_cfg, z_loss=z_loss,
                                  normalizer=normalizer)
    return (1.0 - lam) * loss, loss

  return jax.value_and_grad(ar, has_aux=True), jax.value_and_grad(mdm, has_aux=True)


Acc = tuple[Params, jax.Array, jax.Array]  # (gradient sum, AR loss sum, MDM loss sum)
# (params, rows of one microstep) -> (raw loss of the rows, gradient)
Call = Callable[[Params, Batch], tuple[jax.Array, Params]]


def _run(acc: Acc, call: Call, is_ar: bool, params: Params, micro: Batch, first: int,
         count: int) -> Acc:
  """Adds microsteps first .. first+count-1 of one objective (a scan; static, no conditional)."""
  if count == 0:
    return acc
  rows = jax.tree.map(lambda x: x[first:first + count], micro)

  def one(acc, r):
    grads_acc, ar_sum, mdm_sum = acc
    raw, grads = call(params, r)
    grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
    return ((grads_acc, ar_sum + raw, mdm_sum) if is_ar else (grads_acc, ar_sum, mdm_sum + raw)), None

  acc, _ = lax.scan(one, acc, rows)
  return acc


def accumulate(params: Params, micro: Batch, split: ObjectiveSplit, ar: Call, mdm: Call,
               zeros: Params, mixed: Callable[[Params, Batch], tuple[jax.Array, jax.Array,
                                                                    Params]] | None = None
               ) -> Acc:
  """Sums gradients and raw losses over the microsteps `micro` [M, ...]: the AR microsteps, the
  mixed one (device split: `mixed` returns (AR loss, MDM loss, grads)), the MDM ones."""
  M, A = split.microsteps, split.ar_microsteps
  acc = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
  acc = _run(acc, ar, True, params, micro, 0, A)
  start = A
  if split.program == "device":
    a, b, grads = mixed(params, jax.tree.map(lambda x: x[A], micro))
    acc = (jax.tree.map(jnp.add, acc[0], grads), acc[1] + a, acc[2] + b)
    start += 1
  return _run(acc, mdm, False, params, micro, start, M - start)


def _metrics(split: ObjectiveSplit, ar_loss: jax.Array, mdm_loss: jax.Array,
             ar_loss_scale: float) -> dict[str, jax.Array]:
  metrics = {"loss": split.lam * ar_loss_scale * ar_loss + (1.0 - split.lam) * mdm_loss}
  if split.n_ar:
    metrics["ar_loss"] = ar_loss
  if split.n_mdm:
    metrics["mdm_loss"] = mdm_loss
  return metrics


def reduce_replicas(grads_R: Params, mesh: Mesh, grad_shardings: Any = None) -> Params:
  """Sums per-replica gradients [R, ...] (leading axis over 'replica') once: an all-reduce, or,
  for a leaf whose entry of `grad_shardings` shards one dimension over the whole mesh (Muon's
  momentum, `optim.MuonShards`; a data-parallel mesh), a reduce-scatter into that sharding (on
  a TPU slice one per torus axis, `mesh.torus_mesh`)."""
  if grad_shardings is None:
    return jax.tree.map(lambda g: g.sum(0), grads_R)
  torus = mesh_lib.torus_mesh(mesh)  # the same devices; per-torus-axis scatters on a TPU slice
  axes = tuple(torus.axis_names)

  def one(g_R, sh):
    spec = tuple(sh.spec) if sh is not None else ()
    dims = [d for d, entry in enumerate(spec) if entry is not None]
    if not dims:
      return g_R.sum(0)
    out_spec = [None] * len(spec)
    out_spec[dims[0]] = axes
    scatter = jax.shard_map(lambda g: mesh_lib.scatter_sum(g[0], axes, dims[0]),
                            mesh=torus, in_specs=P(axes), out_specs=P(*out_spec),
                            check_vma=False)
    return scatter(g_R)
  return jax.tree.map(one, grads_R, grad_shardings, is_leaf=lambda x: x is None)


def make_grad_fn(model_cfg: model_lib.ModelConfig, split: ObjectiveSplit, mesh: Mesh, *,
                 ar_loss_scale: float, z_loss: float,
                 rules: sharding.Rules = sharding.DEFAULT_RULES,
                 grad_shardings: Any = None) -> GradFn:
  """`grad_fn(params, batch, key) -> (grads, metrics)` for one optimizer step (module docstring).

  The batch arrives in global row order; it is arranged over the cells (a permutation of rows,
  `arrangement`), and the AR token count is taken from it. Three programs, each with ONE
  reduction of the gradients over replicas per step:
    one replica: plain SPMD;
    time split, R > 1: the replicas' cells side by side, `vmap` over a leading replica axis
      (spmd_axis_name='replica'), each replica's gradient accumulated locally, summed once
      (`reduce_replicas`: reduce-scattered into `grad_shardings` where given); any mesh;
    device split: a partial-manual `shard_map` over 'replica' with the mixed microstep's
      `lax.cond`, one psum; needs mesh tensor = 1 (XLA cannot partition tensor-parallel
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
  ar_vg, mdm_vg = objective_grads(model_cfg, split, ar_loss_scale=ar_loss_scale, z_loss=z_loss)
  batch_sharding = mesh_lib.batch_sharding(mesh)

  def prepare(batch):
    """(arranged batch with global 'rows' ids, AR normalizer, MDM normalizer)."""
    B, L = batch["tokens"].shape[0], batch["tokens"].shape[1] - 1
    n_ar_rows = split.n_ar * (B // split.cells)
    _, _, _, scorable_BxL = objectives.split_batch(batch)
    ar_tokens = jnp.maximum(scorable_BxL[:n_ar_rows].astype(jnp.float32).sum(), 1.0)
    perm = arrangement(split, B)
    arranged = {k: jax.lax.with_sharding_constraint(jnp.take(v, perm, axis=0), batch_sharding)
                for k, v in batch.items()}
    arranged["rows"] = jax.lax.with_sharding_constraint(jnp.asarray(perm), batch_sharding)
    return arranged, ar_tokens, float(max(B - n_ar_rows, 1) * L)

  def call(vg, key, normalizer) -> Call:
    def fn(params, rows):
      (_, raw), grads = vg(params, rows, key, normalizer)
      return raw, grads
    return fn

  if R == 1:
    def plain(params, batch, key):
      with sharding.activation_rules(mesh, rules):
        batch, ar_norm, mdm_norm = prepare(batch)
        grads, a, b = accumulate(params, cell_rows(batch, M), split, call(ar_vg, key, ar_norm),
                                 call(mdm_vg, key, mdm_norm), jax.tree.map(jnp.zeros_like, params))
      return grads, _metrics(split, a, b, ar_loss_scale)
    return plain

  inner_rules = sharding.without_axes(rules, ("replica",))
  if split.program == "time":
    def replicas(vg: ValueAndGrad, key: jax.Array, normalizer: jax.Array) -> Call:
      one = jax.vmap(lambda p, rows: vg(p, rows, key, normalizer), in_axes=(None, 0),
                     spmd_axis_name="replica")

      def fn(params, rows_R):
        (_, raw_R), grads_R = one(params, rows_R)
        return raw_R.sum(), grads_R
      return fn

    def time_split(params, batch, key):
      with sharding.activation_rules(mesh, rules):
        batch, ar_norm, mdm_norm = prepare(batch)
      per_replica = jax.tree.map(lambda x: x.reshape(R, x.shape[0] // R, *x.shape[1:]), batch)
      micro = jax.tree.map(lambda x: x.swapaxes(0, 1), jax.vmap(
          lambda b: cell_rows(b, M))(per_replica))  # [M, R, rows, ...]
      zeros = jax.tree.map(lambda p: jnp.zeros((R,) + p.shape, p.dtype), params)
      with sharding.activation_rules(mesh, inner_rules, vmapped_axes=("replica",)):
        grads_R, a, b = accumulate(params, micro, split, replicas(ar_vg, key, ar_norm),
                                   replicas(mdm_vg, key, mdm_norm), zeros)
      return (reduce_replicas(grads_R, mesh, grad_shardings),
              _metrics(split, a, b, ar_loss_scale))
    return time_split

  n_ar_mixed = split.n_ar % R  # replicas that run AR in the mixed microstep

  def body(params, batch, key, ar_norm, mdm_norm):
    replica = lax.axis_index("replica")

    def mixed(params, rows):
      flag = replica < n_ar_mixed
      (_, raw), grads = lax.cond(flag, ar_vg, mdm_vg, params, rows, key,
                                 jnp.where(flag, ar_norm, mdm_norm))
      return jnp.where(flag, raw, 0.0), jnp.where(flag, 0.0, raw), grads

    with sharding.activation_rules(None, inner_rules):
      grads, a, b = accumulate(params, cell_rows(batch, M), split, call(ar_vg, key, ar_norm),
                               call(mdm_vg, key, mdm_norm), jax.tree.map(jnp.zeros_like, params),
                               mixed)
    a, b = lax.psum((a, b), "replica")
    # Each replica's gradient leaves the manual region unreduced (a leading replica axis), to be
    # summed once outside, where the partitioner can reduce-scatter it into a sharded
    # optimizer state (optim.MuonShards) instead of all-reducing it.
    return jax.tree.map(lambda g: g[None], grads), _metrics(split, a, b, ar_loss_scale)

  manual = jax.shard_map(body, mesh=mesh, in_specs=(P(), P("replica"), P(), P(), P()),
                         out_specs=(P("replica"), P()), axis_names={"replica"}, check_vma=False)

  def device_split(params, batch, key):
    with sharding.activation_rules(mesh, rules):
      batch, ar_norm, mdm_norm = prepare(batch)
    grads_R, metrics = manual(params, batch, key, ar_norm, jnp.asarray(mdm_norm, jnp.float32))
    return reduce_replicas(grads_R, mesh, grad_shardings), metrics  # the one reduction
  return device_split


def make_train_step(model_cfg: model_lib.ModelConfig, split: ObjectiveSplit, mesh: Mesh,
                    optimizer: optax.GradientTransformation, *, ar_loss_scale: float,
                    z_loss: float, rules: sharding.Rules = sharding.DEFAULT_RULES,
                    grad_shardings: Any = None
                    ) -> Callable[[dict[str, Any], Batch], tuple[dict[str, Any], dict]]:
  """`train_step(state, batch) -> (state, metrics)`; state = {params, opt_state, step, rng}.

  The step's noise key is `fold_in(rng, step)`, so a resumed run draws the same noise.
  `grad_shardings` (`state.StateSpec.grad_shardings`): where the summed gradients go sharded.
  """
  grad_fn = make_grad_fn(model_cfg, split, mesh, ar_loss_scale=ar_loss_scale, z_loss=z_loss,
                         rules=rules, grad_shardings=grad_shardings)

  def train_step(state, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    grads, metrics = grad_fn(state["params"], batch, key)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["param_norm"] = optax.tree.norm(params)
    return dict(state, params=params, opt_state=opt_state, step=state["step"] + 1), metrics

  return train_step

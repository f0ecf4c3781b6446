"""The dual step's gradient is lam * grad(L_AR) + (1 - lam) * grad(L_MDM) on the same rows and noise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualjax import hlo
from dualjax import mesh as mesh_lib
from dualjax import model as model_lib
from dualjax import objectives
from dualjax import optim
from dualjax import sharding
from dualjax import split as split_lib
from dualjax import step as step_lib

CFG = model_lib.ModelConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=2, head_dim=16,
                            mlp_dim=48, max_seq_len=32, compute_dtype="float32",
                            attention_impl="xla")
SCALE = 2.0


def _batch(rows: int, length: int = 17, seed: int = 0) -> dict[str, np.ndarray]:
  """Packed rows: documents of random length, each starting with <s> (id 1)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(16, CFG.vocab_size, size=(rows, length)).astype(np.int32)
  seg = np.zeros((rows, length), np.int32)
  for r in range(rows):
    pos, doc = int(rng.integers(0, 4)), 1
    seg[r, :pos] = 1
    while pos < length:
      n = int(rng.integers(3, 9))
      tokens[r, pos] = 1
      seg[r, pos:pos + n] = doc + 1
      pos, doc = pos + n, doc + 1
  return {"tokens": tokens, "segment_ids": seg}


def _reference_grads(params, batch, key, split: split_lib.ObjectiveSplit):
  """lam * scale * grad(L_AR) + (1 - lam) * grad(L_MDM), plain jax, from the definition: the
  first lam * B rows are AR (L_AR their token mean), the rest MDM (L_MDM their NELBO per
  position, row g's noise from fold_in(key, g))."""
  B = batch["tokens"].shape[0]
  n_ar_rows = split.n_ar * (B // split.cells)
  ar_rows = {k: v[:n_ar_rows] for k, v in batch.items()}
  mdm_rows = {k: v[n_ar_rows:] for k, v in batch.items()}
  keys = jax.vmap(lambda g: jax.random.fold_in(key, g))(jnp.arange(n_ar_rows, B))

  def l_ar(p):
    return objectives.ar_loss(p, ar_rows, cfg=CFG, z_loss=1e-4)[0]

  def l_mdm(p):
    return objectives.mdm_loss(p, mdm_rows, keys, cfg=CFG, z_loss=1e-4)[0]

  g_ar, g_mdm = jax.grad(l_ar)(params), jax.grad(l_mdm)(params)
  lam = split.lam
  return jax.tree.map(lambda a, b: lam * SCALE * a + (1 - lam) * b, g_ar, g_mdm), l_ar(params), l_mdm(params)


@pytest.mark.parametrize("mesh_shape,lam,rows,device_split", [
    ((1, 1, 1), 0.25, 8, False),   # one device: 4 microsteps, 1 AR
    ((4, 2, 1), 0.375, 16, True),  # replicas branch differently inside a microstep
    ((2, 2, 2), 0.5, 16, False),   # tensor parallel: whole microsteps, fsdp x tensor params
    ((1, 8, 1), 0.5, 16, False),   # pure FSDP
])
def test_dual_gradient_matches_separate_objectives(mesh_shape, lam, rows, device_split):
  n = int(np.prod(mesh_shape))
  mesh = mesh_lib.make_mesh(*mesh_shape, devices=jax.devices()[:n])
  split = split_lib.make_split(lam, rows, mesh.shape["replica"],
                              whole_microsteps=mesh.shape["tensor"] > 1)
  assert 0 < split.n_ar < split.cells
  assert (split.n_ar % split.replicas != 0) == device_split
  # Parameters and rows sharded as the trainer shards them.
  params = model_lib.init(CFG, jax.random.key(0))
  params = jax.device_put(params, sharding.param_shardings(model_lib.logical_axes(CFG), params, mesh))
  batch = _batch(rows)
  key = jax.random.key(7)
  grad_fn = jax.jit(step_lib.make_grad_fn(CFG, split, mesh, ar_loss_scale=SCALE, z_loss=1e-4))
  batch_j = mesh_lib.to_global(batch, mesh)
  grads, metrics = grad_fn(params, batch_j, key)
  want, l_ar, l_mdm = _reference_grads(params, batch, key, split)
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-7)
  np.testing.assert_allclose(metrics["ar_loss"], l_ar, rtol=1e-6)
  np.testing.assert_allclose(metrics["mdm_loss"], l_mdm, rtol=1e-6)
  np.testing.assert_allclose(metrics["loss"], lam * SCALE * l_ar + (1 - lam) * l_mdm, rtol=1e-6)
  # Only the device split's mixed microstep branches; the time split runs static scans.
  assert _has_conditional(grad_fn.lower(params, batch_j, key).as_text()) == device_split


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_single_objective_is_plain(lam):
  mesh = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  split = split_lib.make_split(lam, 4, 1)
  assert split.microsteps == 1
  params = model_lib.init(CFG, jax.random.key(0))
  batch = {k: jnp.asarray(v) for k, v in _batch(4).items()}
  key = jax.random.key(3)
  grad_fn = jax.jit(step_lib.make_grad_fn(CFG, split, mesh, ar_loss_scale=1.0, z_loss=1e-4))
  grads, metrics = grad_fn(params, batch, key)
  if lam == 1.0:
    f = lambda p: objectives.ar_loss(p, batch, cfg=CFG, z_loss=1e-4)[0]
  else:  # one key per global row
    keys = jax.vmap(lambda g: jax.random.fold_in(key, g))(jnp.arange(4))
    f = lambda p: objectives.mdm_loss(p, batch, keys, cfg=CFG, z_loss=1e-4)[0]
  want = jax.grad(f)(params)
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-7)
  assert ("mdm_loss" in metrics) == (lam == 0.0)
  # The compiled program has no conditional when one objective has all cells.
  hlo = grad_fn.lower(params, batch, key).as_text()
  assert not _has_conditional(hlo)


def _has_conditional(stablehlo: str) -> bool:
  return "stablehlo.case" in stablehlo or "stablehlo.if" in stablehlo


@pytest.mark.parametrize("mesh_shape,lam,microsteps,program", [
    ((8, 1, 1), 0.5, 4, "time"),     # 2 AR + 2 MDM microsteps on every replica
    ((4, 1, 1), 0.375, 0, "device"),  # an AR sub-mesh in the mixed microstep
])
def test_one_gradient_reduction_per_step(mesh_shape, lam, microsteps, program):
  """The compiled step all-reduces the gradients once (not once per microstep): the all-reduce
  payload is the parameters' size plus a few scalars, whatever the number of microsteps."""
  n = int(np.prod(mesh_shape))
  mesh = mesh_lib.make_mesh(*mesh_shape, devices=jax.devices()[:n])
  split = split_lib.make_split(lam, 64, mesh_shape[0], microsteps)
  assert split.program == program and split.microsteps > 1
  abstract = model_lib.abstract_params(CFG)
  sh = sharding.param_shardings(model_lib.logical_axes(CFG), abstract, mesh)
  params = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s), abstract, sh)
  rows = jax.ShapeDtypeStruct((64, 17), jnp.int32, sharding=mesh_lib.batch_sharding(mesh))
  fn = jax.jit(step_lib.make_grad_fn(CFG, split, mesh, ar_loss_scale=SCALE, z_loss=1e-4),
               out_shardings=(sh, None))
  text = fn.lower(params, {"tokens": rows, "segment_ids": rows}, jax.random.key(0)).compile().as_text()
  stats, ops = hlo.collective_stats(text, return_ops=True)
  param_bytes = sum(int(np.prod(p.shape)) * 4 for p in jax.tree.leaves(abstract))
  # Besides the reduction: arranging the rows over the cells moves token ids (tokens, segment
  # ids, row ids: at most 3 x 64 x 17 int32), nothing else.
  moved = sum(v["bytes"] for k, v in stats.items() if k != "all-reduce")
  assert moved <= 3 * 64 * 17 * 4, stats
  ops = [op for op in ops if op["kind"] == "all-reduce"]
  big = [op for op in ops if op["payload"] > 1024]
  assert len(big) >= 1 and all(op["times"] == 1 for op in big), big  # outside the microstep loop
  assert param_bytes <= stats["all-reduce"]["bytes"] <= 1.01 * param_bytes + 1024, (stats, param_bytes)


@pytest.mark.parametrize("mesh_shape,lam,microsteps,program", [
    ((8, 1, 1), 0.5, 2, "time"),
    ((4, 1, 1), 0.375, 0, "device"),
])
def test_muon_gradients_are_reduce_scattered(mesh_shape, lam, microsteps, program):
  """With `grad_shardings` (ZeRO-1 for Muon, `optim.MuonShards`), the summed gradient of each
  Muon matrix arrives reduce-scattered along its wide axis and the rest all-reduced, once per
  step; the gradients are the reference's."""
  n = int(np.prod(mesh_shape))
  mesh = mesh_lib.make_mesh(*mesh_shape, devices=jax.devices()[:n])
  split = split_lib.make_split(lam, 16, mesh_shape[0], microsteps)
  assert split.program == program
  shards = optim.MuonShards(mesh)
  labels = optim.param_labels(model_lib.logical_axes(CFG))
  params = model_lib.init(CFG, jax.random.key(0))
  grad_sh = jax.tree.map(lambda lab, p: shards.sharding(p.shape) if lab == "muon" else None,
                         labels, params)
  params = jax.device_put(params, sharding.param_shardings(model_lib.logical_axes(CFG), params,
                                                            mesh))
  batch, key = _batch(16), jax.random.key(3)
  fn = jax.jit(step_lib.make_grad_fn(CFG, split, mesh, ar_loss_scale=SCALE, z_loss=1e-4,
                                     grad_shardings=grad_sh))
  batch_j = mesh_lib.to_global(batch, mesh)
  grads, _ = fn(params, batch_j, key)
  want, _, _ = _reference_grads(params, batch, key, split)
  for g, w, lab in zip(jax.tree.leaves(grads), jax.tree.leaves(want), jax.tree.leaves(labels)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-7)
    if lab == "muon":
      assert g.addressable_shards[0].data.size * n == g.size, g.sharding
  stats, ops = hlo.collective_stats(fn.lower(params, batch_j, key).compile().as_text(),
                                    return_ops=True)
  muon_bytes = sum(4 * p.size for p, lab in zip(jax.tree.leaves(params), jax.tree.leaves(labels))
                   if lab == "muon")
  param_bytes = sum(4 * p.size for p in jax.tree.leaves(params))
  assert stats["reduce-scatter"]["bytes"] == muon_bytes, stats  # fp32 in, once
  assert param_bytes - muon_bytes <= stats["all-reduce"]["bytes"] <= param_bytes - muon_bytes + 1024
  assert all(op["times"] == 1 for op in ops if op["payload"] > 1024), ops

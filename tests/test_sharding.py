"""Parameter shardings from the model's declared logical axes and the config's rules."""

import jax
import optax
import pytest
from jax.sharding import PartitionSpec as P

from dualjax import mesh as mesh_lib
from dualjax import model as model_lib
from dualjax import sharding

CFG = model_lib.ModelConfig(vocab_size=64, num_layers=2, d_model=16, num_heads=2, head_dim=8,
                            mlp_dim=24, max_seq_len=16)


def _shardings(cfg, mesh, rules=sharding.DEFAULT_RULES):
  return sharding.param_shardings(model_lib.logical_axes(cfg), model_lib.abstract_params(cfg),
                                  mesh, rules)


def test_fsdp_and_tensor_rules():
  mesh = mesh_lib.make_mesh(2, 2, 2)
  sh = _shardings(CFG, mesh)
  assert sh["embed"].spec == P("tensor", "fsdp")
  assert sh["layers"]["attn"]["q"].spec == P(None, "fsdp", "tensor")
  assert sh["layers"]["attn"]["o"].spec == P(None, "tensor", "fsdp")
  assert sh["layers"]["mlp"]["down"].spec == P(None, "tensor", "fsdp")
  assert sh["layers"]["attn_norm"].spec == P(None, None)
  assert sh["head"]["out_bias"].spec == P("tensor")


def test_indivisible_dimension_stays_replicated():
  mesh = mesh_lib.make_mesh(1, 8, 1)
  cfg = model_lib.ModelConfig(vocab_size=64, num_layers=2, d_model=12, num_heads=2, head_dim=6,
                              mlp_dim=24, max_seq_len=16)
  assert _shardings(cfg, mesh)["layers"]["mlp"]["up"].spec == P(None, None, None)


def test_optimizer_state_follows_params():
  mesh = mesh_lib.make_mesh(4, 2, 1)
  axes, params = model_lib.logical_axes(CFG), model_lib.abstract_params(CFG)
  st = sharding.state_shardings(axes, params, optax.adamw(1e-3), mesh)
  mu = st["opt_state"][0].mu
  assert mu["embed"].spec == _shardings(CFG, mesh)["embed"].spec
  assert st["step"].spec == P()


def test_multi_axis_rules_and_manual_axes():
  mesh = mesh_lib.make_mesh(2, 4, 1)
  rules = sharding.DEFAULT_RULES
  assert sharding.spec_for((16, 8, 64), ("activation_batch", "activation_length",
                                         "activation_embed"), mesh, rules) == P(("replica", "fsdp"), None, None)
  inner = sharding.without_axes(rules, ("replica",))
  assert dict(inner)["activation_batch"] == "fsdp"
  # 4 rows: replica (2) divides them, replica x fsdp (8) does not: only replica is kept
  assert sharding.spec_for((4, 8), ("activation_batch", None), mesh, rules) == P("replica", None)
  with pytest.raises(ValueError, match="mesh axis 'data'"):
    sharding.spec_for((4,), ("embed",), mesh, [("embed", "data")])


def test_declared_axes_cover_every_parameter():
  axes = model_lib.logical_axes(CFG)
  params = model_lib.abstract_params(CFG)
  for a, p in zip(jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)),
                  jax.tree.leaves(params)):
    assert isinstance(a, tuple) and len(a) == p.ndim

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from dualjax import mesh as mesh_lib
from dualjax import sharding


def _params():
  f = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  return {"embed": f(64, 16),
          "layers": {"attn": {"q": f(2, 16, 16), "o": f(2, 16, 16)},
                     "mlp": {"up": f(2, 16, 24), "down": f(2, 24, 16)},
                     "attn_norm": f(2, 16)},
          "head": {"out": f(16, 64), "out_bias": f(64)}}


def test_fsdp_and_tensor_rules():
  mesh = mesh_lib.make_mesh(2, 2, 2)
  sh = sharding.param_shardings(_params(), mesh)
  assert sh["embed"].spec == P("tensor", "fsdp")
  assert sh["layers"]["attn"]["q"].spec == P(None, "fsdp", "tensor")
  assert sh["layers"]["attn"]["o"].spec == P(None, "tensor", "fsdp")
  assert sh["layers"]["mlp"]["down"].spec == P(None, "tensor", "fsdp")
  assert sh["layers"]["attn_norm"].spec == P(None, None)
  assert sh["head"]["out_bias"].spec == P("tensor")


def test_indivisible_dimension_stays_replicated():
  mesh = mesh_lib.make_mesh(1, 8, 1)
  params = {"up": jax.ShapeDtypeStruct((2, 12, 24), jnp.float32)}
  assert sharding.param_shardings(params, mesh)["up"].spec == P(None, None, None)


def test_optimizer_state_follows_params():
  mesh = mesh_lib.make_mesh(4, 2, 1)
  params = _params()
  st = sharding.state_shardings(params, optax.adamw(1e-3), mesh)
  mu = st["opt_state"][0].mu
  assert mu["embed"].spec == sharding.param_shardings(params, mesh)["embed"].spec
  assert st["step"].spec == P()

import logging

import grain
import jax
import jax.numpy as jnp
import numpy as np

from dualjax import checkpoint as ckpt_lib


def _state(v: float):
  return {"params": {"w": jnp.full((4, 3), v)}, "step": jnp.asarray(int(v), jnp.int32),
          "rng": jax.random.key_data(jax.random.key(int(v)))}


def _abstract():
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _state(0))


def _iterator():
  return iter(grain.MapDataset.range(1000).to_iter_dataset())


def test_roundtrip_with_grain_iterator(tmp_path):
  ck = ckpt_lib.Checkpointer(tmp_path, every=1, keep=3, async_save=True)
  it = _iterator()
  for _ in range(5):
    next(it)
  ck.save(5, _state(5), it.get_state(), {"note": "hi"})
  after = [next(it) for _ in range(3)]  # advancing after the (async) save must not leak into it
  ck.close()

  ck = ckpt_lib.Checkpointer(tmp_path, every=1, keep=3)
  it2 = _iterator()
  step, state, meta = ck.restore_latest(_abstract(), it2)
  assert step == 5 and meta == {"note": "hi"}
  np.testing.assert_array_equal(state["params"]["w"], np.full((4, 3), 5.0))
  assert [next(it2) for _ in range(3)] == after
  ck.close()


def test_corrupt_latest_falls_back(tmp_path, caplog):
  ck = ckpt_lib.Checkpointer(tmp_path, every=1, keep=3, async_save=False)
  it = _iterator()
  ck.save(1, _state(1), it.get_state(), {"s": 1})
  next(it)
  ck.save(2, _state(2), it.get_state(), {"s": 2})
  ck.close()
  # Damage step 2: drop its array data.
  for f in (tmp_path / "checkpoints" / "2" / "state").rglob("*"):
    if f.is_file() and "metadata" not in f.name:
      f.write_bytes(b"garbage")
  # A partially written (uncommitted) checkpoint is not a candidate at all.
  (tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-123").mkdir()
  ck = ckpt_lib.Checkpointer(tmp_path, every=1, keep=3)
  with caplog.at_level(logging.WARNING):
    step, state, meta = ck.restore_latest(_abstract(), _iterator())
  assert step == 1 and meta == {"s": 1}
  assert "step 2 is unreadable" in caplog.text
  assert any((tmp_path / "corrupt").iterdir())
  assert ck.latest_step() == 1
  ck.close()


def test_empty_workdir_restores_nothing(tmp_path):
  ck = ckpt_lib.Checkpointer(tmp_path, every=1, keep=1)
  assert ck.restore_latest(_abstract(), _iterator()) is None
  ck.close()

import io
import logging
import threading

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def _two_steps(tmp_path, meta=None):
  ck = ckpt_lib.Checkpointer(tmp_path, every=1, keep=3, async_save=False)
  it = _iterator()
  for s in (1, 2):
    ck.save(s, _state(s), it.get_state(), meta or {"s": s})
    next(it)
  ck.close()


def test_no_restorable_checkpoint_raises_and_moves_nothing(tmp_path):
  _two_steps(tmp_path)
  wrong = jax.tree.map(lambda a: jax.ShapeDtypeStruct((7,) + a.shape, a.dtype), _abstract())
  ck = ckpt_lib.Checkpointer(tmp_path, every=1, keep=3)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"no checkpoint in .* could be restored"):
    ck.restore_latest(wrong, _iterator())   # e.g. a systematic error, not corruption
  assert ck.manager.all_steps() == [1, 2] and not (tmp_path / "corrupt").exists()
  ck.close()


def test_checkpoint_of_another_process_count_is_refused(tmp_path):
  _two_steps(tmp_path, meta={"process_count": 2})
  ck = ckpt_lib.Checkpointer(tmp_path, every=1, keep=3)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"written by 2 processes; resume with 2"):
    ck.restore_latest(_abstract(), _iterator())
  assert ck.manager.all_steps() == [1, 2]
  ck.close()


def test_interval_without_an_initial_save(tmp_path):
  ck = ckpt_lib.Checkpointer(tmp_path, every=3, keep=5, async_save=False)
  it = _iterator()
  saved = [s for s in range(1, 8) if ck.save(s, _state(s), it.get_state(), {})]
  assert saved == [3, 6] and ck.save(7, _state(7), it.get_state(), {}, force=True)
  ck.close()


def test_checkpoints_restore_only_into_the_run_that_wrote_them(tmp_path):
  run_a = {"seed": 1, "train": {"steps": 10}}
  ck = ckpt_lib.Checkpointer(tmp_path, every=1, keep=3, async_save=False, identity=run_a)
  ck.save(1, _state(1), _iterator().get_state(), {"s": 1})
  ck.close()
  meta = ckpt_lib.step_meta(tmp_path / "checkpoints", 1)
  assert meta["identity"] == run_a and meta["s"] == 1
  ckpt_lib.check_identity(tmp_path / "checkpoints", run_a)  # plain reads: fine
  run_b = {"seed": 1, "train": {"steps": 20}}
  with pytest.raises(ckpt_lib.CheckpointError, match=r"belongs to another run \(train\.steps: 10 -> 20\)"):
    ckpt_lib.check_identity(tmp_path / "checkpoints", run_b)
  ck = ckpt_lib.Checkpointer(tmp_path, every=1, keep=3, identity=run_b)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"train\.steps: 10 -> 20"):
    ck.restore_latest(_abstract(), _iterator())
  ck.close()
  # A checkpoint without an identity (older dualjax, other tools) is refused too.
  _two_steps(tmp_path / "old")
  with pytest.raises(ckpt_lib.CheckpointError, match="records no run identity"):
    ckpt_lib.check_identity(tmp_path / "old" / "checkpoints", run_a)


def test_keep_every_saves_and_keeps_multiples(tmp_path):
  ck = ckpt_lib.Checkpointer(tmp_path, every=2, keep=1, async_save=False, keep_every=3)
  it = _iterator()
  saved = [s for s in range(1, 10) if ck.save(s, _state(s), it.get_state(), {})]
  assert saved == [2, 3, 4, 6, 8, 9]
  assert ck.manager.all_steps() == [3, 6, 9]
  ck.close()


def test_stderr_filter_drops_only_the_event_loop_noise():
  out = io.StringIO()
  f = ckpt_lib._StderrFilter(out)  # pylint: disable=protected-access
  noise = ("Traceback (most recent call last):\n"
           '  File "asyncio/base_events.py", line 806, in call_soon_threadsafe\n'
           "    self._check_closed()\n"
           "RuntimeError: Event loop is closed\n")
  for piece in (noise[:20], noise[20:77], noise[77:]):  # written in pieces, as PyErr_Print does
    f.write(piece)
  f.write("progress 10%\r")
  real = "Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: real\n"
  f.write(real)
  f.write("Exception ignored in: <coroutine object write_fragment at 0x1>\n"
          "ImportError: sys.meta_path is None, Python is likely shutting down\n")
  assert out.getvalue() == "progress 10%\r" + real
  f.write(noise + "after\n")  # one write holding the noise and more
  assert out.getvalue().endswith(real + "after\n")


def test_stderr_filter_with_threads_printing_at_once():
  out = io.StringIO()
  f = ckpt_lib._StderrFilter(out)  # pylint: disable=protected-access
  lines = ["Traceback (most recent call last):\n", '  File "base_events.py", line 806\n',
           "    raise RuntimeError('Event loop is closed')\n",
           "RuntimeError: Event loop is closed\n"]
  barrier = threading.Barrier(4)

  def noisy():
    barrier.wait()
    for _ in range(50):
      for line in lines:  # interleaves with the other threads line by line
        f.write(line)
  threads = [threading.Thread(target=noisy) for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert out.getvalue() == ""

"""Orbax checkpoints of the training state, with the Grain iterator (DESIGN.md §10): an adapter.

One checkpoint = `ocp.args.Composite` of
  state: params, optimizer state, step, RNG key (sharded arrays, `StandardSave`);
  data:  the Grain iterator state, one JSON file per process (Grain's own Orbax handler);
  meta:  JSON (the run's config, model config, tokenizer checksum, overfitting-detector state).
A latest checkpoint that fails to restore is moved to `<workdir>/corrupt/` with a warning and the
previous one is used; partially written (uncommitted) checkpoints are never listed by Orbax.
"""

import copy
import json
import logging
import os
import pathlib
import shutil
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from dualjax.distributed import processes_agree

log = logging.getLogger(__name__)


class _IteratorState:
  """Adapter for Grain's checkpoint handler: a frozen snapshot on save, the live iterator on restore.

  The snapshot is taken when `save` is called, so an async save never sees a later position.
  """

  def __init__(self, iterator: Any = None, state: Any = None):
    self.iterator, self.state = iterator, state

  def get_state(self) -> bytes:
    return json.dumps(self.state).encode()

  def set_state(self, state: bytes) -> None:
    self.state = json.loads(state.decode())
    if self.iterator is not None:
      self.iterator.set_state(self.state)

  def start_prefetch(self) -> None:
    pass


class CheckpointError(RuntimeError):
  """No checkpoint of the workdir can be restored by this run (one line, names the directory)."""


def _describe(e: BaseException) -> str:
  first = str(e).strip().splitlines()[0] if str(e).strip() else ""
  return f"{type(e).__name__}: {first}"[:300]


class Checkpointer:
  """`ocp.CheckpointManager` over `<workdir>/checkpoints` with fallback past corrupt checkpoints."""

  def __init__(self, workdir: str | os.PathLike, *, every: int, keep: int, async_save: bool = True,
               directory: str = "checkpoints"):
    self.workdir = pathlib.Path(workdir)
    self.directory = self.workdir / directory
    policies = ocp.checkpoint_managers  # every `every` steps and on preemption; no initial save
    self.options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(every), policies.PreemptionCheckpointingPolicy()]))
    self.manager = ocp.CheckpointManager(self.directory.absolute(), options=self.options)

  def save(self, step: int, state: Any, data_state: Any, meta: dict[str, Any],
           force: bool = False) -> bool:
    """Saves at `step` if the interval says so (or `force`); returns whether it saved."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(_IteratorState(state=data_state)),
        meta=ocp.args.JsonSave(copy.deepcopy(meta)))  # written later by the async thread
    return self.manager.save(step, args=args, force=force)

  def restore_latest(self, abstract_state: Any, data_iterator: Any
                     ) -> tuple[int, Any, dict[str, Any]] | None:
    """Restores the newest readable checkpoint (state, iterator position, meta) or None if none.

    Steps are tried newest first. Each process first checks its own files of the step with plain
    reads (no collectives) and all processes agree on the result, so they always call Orbax on
    the same step. A step that fails is moved to `<workdir>/corrupt/` only once an older step has
    restored; if none restores, CheckpointError (nothing is moved), so a systematic failure never
    throws checkpoints away. With several processes a failure inside Orbax after the file checks
    is not recoverable (Orbax's own barriers would pair with ours): it raises.
    """
    failed: list[tuple[int, str]] = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      meta, error = self._check_files(step)
      if processes_agree(error is None):
        writers = meta.get("process_count", jax.process_count())
        if writers != jax.process_count():
          raise CheckpointError(
              f"{self.directory / str(step)} was written by {writers} processes; resume with "
              f"{writers} (this run has {jax.process_count()})")
        try:
          restored = self.manager.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state),
              data=grain.checkpoint.CheckpointRestore(_IteratorState(iterator=data_iterator)),
              meta=ocp.args.JsonRestore()))
        except Exception as e:  # pylint: disable=broad-except
          if jax.process_count() > 1:
            raise CheckpointError(f"{self.directory / str(step)} passed the file checks but failed "
                                  f"to restore ({_describe(e)}); move it away and restart") from e
          error = _describe(e)
        else:
          self._quarantine([s for s, _ in failed])
          return step, restored["state"], restored["meta"]
      error = error or "unreadable on another process"
      log.warning("checkpoint at step %d is unreadable (%s); trying the previous one", step, error)
      failed.append((step, error))
    if failed:
      raise CheckpointError(
          f"no checkpoint in {self.directory} could be restored (newest, step {failed[0][0]}: "
          f"{failed[0][1]}); nothing was moved")
    return None

  def _check_files(self, step: int) -> tuple[dict[str, Any], str | None]:
    """(meta, None) if this process's files of `step` parse, else ({}, reason). No collectives."""
    d = self.directory / str(step)
    data = d / "data" / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    try:
      meta = json.loads((d / "meta" / "metadata").read_text())
      if data.exists():  # absent when another process count wrote it (meta says so)
        json.loads(data.read_text())
      json.loads((d / "state" / "_METADATA").read_text())
      return meta, None
    except (OSError, ValueError) as e:
      return {}, _describe(e)

  def _quarantine(self, steps: list[int]) -> None:
    """Moves unreadable steps out of the manager's directory (kept for inspection)."""
    if steps and jax.process_index() == 0:
      for step in steps:
        src = self.directory / str(step)
        dst = self.workdir / "corrupt" / f"{step}-{int(time.time())}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.exists():
          shutil.move(str(src), str(dst))
    if steps:
      processes_agree(True)  # a barrier: every process reloads after the move
      self.manager.reload()

  def should_save(self, step: int) -> bool:
    """Whether `save(step, ...)` would save (interval or preemption)."""
    return self.manager.should_save(step)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def restore_params(directory: str | os.PathLike, abstract_params: Any, step: int | None = None
                   ) -> tuple[Any, int]:
  """(params, step) from the checkpoints in `directory`: `step`, or the newest readable one.

  Only the parameters are read (the optimizer state is not); `abstract_params` are
  ShapeDtypeStructs with the shardings to restore into. ValueError in one line if none reads.
  """
  directory = pathlib.Path(directory)
  manager = ocp.CheckpointManager(directory.absolute(),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    steps = sorted(manager.all_steps(), reverse=True)
    if step is not None and step not in steps:
      raise ValueError(f"{directory}: no checkpoint at step {step} (have {sorted(steps)})")
    target = {"params": abstract_params}
    for s in ([step] if step is not None else steps):
      try:
        restored = manager.restore(s, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)))
      except Exception as e:  # pylint: disable=broad-except
        if step is not None:
          raise ValueError(f"{directory}: checkpoint {s} is unreadable ({_describe(e)})") from None
        log.warning("checkpoint %d is unreadable (%s); trying the previous one", s, _describe(e))
        continue
      return restored["state"]["params"], s
    raise ValueError(f"no readable checkpoint in {directory}")
  finally:
    manager.close()

"""Orbax checkpoints of the training state, with the Grain iterator (DESIGN.md §10): an adapter.

One checkpoint = `ocp.args.Composite` of
  state: params, optimizer state, step, RNG key (sharded arrays, `StandardSave`);
  data:  the Grain iterator state, one JSON file per process (Grain's own Orbax handler);
  meta:  JSON (the run identity, tokenizer checksum, split, overfitting-detector state).
A latest checkpoint that fails to restore is moved to `<workdir>/corrupt/` with a warning and the
previous one is used; partially written (uncommitted) checkpoints are never listed by Orbax (and
their temporary directories are removed at the next start). Each checkpoint records the run
identity (dualjax.workdir.identity): it restores only into the run that wrote it. A failed
asynchronous save (e.g. a full disk) is found by `save_error()` at the next step.
`quiet_orbax()` (CLIs) keeps Orbax's own logged tracebacks and the asyncio noise of a failed
restore off the terminal; the trainer reports such faults in one line itself.
"""

import copy
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import threading
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from dualjax import workdir as workdir_lib
from dualjax.distributed import agree_or_raise, processes_agree

log = logging.getLogger(__name__)
IDENTITY_KEY = "identity"


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
  """No checkpoint of the workdir can be restored by this run, or a save failed (one line)."""


def _describe(e: BaseException) -> str:
  first = str(e).strip().splitlines()[0] if str(e).strip() else ""
  return f"{type(e).__name__}: {first}"[:300]


def _disk_full(text: str) -> bool:
  return bool(re.search(r"No space left on device|Disk quota exceeded|os_error_code='28'|"
                        r"ENOSPC", text))


# --- quiet handled faults ------------------------------------------------------------------------

class _OrbaxLogFilter(logging.Filter):
  """Drops Orbax's WARNING/ERROR records (with their tracebacks); keeps the last for our message."""

  last: str = ""

  def filter(self, record: logging.LogRecord) -> bool:
    if "orbax" in record.pathname and record.levelno >= logging.WARNING:
      _OrbaxLogFilter.last = record.getMessage().strip().splitlines()[0][:300]
      return False
    return True


class _AsyncioFilter(logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" records of Orbax/tensorstore tasks
  (an abandoned restore's reads fail after we already reported the checkpoint in one line)."""

  def filter(self, record: logging.LogRecord) -> bool:
    msg = record.getMessage()
    if not msg.startswith("Task exception was never retrieved"):
      return True
    exc = record.exc_info[1] if record.exc_info else None
    text = msg + repr(exc) + "".join(getattr(exc, "__notes__", []) or [])
    tb = record.exc_info[2] if record.exc_info else None
    while tb is not None:
      text += tb.tb_frame.f_code.co_filename
      tb = tb.tb_next
    return not ("orbax" in text or "tensorstore" in text)


class _StderrFilter:
  """A sys.stderr wrapper that drops the tracebacks tensorstore prints (PyErr_Print) when a future
  completes after Orbax closed its event loop: `RuntimeError: Event loop is closed`, and the
  "Exception ignored in: <coroutine ...>" pairs of an abandoned save. Everything else passes.
  Tracebacks are collected per thread (several threads print at once)."""

  _DROP = ("RuntimeError: Event loop is closed",)
  _HEADS = ("Traceback (most recent call last):", "Exception ignored in")

  def __init__(self, stream):
    self._stream = stream
    self._lock = threading.Lock()
    self._local = threading.local()  # .block: lines of a traceback being collected; .partial

  def write(self, text: str) -> int:
    loc = self._local
    block = getattr(loc, "block", None)
    if block is None and not (text and any(h.startswith(text[:len(h)]) for h in self._HEADS)):
      with self._lock:
        return self._stream.write(text)
    if block is None:
      loc.block, loc.partial = [], ""
    loc.partial += text
    *lines, loc.partial = loc.partial.split("\n")
    for i, line in enumerate(lines):
      loc.block.append(line)
      first = len(loc.block) == 1
      if (first and not line.startswith(self._HEADS)) or (
          line and not line.startswith((" ", "Traceback", "Exception ignored in"))):
        rest = "".join(l + "\n" for l in lines[i + 1:]) + loc.partial
        self._flush_block(drop=not first)  # a first line that is no header: not a traceback
        if rest:
          self.write(rest)
        break
    return len(text)

  def _flush_block(self, drop: bool = True) -> None:
    loc = self._local
    block, loc.block, loc.partial = loc.block or [], None, ""
    last = block[-1] if block else ""
    if not drop or not (last in self._DROP or (
        block[0].startswith("Exception ignored in: <coroutine")
        and "Python is likely shutting down" in last)):
      with self._lock:
        self._stream.write("\n".join(block) + "\n")

  def flush(self) -> None:
    self._stream.flush()

  def __getattr__(self, name: str) -> Any:
    return getattr(self._stream, name)


def quiet_orbax() -> None:
  """Installs the Orbax log filter and the stderr filter (idempotent; for the CLIs)."""
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _OrbaxLogFilter) for f in absl_logger.filters):
    absl_logger.addFilter(_OrbaxLogFilter())
  asyncio_logger = logging.getLogger("asyncio")
  if not any(isinstance(f, _AsyncioFilter) for f in asyncio_logger.filters):
    asyncio_logger.addFilter(_AsyncioFilter())
  if not isinstance(sys.stderr, _StderrFilter):
    sys.stderr = _StderrFilter(sys.stderr)


# --- identity ------------------------------------------------------------------------------------

def step_meta(directory: str | os.PathLike, step: int) -> dict[str, Any] | None:
  """The meta JSON of checkpoint `step` with a plain read (None if absent or unreadable)."""
  try:
    meta = json.loads((pathlib.Path(directory) / str(step) / "meta" / "metadata").read_text())
  except (OSError, ValueError):
    return None
  return meta if isinstance(meta, dict) else None


def identity_error(directory: str | os.PathLike, step: int, meta: dict[str, Any],
                   identity: dict[str, Any]) -> str | None:
  """Why checkpoint `step` (its `meta`) does not belong to the run `identity`, or None."""
  where = pathlib.Path(directory) / str(step)
  saved = meta.get(IDENTITY_KEY)
  if not isinstance(saved, dict):
    return (f"checkpoint {where} records no run identity (written by an older dualjax or another "
            "tool); it cannot be resumed safely: use another --workdir")
  diff = workdir_lib.identity_diff(saved, identity)
  if diff:
    return (f"checkpoint {where} belongs to another run ({diff}); resume it with its own config "
            "or use another --workdir")
  return None


def check_identity(directory: str | os.PathLike, identity: dict[str, Any]) -> None:
  """Plain reads, no Orbax, no collectives: every committed checkpoint whose meta parses must
  belong to the run `identity` (CheckpointError otherwise). Unreadable ones are left to restore."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    return
  for d in sorted((p for p in directory.iterdir() if p.name.isdigit() and p.is_dir()),
                  key=lambda p: -int(p.name)):
    meta = step_meta(directory, int(d.name))
    if meta is not None:
      error = identity_error(directory, int(d.name), meta, identity)
      if error:
        raise CheckpointError(error)


class Checkpointer:
  """`ocp.CheckpointManager` over `<workdir>/checkpoints` with fallback past corrupt checkpoints."""

  def __init__(self, workdir: str | os.PathLike, *, every: int, keep: int, async_save: bool = True,
               directory: str = "checkpoints", keep_every: int = 0,
               identity: dict[str, Any] | None = None):
    """`keep` newest checkpoints are kept, plus every multiple of `keep_every` (0 = none; those
    steps are also saved). With `identity`, restore refuses checkpoints of another run."""
    self.workdir = pathlib.Path(workdir)
    self.directory = self.workdir / directory
    self.identity = identity
    policies = ocp.checkpoint_managers  # every `every` steps and on preemption; no initial save
    save = [policies.FixedIntervalPolicy(every), policies.PreemptionCheckpointingPolicy()]
    if keep_every:
      save.append(policies.FixedIntervalPolicy(keep_every))
    self.options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, keep_period=keep_every or None, create=True,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
        save_decision_policy=policies.AnySavePolicy(save))
    self.manager = ocp.CheckpointManager(self.directory.absolute(), options=self.options)
    self._saving: tuple[int, int] | None = None  # (step, bytes) of the last save started
    self._unchecked = False  # a save finished (or runs) whose outcome save_error() has not seen

  def save(self, step: int, state: Any, data_state: Any, meta: dict[str, Any],
           force: bool = False) -> bool:
    """Saves at `step` if the interval says so (or `force`); returns whether it saved.

    A save that fails at once (e.g. the disk is full) is a CheckpointError in one line.
    """
    meta = copy.deepcopy(meta)  # written later by the async thread
    if self.identity is not None:
      meta[IDENTITY_KEY] = self.identity
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(_IteratorState(state=data_state)),
        meta=ocp.args.JsonSave(meta))
    nbytes = sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(state))
    if self._unchecked and (force or self.should_save(step)):
      self.wait()  # the previous save's failure is reported as its own (Orbax waits anyway)
    try:
      saved = self.manager.save(step, args=args, force=force)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(step, nbytes, e) from None
    if saved:
      self._saving, self._unchecked = (step, nbytes), True
    return saved

  def _save_failed(self, step: int, nbytes: int, e: BaseException | str) -> CheckpointError:
    text = e if isinstance(e, str) else f"{_describe(e)} {e}"
    good = [s for s in self.manager.all_steps() if s != step]
    last = (f"the last good checkpoint is step {max(good)}" if good
            else "no checkpoint was written")
    if _disk_full(text) or _disk_full(_OrbaxLogFilter.last):
      try:
        free = f"{shutil.disk_usage(self.directory).free:,} bytes free"
      except OSError:
        free = "free space unknown"
      return CheckpointError(
          f"saving the checkpoint of step {step} to {self.directory} failed: no space left on "
          f"device (a checkpoint needs about {nbytes:,} bytes, {free}); {last}")
    first = text.strip().splitlines()[0][:300] if text.strip() else "unknown error"
    return CheckpointError(f"saving the checkpoint of step {step} to {self.directory} failed "
                           f"({first}); {last}")

  def _save_finished(self) -> bool:
    """Whether the last asynchronous save has ended (non-blocking). Orbax 0.12 keeps it in its
    finalize thread; `is_saving_in_progress()` turns False before the writes end."""
    try:
      ref = self.manager._finalize_thread  # pylint: disable=protected-access
      return bool(ref.map(lambda t: t is None or not t.is_alive()))
    except AttributeError:  # another Orbax version: ask it
      return not self.manager.is_saving_in_progress()

  def save_error(self) -> CheckpointError | None:
    """The failure of a finished asynchronous save, once (None while fine or still saving).

    Host-side and cheap (no wait, no collectives): call it every step.
    """
    if not self._unchecked or not self._save_finished():
      return None
    try:
      self.wait()  # returns at once: the save has ended
    except CheckpointError as e:
      return e
    return None

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
      wrong = (identity_error(self.directory, step, meta, self.identity)
               if error is None and self.identity is not None else None)
      agree_or_raise(CheckpointError(wrong) if wrong else None, CheckpointError(
          f"{self.directory / str(step)} belongs to another run (see process 0)"))
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
    """Waits for the pending save; CheckpointError in one line if it failed."""
    unchecked, self._unchecked = self._unchecked, False
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      step, nbytes = self._saving if unchecked and self._saving else (-1, 0)
      raise self._save_failed(step, nbytes, e) from None

  def close(self) -> None:
    """Waits for the pending save and closes; CheckpointError if that save failed."""
    try:
      self.wait()
    finally:
      try:
        self.manager.close()
      except Exception:  # pylint: disable=broad-except
        pass  # the save's failure was reported by wait()


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

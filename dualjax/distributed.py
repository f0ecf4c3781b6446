"""Multi-process agreement (DESIGN.md §4, §10): every process takes the same branch or none.

All functions are collectives when there is more than one process: every process calls them in
the same order. With one process they cost nothing.
"""

import jax
import numpy as np
from jax.experimental import multihost_utils


def is_main() -> bool:
  """Process 0, the one that writes shared files (config, metrics, evaluation results)."""
  return jax.process_index() == 0


def processes_agree(ok: bool) -> bool:
  """True iff `ok` on every process."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def any_process(flags: list[bool]) -> list[bool]:
  """Element-wise OR of `flags` over all processes (one collective for several flags)."""
  if jax.process_count() == 1:
    return [bool(f) for f in flags]
  got = multihost_utils.process_allgather(np.asarray(flags, np.int32))
  return [bool(x) for x in np.any(np.asarray(got).reshape(-1, len(flags)), axis=0)]


def agree_or_raise(error: BaseException | None, elsewhere: BaseException) -> None:
  """Raises `error` where it happened and `elsewhere` on the other processes, or nothing."""
  if not processes_agree(error is None):
    raise error if error is not None else elsewhere


def smallest(x: float) -> float:
  """The minimum of `x` over all processes (float32 precision)."""
  if jax.process_count() == 1:
    return x
  return float(np.min(multihost_utils.process_allgather(np.float32(x))))


def from_main(values: list[int]) -> list[int]:
  """Process 0's `values` (small int32s) on every process."""
  if jax.process_count() == 1:
    return list(values)
  got = multihost_utils.broadcast_one_to_all(np.asarray(values, np.int32))
  return [int(v) for v in np.asarray(got)]


def barrier(name: str) -> None:
  """Waits for every process to reach the barrier `name`."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)

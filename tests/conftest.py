"""Test set-up: 8 fake CPU devices, set before jax is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TPU topologies are compiled ahead of time through libtpu in several test processes at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
EVAL_DATA = REPO.parent / "shared" / "eval-data"


@pytest.fixture(scope="session")
def eval_data_dir() -> pathlib.Path:
  """The shared real evaluation datasets; skip when this checkout has none beside it."""
  if not EVAL_DATA.is_dir():
    pytest.skip(f"evaluation data not found at {EVAL_DATA} (expected ../shared/eval-data beside the repo)")
  return EVAL_DATA

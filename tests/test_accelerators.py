"""TPU slice types: chips, hosts and runtime versions per generation; GPU device counts."""

import pytest

from dualjax import accelerators as acc


@pytest.mark.parametrize("name,gcloud_type,gen,chips,hosts,runtime", [
    # v4 / v5p count TensorCores (2 per chip), 4 chips per host (cloud.google.com/tpu/docs/v5p).
    ("v5p-8", "v5p-8", "v5p", 4, 1, "v2-alpha-tpuv5"),
    ("v5p-128", "v5p-128", "v5p", 64, 16, "v2-alpha-tpuv5"),
    ("v5p-256", "v5p-256", "v5p", 128, 32, "v2-alpha-tpuv5"),
    ("v4-32", "v4-32", "v4", 16, 4, "tpu-ubuntu2204-base"),
    # v5e / v6e count chips; up to 8 chips one host, then 8 per host (cloud.google.com/tpu/docs/v5e).
    ("v5e-256", "v5litepod-256", "v5e", 256, 32, "v2-alpha-tpuv5-lite"),
    ("v5litepod-16", "v5litepod-16", "v5e", 16, 2, "v2-alpha-tpuv5-lite"),
    ("v5e-4", "v5litepod-4", "v5e", 4, 1, "v2-alpha-tpuv5-lite"),
    ("v6e-8", "v6e-8", "v6e", 8, 1, "v2-alpha-tpuv6e"),
    ("v6e-256", "v6e-256", "v6e", 256, 32, "v2-alpha-tpuv6e"),
])
def test_parse_tpu(name, gcloud_type, gen, chips, hosts, runtime):
  s = acc.parse_tpu(name)
  assert (s.accelerator_type, s.generation, s.chips, s.hosts, s.runtime_version) == (
      gcloud_type, gen, chips, hosts, runtime)
  assert s.devices == chips


@pytest.mark.parametrize("name,fragment", [
    ("v3-8", "unknown TPU generation 'v3'"),
    ("v7x-64", "unknown TPU generation 'v7x'"),
    ("tpu-128", "not of the form"),
    ("v5p-12", "multiple of 8"),
    ("v5e-12", "have 1, 4, 8"),
    ("v6e-512", "have 1, 4, 8"),
])
def test_parse_tpu_rejects(name, fragment):
  with pytest.raises(acc.AcceleratorError, match=fragment) as e:
    acc.parse_tpu(name)
  assert "\n" not in str(e.value)


def test_gpu_devices():
  assert acc.gpu_devices(2, 8) == 16
  with pytest.raises(acc.AcceleratorError):
    acc.gpu_devices(0, 8)

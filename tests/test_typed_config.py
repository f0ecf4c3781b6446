"""Config sections as typed dataclasses: defaults from the dataclass, unknown fields named."""

import dataclasses

import ml_collections
import pytest

from dualjax import typed_config


@dataclasses.dataclass(frozen=True)
class _Section:
  rate: float = 0.5
  steps: int = 3


def test_section_to_dataclass():
  assert typed_config.from_section(_Section, {}, "s") == _Section()
  got = typed_config.from_section(_Section, ml_collections.ConfigDict({"steps": 7}), "s")
  assert got == _Section(steps=7)
  with pytest.raises(ValueError, match=r"^s: unknown config field\(s\) \['rte'\]; known: "
                                       r"\['rate', 'steps'\]$"):
    typed_config.from_section(_Section, {"rte": 1.0}, "s")

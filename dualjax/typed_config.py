"""A config section (ml_collections ConfigDict or dict) as a typed dataclass, unknown fields an
error naming the section: the one place such a section's defaults live is the dataclass."""

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def from_section(cls: type[T], section: Any, name: str) -> T:
  """`cls(**section)`; ValueError `name: unknown config field(s) [...]; known: [...]`."""
  c = dict(section.to_dict() if hasattr(section, "to_dict") else section)
  known = [f.name for f in dataclasses.fields(cls)]
  unknown = sorted(set(c) - set(known))
  if unknown:
    raise ValueError(f"{name}: unknown config field(s) {unknown}; known: {known}")
  return cls(**c)

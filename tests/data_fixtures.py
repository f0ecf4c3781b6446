"""Shared data fixtures (imported by the data tests): a prepared embedded corpus, built once."""

import pathlib

import numpy as np
import pytest
from array_record.python import array_record_module

from dualjax import prepare as prepare_lib

TINY_VOCAB = 1024


@pytest.fixture(scope="session")
def embedded_prepared(tmp_path_factory) -> pathlib.Path:
  """`embedded` prepared with a trained BPE tokenizer of TINY_VOCAB (one process)."""
  out = tmp_path_factory.mktemp("data") / "embedded"
  prepare_lib.prepare("embedded", out, vocab_size=TINY_VOCAB, num_workers=1, verbose=False)
  return out


def read_records(prepared: pathlib.Path, split: str) -> list[np.ndarray]:
  """Every record of a prepared split, read with ArrayRecord's own reader (not the pipeline)."""
  m = prepare_lib.read_manifest(prepared)
  out = []
  for f in m[split]["shards"]:
    r = array_record_module.ArrayRecordReader(str(prepared / f))
    out.extend(np.frombuffer(b, np.dtype(m["dtype"])).astype(np.int32)
               for b in r.read(0, r.num_records()))
    r.close()
  return out

"""Packing scoring sequences into bucketed rows."""

import numpy as np
import pytest

from dualjax.evaluation import packing


def _check(lengths, pk):
  for b, n_rows in pk.num_rows.items():
    rows = pk.rows(b)
    assert len(rows) == n_rows
    for row in rows:
      assert len(row) >= 1
      ends = pk.offset[row] + lengths[row]
      assert (ends <= b).all()
      # Units in a row are contiguous-or-gapped but never overlap.
      assert (pk.offset[row][1:] >= ends[:-1]).all()
  assert sorted(np.concatenate([np.concatenate(pk.rows(b)) for b in pk.num_rows])) == list(
      range(len(lengths)))


def test_pack_dense_and_bucketed():
  rng = np.random.default_rng(0)
  lengths = np.concatenate([rng.integers(5, 120, 3000), [129, 200, 256, 257, 500]])
  pk = packing.pack(lengths, row_len=128, max_len=512)
  _check(lengths, pk)
  assert set(pk.num_rows) == {128, 256, 512}
  assert pk.num_rows[256] == 3 and pk.num_rows[512] == 2  # 129, 200, 256 / 257, 500: alone.
  small = lengths <= 128
  used = pk.num_rows[128] * 128
  assert lengths[small].sum() / used > 0.97  # Little padding even with units up to a row long.


def test_pack_exact_fit_and_errors():
  pk = packing.pack(np.array([4, 4, 4, 4, 8]), row_len=8, max_len=8)
  assert pk.num_rows == {8: 3}
  _check(np.array([4, 4, 4, 4, 8]), pk)
  with pytest.raises(ValueError, match="exceeds max_len=8"):
    packing.pack(np.array([9]), row_len=8, max_len=8)
  with pytest.raises(ValueError, match="at least one token"):
    packing.pack(np.array([0, 3]), row_len=8, max_len=8)

"""The paper's setting: 470M dual model, 8192 steps x 2048 rows x 2048 tokens (DESIGN.md §5, §6).

Variants: `configs/base.py` (paper scale) and `configs/base.py:tiny` (a CPU-sized model on the
embedded corpus). Every default is in `dualjax.config_lib` (see its docstring for where).
"""

from dualjax import config_lib


def get_config(arg: str | None = None):
  return config_lib.get_config(arg)

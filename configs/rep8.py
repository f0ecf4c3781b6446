"""r = 8 repetitions, lam by the paper's rule (DESIGN.md §8). Variants: '' (paper), 'tiny' (CPU)."""

from dualjax import config_lib


def get_config(arg: str | None = None):
  return config_lib.rep_config(8, arg)

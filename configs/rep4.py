"""r = 4 repetitions, lam by the paper's rule (DESIGN.md §8). Variants: '' (paper), 'tiny' (CPU)."""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("base.py")))


def get_config(arg: str | None = None):
  return _base["rep_config"](repetitions=4, arg=arg)

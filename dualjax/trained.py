"""A trained model from a workdir: parameters, model config, tokenizer and step.

`load(path)` takes a training workdir (its newest readable checkpoint, or `step`) or one of its
`checkpoints/N` directories; only the parameters are read, sharded by the run's rules on `mesh`
(default: all devices as replicas, i.e. replicated unless the rules say otherwise).
"""

import dataclasses
import os
import pathlib
from typing import Any

import jax
import ml_collections

from dualjax import checkpoint
from dualjax import config_lib
from dualjax import mesh as mesh_lib
from dualjax import model as model_lib
from dualjax import state as state_lib
from dualjax import tokenizer as tok_lib
from dualjax import workdir as workdir_lib


@dataclasses.dataclass
class Trained:
  params: Any
  model_cfg: model_lib.ModelConfig
  tokenizer: tok_lib.Tokenizer
  step: int
  config: ml_collections.ConfigDict
  workdir: pathlib.Path


def load(path: str | os.PathLike, step: int | None = None,
         mesh: jax.sharding.Mesh | None = None) -> Trained:
  """The trained model at `path` (ValueError in one line naming the path if it cannot)."""
  workdir, step_of_path = workdir_lib.split_run_path(path)
  step = step_of_path if step_of_path is not None else step
  cfg = workdir_lib.read_config(workdir)
  model_cfg = config_lib.model_config(cfg)
  tokenizer = workdir_lib.load_tokenizer(workdir)
  mesh = mesh or mesh_lib.make_mesh(-1, 1, 1)
  abstract = state_lib.abstract_params(model_cfg, mesh, config_lib.rules(cfg))
  params, step = checkpoint.restore_params(workdir / workdir_lib.CHECKPOINTS_DIR, abstract, step)
  return Trained(params, model_cfg, tokenizer, step, cfg, workdir)

"""The paper's study (§5.2, Figure 4): a grid over repetitions r and AR share lam.

`python -m dualjax.sweep --config=configs/sweep_paper.py --root=DIR [--mode=launch]`.
Variant `:tiny`: a 2 x 2 grid of the CPU-sized model, a few steps each, with the nine-task
evaluation (1 item per task, all four modes) at the end, for tests and a quick look at the
whole pipeline (about 16 s of CPU per point).

lam values. The extracted paper text lost the numbers of Figure 4 (its "lambda" symbols are
blank). The values below are those the paper names elsewhere plus those of the authors' released
models: lam = 1 (AR only) and 0 (MDM only), Table 8's causal ratios 87.5 %, 50 %, 12.5 %
(7/8, 1/2, 1/8), and the branches of the authors' model repository
(https://huggingface.co/ltg/dual-lm-470m: "values at 0, 1/256, 1/64, 1/16, 1/4, 1/2, 3/4, 15/16,
63/64, 255/256, 1"). The paper trained 50 models, not every (r, lam) pair of this grid (8 x 13 =
104 points); drop points with `--config.lams=...` or `--config.repetitions=...` to run a subset.
All values are dyadic, so every point is representable on power-of-two meshes (e.g. 1/256 on
v5p-128: 64 replicas x 4 microsteps of 8 rows).

Data. Every point reads the same prepared token shards (`prepared_dir`, under the root): prepare
them once before launching (`python -m dualjax.prepare --config=configs/base.py --config.data.source=...
--config.data.prepared_dir=ROOT/prepared`), so that no two runs tokenise the corpus at the same time.
"""

import ml_collections

PAPER_LAMS = (0.0, 1 / 256, 1 / 64, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4, 7 / 8, 15 / 16, 63 / 64,
              255 / 256, 1.0)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.base = "configs/base.py"  # the training config file (':variant' allowed), relative to the cwd
  c.repetitions = (1, 2, 4, 8, 16, 32, 64, 128)
  c.lams = PAPER_LAMS
  c.seeds = (42,)
  # `section.field=value` overrides of every point's training config. Evaluate the nine tasks
  # once, at the end of training (eval.every = train.steps), for the results table.
  c.overrides = ("eval.every=8192",)
  c.prepared_dir = "{root}/prepared"  # '' = each point prepares its own data.source
  # --mode=launch: where each point runs (launch/README.md). backend 'tpu': one slice of
  # `accelerator` per `points_per_slice` points; 'slurm': `nodes` x `gpus_per_node` GPUs.
  c.launch = ml_collections.ConfigDict(dict(
      backend="tpu", accelerator="v5p-128", zone="", project="", spot=False, queued=False,
      nodes=16, gpus_per_node=8, partition="", time="", account="",
      points_per_slice=1, name_prefix="dualjax"))
  if arg == "tiny":
    c.base = "configs/base.py:tiny"
    c.repetitions = (1, 2)
    c.lams = (0.5, 0.75)  # dual models: evaluated in all four modes, so every CSV column is set
    c.overrides = ("train.steps=4", "log.every=2", "log.val_every=2", "log.val_batches=1",
                   "checkpoint.every=4", "eval.every=4", "eval.limit=1")
    c.launch.update(dict(accelerator="v5e-8", nodes=1, gpus_per_node=8))
  elif arg not in (None, ""):
    raise ValueError(f"config variant must be '' or 'tiny', got {arg!r}")
  return c

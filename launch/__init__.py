"""Launch scripts: Cloud TPU VMs (`python -m launch.tpu`) and SLURM GPU clusters (`python -m launch.slurm`)."""

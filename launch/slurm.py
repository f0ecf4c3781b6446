"""`python -m launch.slurm --nodes=N [--gpus_per_node=8] [flags] -- dualjax.main ARGS`: SLURM GPU clusters.

Writes a batch script (--script, default slurm/JOB_NAME.sbatch) and submits it with `sbatch`.
The job runs one process per GPU (N x G processes) with `srun`; each calls
`python -m dualjax.main --coordinator_address=HOST:PORT --num_processes=$SLURM_NTASKS
--process_id=$SLURM_PROCID ...` (HOST = the job's first node). JAX binds each process to GPU
$SLURM_LOCALID when it finds SLURM variables, hence one task per GPU and no --gpus-per-task.

Preemption and time limits: the job is submitted with --requeue and --signal=B:USR1@S. On USR1
(S seconds before the time limit) the script sends SIGTERM to the training step; the trainers save
a checkpoint and exit 0, and the script requeues the job (`scontrol requeue`). The same happens
when the trainers get SIGTERM from a preemption. A requeued job starts the script again: finished
runs are skipped (`python -m dualjax.sweep --finished=WORKDIR`) and the trainer resumes from its
last checkpoint. A run that fails (non-zero exit) ends the job without a requeue. Workdirs and the
prepared data must be on a file system every node sees.

--dry_run (or --dry-run) prints the exact `sbatch` and `srun` commands, one per line, and writes
nothing; --print_script prints the whole batch script. Before anything is written each run's config
is checked against N x G devices (mesh and lam split): a mismatch is one line and exit code 2.
"""

import functools
import os
import pathlib
import shlex
import subprocess
import sys

from absl import flags

from dualjax import accelerators
from launch import common

FLAGS = flags.FlagValues()  # own flags: dualjax modules imported here define none globally
_str = functools.partial(flags.DEFINE_string, flag_values=FLAGS)
_bool = functools.partial(flags.DEFINE_bool, flag_values=FLAGS)
_int = functools.partial(flags.DEFINE_integer, flag_values=FLAGS)
_multi = functools.partial(flags.DEFINE_multi_string, flag_values=FLAGS)
_NODES = _int("nodes", 1, "nodes")
_GPUS = _int("gpus_per_node", 8, "GPUs per node (one process each)")
_JOB_NAME = _str("job_name", "dualjax", "SLURM job name")
_PARTITION = _str("partition", None, "SLURM partition")
_ACCOUNT = _str("account", None, "SLURM account")
_TIME = _str("time", None, "time limit per allocation, e.g. 24:00:00")
_SBATCH_ARG = _multi("sbatch_arg", [], "extra sbatch option, e.g. --exclusive (repeatable)")
_PYTHON = _str("python", sys.executable, "the Python with dualjax installed (on the nodes)")
_SCRIPT = _str("script", None, "batch script path (default LOG_DIR/JOB_NAME.sbatch)")
_LOG_DIR = _str("log_dir", "slurm", "directory of the job's output (and of the default --script)")
_SIGNAL_SECONDS = _int("signal_seconds", 300, "USR1 this many seconds before the time limit")
_MAX_RESTARTS = _int("max_restarts", 50, "no requeue after this many restarts")
_PORT_BASE = _int("port_base", 20000, "coordinator port = port_base + job id % 10000")
_RUN = _multi("run", [], "dualjax.main arguments of one run (repeatable; in order)")
_DRY_RUN = _bool("dry_run", False, "print the commands, one per line; write nothing")
_PRINT_SCRIPT = _bool("print_script", False, "print the batch script; write nothing")

# Options used, as documented: https://slurm.schedmd.com/sbatch.html (--parsable --job-name
# --nodes --ntasks-per-node --gpus-per-node --requeue --signal=[{R|B}:]<sig_num>[@sig_time]
# --open-mode --output --partition --account --time) and https://slurm.schedmd.com/srun.html
# (--nodes --ntasks-per-node --kill-on-bad-exit --label); `scontrol show hostnames`, `scontrol
# requeue`: https://slurm.schedmd.com/scontrol.html. SLURM_RESTART_COUNT: set on requeued jobs.
UNFINISHED = 75  # the trainer exited 0 before train.steps (it was signalled): requeue


def sbatch_options() -> list[str]:
  opts = [f"--job-name={_JOB_NAME.value}", f"--nodes={_NODES.value}",
          f"--ntasks-per-node={_GPUS.value}", f"--gpus-per-node={_GPUS.value}", "--requeue",
          f"--signal=B:USR1@{_SIGNAL_SECONDS.value}", "--open-mode=append",
          f"--output={log_dir()}/%x-%j.out"]
  opts += [f"--{k}={v}" for k, v in (("partition", _PARTITION.value), ("account", _ACCOUNT.value),
                                     ("time", _TIME.value)) if v]
  return opts + list(_SBATCH_ARG.value)


def log_dir() -> str:
  return os.path.abspath(_LOG_DIR.value)


def script_path() -> str:
  return os.path.abspath(_SCRIPT.value or os.path.join(_LOG_DIR.value, f"{_JOB_NAME.value}.sbatch"))


def sbatch_cmd() -> list[str]:
  return ["sbatch", "--parsable", *sbatch_options(), script_path()]


def srun_cmd(args: list[str]) -> list[str]:
  """One training step: N x G tasks, each `python -m dualjax.main` with its process id."""
  body = ('exec "$0" -m dualjax.main --coordinator_address="$DUALJAX_COORDINATOR" '
          '--num_processes="$SLURM_NTASKS" --process_id="$SLURM_PROCID" "$@"')
  return ["srun", f"--nodes={_NODES.value}", f"--ntasks-per-node={_GPUS.value}",
          "--kill-on-bad-exit=1", "--label", "bash", "-c", body, _PYTHON.value, *args]


def batch_script(runs: list[list[str]]) -> str:
  """The batch script: coordinator, signal traps, the runs in sequence, requeue if unfinished."""
  steps = " && ".join(shlex.join(["one", common.workdir_of(a), *srun_cmd(a)]) for a in runs)
  return "\n".join([
      "#!/bin/bash",
      f"# Written by `python -m launch.slurm` (dualjax): {_NODES.value} nodes x {_GPUS.value} GPUs,"
      " one process per GPU.",
      *[f"#SBATCH {o}" for o in sbatch_options()],
      "set -u",
      f"cd {shlex.quote(str(common.REPO))}",
      f"PY={shlex.quote(_PYTHON.value)}",
      'DUALJAX_COORDINATOR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):'
      f'$(({_PORT_BASE.value} + SLURM_JOB_ID % 10000))"',
      "export DUALJAX_COORDINATOR",
      'echo "== $(date -u +%FT%TZ) job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}:'
      ' $SLURM_JOB_NUM_NODES nodes, coordinator $DUALJAX_COORDINATOR"',
      'STEP=""; SIG=0; STOPPING=0',
      # USR1 (time limit near) and TERM (preemption, scancel): the trainers save and exit 0.
      'trap \'SIG=1; STOPPING=1; echo "signal: stopping the trainers (they save a checkpoint)";'
      ' [ -n "$STEP" ] && kill -TERM "$STEP"\' USR1 TERM',
      "one() {",
      '  local wd=$1; shift',
      '  "$PY" -m dualjax.sweep --finished="$wd" && return 0',
      f'  [ "$STOPPING" -eq 1 ] && return {UNFINISHED}',
      '  "$@" & STEP=$!',
      # `wait` returns early when a trapped signal arrives; wait again until the step has ended.
      '  while :; do SIG=0; wait "$STEP"; rc=$?; [ "$SIG" -eq 1 ] || break; done',
      '  STEP=""',
      '  [ "$rc" -ne 0 ] && return "$rc"',
      f'  "$PY" -m dualjax.sweep --finished="$wd" || return {UNFINISHED}',
      "}",
      steps,
      "rc=$?",
      f'if [ "$rc" -eq {UNFINISHED} ]; then',
      f'  if [ "${{SLURM_RESTART_COUNT:-0}}" -ge {_MAX_RESTARTS.value} ]; then',
      f'    echo "stopped before the end after {_MAX_RESTARTS.value} restarts; not requeued"; exit 1',
      "  fi",
      '  echo "unfinished: requeue"; scontrol requeue "$SLURM_JOB_ID" || true; exit 0',
      "fi",
      'exit "$rc"',
      ""])


def main(argv: list[str]) -> int:
  if common.wants_help(argv):
    print(__doc__.strip() + "\n\nflags:\n" + FLAGS.module_help(sys.modules[__name__]))
    return 0
  argv = common.normalise_argv(argv)
  try:
    positional = FLAGS(argv)[1:]
  except flags.Error as e:
    common.fail(str(e).splitlines()[0])
  try:
    devices = accelerators.gpu_devices(_NODES.value, _GPUS.value)
    runs = common.runs_from(_RUN.value, positional)
    common.check_runs(runs, devices, f"{_NODES.value} nodes x {_GPUS.value} GPUs")
  except accelerators.AcceleratorError as e:
    common.fail(f"--nodes / --gpus_per_node: {e}")
  except common.LaunchError as e:
    common.fail(str(e))
  script = batch_script(runs)
  if _PRINT_SCRIPT.value:
    print(script, end="")
    return 0
  if _DRY_RUN.value:
    print(f"# {_NODES.value} nodes x {_GPUS.value} GPUs: {devices} processes, one per GPU; "
          f"batch script {script_path()} (--print_script shows it) runs:")
    print(shlex.join(sbatch_cmd()))
    for args in runs:
      print(shlex.join(srun_cmd(args)))
    return 0
  path = pathlib.Path(script_path())
  path.parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(log_dir()).mkdir(parents=True, exist_ok=True)
  path.write_text(script)
  print("+ " + shlex.join(sbatch_cmd()), file=sys.stderr)
  r = subprocess.run(sbatch_cmd(), cwd=common.REPO, capture_output=True, text=True, check=False)
  if r.returncode:
    print(f"error: sbatch failed (exit {r.returncode}): {r.stderr.strip()}", file=sys.stderr)
    return 1
  job = r.stdout.strip().split(";")[0]
  print(f"submitted job {job}; log: {log_dir()}/{_JOB_NAME.value}-{job}.out; "
        f"stop: scancel {job}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))

"""Ahead-of-time compilation of a run for a target it need not run on (DESIGN.md §4).

  python -m dualjax.compile --config=configs/rep128.py --topology=v5p:4x4x8 [--config.a.b=v ...]
  python -m dualjax.compile --config=configs/rep128.py --topology=8xH200 [--fit]

Targets: TPU slices `GEN:TOPOLOGY` (v4, v5e, v5p, v6e; e.g. v5p:4x4x8 = 128 chips), compiled by
libtpu through `jax.experimental.topologies` on this machine; GPU nodes `NxH100` / `NxH200`,
compiled for N CPU devices with the card's memory -- an ESTIMATE: the CPU compiler's memory plan
differs from the GPU's (measured 1.2-5x larger temporaries) and cuDNN attention cannot be lowered
for a CPU, so the XLA attention (L x L scores) is compiled instead.

For the training step, the validation function and the evaluation scorer it prints, per device:
parameters, optimizer state, temporaries and total against the chip's memory (85% budget); the
useful FLOPs per step from the analytic count (dualjax.flops), checked against an unrolled
calibration compile; the collectives per step (kind, count, bytes); the objective split. With
`mesh.max_device_rows=-1` (the default) or `--fit` it searches rows per device and the remat
policy (compiled, not guessed) and prints the overrides that fit; a plan with set rows that does
not fit is one line naming the fix and exit code 2.
"""

import dataclasses
import math
import os
import re
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from dualjax import cli
from dualjax import config_lib
from dualjax import distributed
from dualjax import flops as flops_lib
from dualjax import hlo
from dualjax import mesh as mesh_lib
from dualjax import model as model_lib
from dualjax import split as split_lib
from dualjax import state as state_lib
from dualjax import step as step_lib
from dualjax import validation
from dualjax.errors import ConfigError
from dualjax.evaluation import scoring

GiB = 1 << 30
BUDGET = 0.85  # of the chip's memory (DESIGN.md §4)
TPU_HBM = {"v4": 32 * GiB, "v5e": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB}
GPU_HBM = {"H100": 80 * GiB, "H200": 141 * 10**9}
REMAT_LADDER = ("none", "dots_with_no_batch_dims_saveable", "full")


@dataclasses.dataclass
class Target:
  """Where the run is meant to run: its devices (real or abstract) and their memory."""
  name: str
  platform: str          # 'tpu' | 'gpu' | 'cpu'
  devices: list[Any]
  hbm_bytes: float
  peak_flops: float | None
  estimate: bool         # memory compiled for other devices (GPU on CPU)
  local: bool = False    # this process's own devices: 'auto' attention resolves as in training


def local_target(memory_bytes: float = 0.0) -> Target:
  """This process's devices, with their memory (`memory_bytes` if > 0, else what the device
  reports; ConfigError naming `mesh.device_memory_gb` where it reports none, e.g. a CPU)."""
  devices = jax.devices()
  platform = {"cuda": "gpu", "rocm": "gpu"}.get(jax.default_backend(), jax.default_backend())
  if memory_bytes <= 0:  # (only this process's devices answer memory_stats)
    stats = jax.local_devices()[0].memory_stats() or {}
    memory_bytes = stats.get("bytes_limit", 0)
    if not memory_bytes:
      raise ConfigError(f"mesh.device_memory_gb: the {platform} devices report no memory limit; "
                        "set it to fit mesh.max_device_rows=-1 (e.g. 16)")
  kind = getattr(devices[0], "device_kind", platform)
  return Target(f"{len(devices)} x {kind}", platform, devices, float(memory_bytes),
                flops_lib.peak_flops(devices[0]), estimate=platform == "cpu", local=True)


def parse_target(name: str) -> Target:
  """`v5p:4x4x8`, `v5e:2x2`, `8xH200`, ... (ConfigError naming the topology otherwise)."""
  m = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})", name)
  if m:
    cli.quiet_tpu_probe()
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    try:
      topo = topologies.get_topology_desc(platform="tpu", topology_name=name)
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigError(f"--topology={name}: libtpu cannot describe it ({cli.one_line(e)}); "
                        "is libtpu installed (pip install 'jax[tpu]')?") from None
    devices = list(topo.devices)
    return Target(name, "tpu", devices, TPU_HBM[m.group(1)], flops_lib.peak_flops(devices[0]),
                  estimate=False)
  m = re.fullmatch(r"(\d+)x(H100|H200)", name)
  if m:
    n = int(m.group(1))
    devices = jax.devices("cpu")
    if len(devices) < n:
      raise ConfigError(f"--topology={name}: needs {n} CPU devices, this process has "
                        f"{len(devices)} (run `python -m dualjax.compile` in a fresh process)")
    return Target(name, "gpu", devices[:n], GPU_HBM[m.group(2)], flops_lib.peak_flops(m.group(2)),
                  estimate=True)
  raise ConfigError(f"--topology={name}: unknown; use GEN:AxB[xC] with GEN in v4, v5e, v5p, v6e "
                    "(e.g. v5p:4x4x8) or NxH100 / NxH200 (e.g. 8xH200)")


def target_mesh(target: Target, m: Any) -> Mesh:
  """The config's ('replica', 'fsdp', 'tensor') mesh over the target's devices."""
  shape = mesh_lib.mesh_shape(m.replica, m.fsdp, m.tensor, len(target.devices))
  if target.platform == "tpu":
    devices = mesh_utils.create_device_mesh(shape, devices=target.devices)
  else:
    devices = np.asarray(target.devices).reshape(shape)
  return Mesh(devices, mesh_lib.AXES, axis_types=(AxisType.Auto,) * 3)


def for_target(cfg: ml_collections.ConfigDict, target: Target) -> ml_collections.ConfigDict:
  """The config as it runs on the target: 'auto' attention resolved for its platform."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  if cfg.model.attention_impl == "auto" and not target.local:
    cfg.model.attention_impl = "splash" if target.platform == "tpu" else "xla"
  return cfg


# ------------------------------------------------------------------------------------------------
# The compiled functions.

@dataclasses.dataclass
class Compiled:
  """One compiled function with what the report needs."""
  name: str
  compiled: Any
  state_bytes: dict[str, float]  # per device: params, opt_state (arguments that stay resident)

  @property
  def memory(self) -> dict[str, float]:
    ma = self.compiled.memory_analysis()
    total = (ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
             + ma.temp_size_in_bytes)
    return {"arguments": ma.argument_size_in_bytes, "outputs": ma.output_size_in_bytes,
            "aliased": ma.alias_size_in_bytes, "temporaries": ma.temp_size_in_bytes,
            "total": total, **self.state_bytes}

  def collectives(self) -> dict[str, Any]:
    return hlo.collective_stats(self.compiled.as_text())


class DoesNotFit(Exception):
  """The target's compiler refused the program for memory (TPU: RESOURCE_EXHAUSTED)."""

  def __init__(self, name: str, needed: float | None, message: str):
    super().__init__(message)
    self.name, self.needed = name, needed


def _compile(name: str, lowered: Any) -> Any:
  try:
    return lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    m = re.search(r"required for HLO temporaries \(([\d.]+)G\)", str(e))
    raise DoesNotFit(name, float(m.group(1)) * GiB if m else None, cli.one_line(e)) from None


def per_device_bytes(abstract: Any) -> float:
  """Bytes one device holds of a pytree of sharded ShapeDtypeStructs."""
  total = 0.0
  for x in jax.tree.leaves(abstract):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
  return total


def _rows(n: int, L: int, mesh: Mesh, axes: Any) -> dict[str, jax.ShapeDtypeStruct]:
  sh = NamedSharding(mesh, P(axes))
  return {k: jax.ShapeDtypeStruct((n, L), jnp.int32, sharding=sh) for k in ("tokens", "segment_ids")}


def compile_train(cfg: ml_collections.ConfigDict, mesh: Mesh
                  ) -> tuple[Compiled, split_lib.ObjectiveSplit]:
  """The training step exactly as the trainer jits it, for `mesh`."""
  mc = config_lib.model_config(cfg)
  split = split_lib.split_from_config(cfg, mesh.shape)
  spec = state_lib.state_spec(cfg, mesh)
  o = cfg.objective
  fn = jax.jit(step_lib.make_train_step(mc, split, mesh, spec.optimizer,
                                        ar_loss_scale=o.ar_loss_scale, z_loss=o.z_loss,
                                        rules=config_lib.rules(cfg),
                                        grad_shardings=spec.grad_shardings),
               in_shardings=(spec.shardings, mesh_lib.batch_sharding(mesh)),
               out_shardings=(spec.shardings, None), donate_argnums=(0,))
  batch = _rows(cfg.data.global_batch, cfg.data.seq_len + 1, mesh, mesh_lib.BATCH_AXES)
  compiled = _compile("train step", fn.lower(spec.abstract, batch))
  state_bytes = {"params": per_device_bytes(spec.abstract["params"]),
                 "opt_state": per_device_bytes(spec.abstract["opt_state"])}
  return Compiled("train step", compiled, state_bytes), split


def compile_validation(cfg: ml_collections.ConfigDict, mesh: Mesh,
                       split: split_lib.ObjectiveSplit) -> Compiled:
  """The trainer's validation chunk function (dualjax.validation) on one chunk: a training
  microstep's rows."""
  mc = config_lib.model_config(cfg)
  rules = config_lib.rules(cfg)
  abstract = state_lib.abstract_params(mc, mesh, rules)
  fn = jax.jit(validation.make_sums_fn(mc, span_mask=cfg.log.span_mask_val, mesh=mesh,
                                       rules=rules))
  rows = cfg.data.global_batch // split.microsteps
  batch = _rows(rows, cfg.data.seq_len + 1, mesh, mesh_lib.BATCH_AXES)
  row_ids = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=mesh_lib.batch_sharding(mesh))
  compiled = _compile("validation", fn.lower(abstract, batch, row_ids, jax.random.key(0)))
  return Compiled("validation", compiled, {"params": per_device_bytes(abstract)})


def compile_eval(cfg: ml_collections.ConfigDict, mesh: Mesh) -> list[Compiled]:
  """The evaluation scorer's functions (one per attention kind) at the eval row length."""
  mc = config_lib.model_config(cfg)
  s = config_lib.eval_settings(cfg)
  abstract = state_lib.abstract_params(mc, mesh, config_lib.rules(cfg))
  row_len = min(s.row_len, mc.max_seq_len)
  n = scoring.rows_per_batch(s.batch_tokens, row_len, mesh.size)
  data = NamedSharding(mesh, P(tuple(mesh.axis_names)))
  out = []
  for attn in ("causal", "flags", "bidirectional"):
    fn = jax.jit(scoring.logprob_fn(mc, attn, mesh=mesh), in_shardings=(None, data, data, data, data),
                 out_shardings=data)
    arg = lambda dt: jax.ShapeDtypeStruct((n, row_len), dt, sharding=data)
    compiled = _compile(f"evaluation ({attn})", fn.lower(
        abstract, arg(jnp.int32), arg(jnp.int32), arg(jnp.bool_), arg(jnp.int32)))
    out.append(Compiled(f"evaluation ({attn})", compiled, {"params": per_device_bytes(abstract)}))
  return out


# ------------------------------------------------------------------------------------------------
# FLOPs: the analytic count, checked against an unrolled compile.

def calibrate_flops(cfg: ml_collections.ConfigDict) -> dict[str, float]:
  """XLA's count for the layers and the rest of a step vs the analytic count (same shapes).

  `cost_analysis()` counts a scanned loop body once, so: layers unrolled, one microstep, one
  device, two depths; per layer = C(3) - C(2), rest = C(2) - 2 per layer. XLA's attention is
  dense (no causal saving), so the analytic side counts full attention here.
  """
  mc = config_lib.model_config(cfg)
  L, rows = cfg.data.seq_len, 2
  costs = {}
  for n in (2, 3):
    c = dataclasses.replace(mc, num_layers=n, scan_layers=False, remat="none",
                            attention_impl="xla", head_chunk=0)  # no loops: all counted
    only_ar = split_lib.ObjectiveSplit(replicas=1, microsteps=1, n_ar=1)
    ar_vg, _ = step_lib.objective_grads(c, only_ar, ar_loss_scale=1.0, z_loss=0.0)
    fn = jax.jit(lambda p, b: ar_vg(p, b, jax.random.key(0), jnp.float32(rows * L))[1])
    batch = {k: jax.ShapeDtypeStruct((rows, L + 1), jnp.int32) for k in ("tokens", "segment_ids")}
    batch["rows"] = jax.ShapeDtypeStruct((rows,), jnp.int32)
    cost = fn.lower(model_lib.abstract_params(c), batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    costs[n] = float(cost["flops"])
  per_layer, tokens = costs[3] - costs[2], rows * L
  rest = costs[2] - 2 * per_layer
  one = dataclasses.replace(mc, num_layers=1)
  analytic_layer = 3 * (2 * flops_lib.layer_matmul_params(mc)
                        + flops_lib.attention_flops_per_token(one, L, 0.0))
  analytic_rest = 6 * flops_lib.head_matmul_params(mc)
  return {"layer_ratio": per_layer / tokens / analytic_layer,
          "rest_ratio": rest / tokens / analytic_rest,
          "xla_per_layer_per_token": per_layer / tokens, "analytic_per_layer_per_token": analytic_layer}


# ------------------------------------------------------------------------------------------------
# The plan: compile, check the budget, report.

def _gb(x: float) -> str:
  return f"{x / 1e9:.2f} GB"


@dataclasses.dataclass
class Plan:
  target: Target
  cfg: ml_collections.ConfigDict
  mesh: Mesh
  split: split_lib.ObjectiveSplit
  functions: list[Compiled]

  def worst(self) -> Compiled:
    return max(self.functions, key=lambda c: c.memory["total"])

  def fits(self) -> bool:
    return all(c.memory["total"] <= BUDGET * self.target.hbm_bytes for c in self.functions)


def build(cfg: ml_collections.ConfigDict, target: Target, functions: tuple[str, ...] = (
    "train", "validation", "eval")) -> Plan:
  """Compiles the run's functions for the target (ConfigError for a config that cannot run)."""
  cfg = for_target(cfg, target)
  config_lib.model_config(cfg)  # validates
  mesh = target_mesh(target, cfg.mesh)
  if cfg.mesh.max_device_rows < 0:
    raise ConfigError(f"mesh.max_device_rows must be >= 0, got {cfg.mesh.max_device_rows}")
  train, split = compile_train(cfg, mesh)
  out = [train] if "train" in functions else []
  if "validation" in functions:
    out.append(compile_validation(cfg, mesh, split))
  if "eval" in functions:
    out += compile_eval(cfg, mesh)
  return Plan(target, cfg, mesh, split, out)


MIN_ROWS = 4  # rows per device below which recomputing activations is the better trade


def fit(cfg: ml_collections.ConfigDict, target: Target,
        log: Callable[[str], None] = lambda s: None,
        functions: tuple[str, ...] = ("train", "validation", "eval"),
        subject: str | None = None) -> Plan:
  """The fastest setting that fits, from compiled memory: for each remat policy (none, dots,
  full), the most rows per device (fewest microsteps) -- first estimated from a compile as
  state + rows x temporaries per row, then compiled to check -- and the first policy that fits
  with at least MIN_ROWS rows (else the most rows found). The training step decides;
  validation and evaluation are compiled for the chosen setting and checked too."""
  shape = mesh_lib.mesh_shape(cfg.mesh.replica, cfg.mesh.fsdp, cfg.mesh.tensor,
                              len(target.devices))
  most = max(1, cfg.data.global_batch // (shape[0] * shape[1]))
  budget = BUDGET * target.hbm_bytes
  errors: list[ConfigError] = []  # configs that cannot run at some rows (e.g. lam)
  compiled = [False]

  def attempt(rows: int, remat: str) -> tuple[ml_collections.ConfigDict, float | None, float]:
    """(config, total bytes or None if it does not fit/compile, temporaries)."""
    c = ml_collections.ConfigDict(cfg.to_dict())
    c.mesh.max_device_rows, c.mesh.microsteps, c.model.remat = rows, 0, remat
    try:
      m = build(c, target, ("train",)).functions[0].memory
      compiled[0] = True
    except ConfigError as e:
      errors.append(e)
      return c, None, math.nan  # lam not representable with these rows
    except DoesNotFit as e:
      log(f"fit: {rows} rows/device, remat {remat}: refused by the compiler "
          f"({_gb(e.needed) + ' of temporaries' if e.needed else 'out of memory'})")
      return c, None, e.needed or math.inf
    log(f"fit: {rows} rows/device, remat {remat}: train step {_gb(m['total'])} "
        f"({100 * m['total'] / target.hbm_bytes:.0f}% of {_gb(target.hbm_bytes)})")
    return c, (m["total"] if m["total"] <= budget else None), m["temporaries"]

  best = None
  for remat in REMAT_LADDER:
    rows = most
    c, total, temp = attempt(rows, remat)
    while total is None and rows > 1:
      per_row = temp / rows if math.isfinite(temp) else math.inf
      state = (BUDGET * target.hbm_bytes) * 0.05  # resident state, refined by the next compile
      guess = int((budget - state) // per_row) if math.isfinite(per_row) else rows // 2
      rows = max(1, min(rows // 2, 2 ** int(math.log2(max(guess, 1)))))
      c, total, temp = attempt(rows, remat)
    if total is not None and (best is None or rows > best[1]):
      best = (c, rows)
    if best is not None and best[1] >= MIN_ROWS:
      break
  if best is None:
    if errors and not compiled[0]:  # nothing could even be built: that is the error
      raise errors[-1]
    raise ConfigError(f"{subject or '--topology=' + target.name}: no setting fits "
                      f"{target.name} (1 row per device with full remat is too large); use more "
                      "devices or fsdp (--config.mesh.fsdp)")
  return build(best[0], target, functions)


def fitted_rows(cfg: ml_collections.ConfigDict) -> bool:
  """Whether `mesh.max_device_rows=-1` asks for a fit; with `mesh.microsteps` set, those decide
  the rows per device instead (the config is set to no bound, 0, in place)."""
  if cfg.mesh.max_device_rows != -1:
    return False
  if cfg.mesh.microsteps:
    cfg.mesh.max_device_rows = 0
    return False
  return True


def fit_to_devices(cfg: ml_collections.ConfigDict, log: Callable[[str], None]) -> None:
  """`mesh.max_device_rows=-1`: sets it and `model.remat` (in place) to the fastest setting whose
  training step and validation fit this process's devices (`fit`, from compiled memory)."""
  if cfg.mesh.microsteps:
    raise ConfigError(f"mesh.max_device_rows=-1 (fit) chooses the microsteps; leave "
                      f"mesh.microsteps=0 (got {cfg.mesh.microsteps})")
  # Every process fits to the smallest device memory of the job and takes process 0's choice,
  # so all run one program (each branch below is taken by all processes or none).
  error, target = None, None
  try:
    target = local_target(cfg.mesh.device_memory_gb * 1e9)
  except ConfigError as e:
    error = e
  distributed.agree_or_raise(error, ConfigError(
      "mesh.max_device_rows=-1: another process cannot size its devices (see its log)"))
  target.hbm_bytes = distributed.smallest(target.hbm_bytes)
  log(f"fitting rows per device and remat to {target.name} ({_gb(target.hbm_bytes)} per device"
      f"{', an estimate on CPU' if target.estimate else ''}, budget {BUDGET:.0%})…")
  c = ml_collections.ConfigDict(cfg.to_dict())
  c.mesh.max_device_rows = 0
  choice = [0, 0]
  try:
    plan = fit(c, target, log, functions=("train", "validation"),
               subject="mesh.max_device_rows=-1")
    worst = plan.worst()
    if not plan.fits():
      raise ConfigError(f"mesh.max_device_rows=-1: nothing fits {target.name}: {worst.name} "
                        f"needs {_gb(worst.memory['total'])} of {_gb(target.hbm_bytes)} per device "
                        f"with {plan.cfg.mesh.max_device_rows} rows and remat "
                        f"{plan.cfg.model.remat}; use more devices or fsdp (mesh.fsdp)")
    choice = [plan.cfg.mesh.max_device_rows, REMAT_LADDER.index(plan.cfg.model.remat)]
  except ConfigError as e:
    error = e
  distributed.agree_or_raise(error, ConfigError(
      "mesh.max_device_rows=-1: the fit failed on another process (see its log)"))
  rows, remat = distributed.from_main(choice)
  cfg.mesh.max_device_rows, cfg.model.remat = rows, REMAT_LADDER[remat]
  log(f"fitted: mesh.max_device_rows={rows} model.remat={cfg.model.remat} "
      f"({worst.name} {_gb(worst.memory['total'])}, "
      f"{100 * worst.memory['total'] / target.hbm_bytes:.0f}% of {_gb(target.hbm_bytes)})")


def report(plan: Plan, calibration: dict[str, float] | None = None) -> str:
  """The plan as text (see the module docstring)."""
  t, cfg, s = plan.target, plan.cfg, plan.split
  mc = config_lib.model_config(cfg)
  lines = [f"target {t.name}: {len(t.devices)} {t.platform.upper()} devices "
           f"({t.devices[0].device_kind if t.platform == 'tpu' else t.name.split('x')[1]}), "
           f"{_gb(t.hbm_bytes)} each, budget {BUDGET:.0%}"
           + ("; memory is the CPU compiler's ESTIMATE for these cards" if t.estimate else ""),
           f"mesh {dict(plan.mesh.shape)}; {s.describe()}; rows/device/microstep "
           f"{cfg.data.global_batch // (s.cells * plan.mesh.shape['fsdp'])}; remat "
           f"{mc.remat}; attention {mc.attention_impl}"]
  for c in plan.functions:
    m = c.memory
    state = " ".join(f"{k} {_gb(m[k])}" for k in ("params", "opt_state") if k in m)
    lines.append(f"{c.name:24s} {state}  temporaries {_gb(m['temporaries'])}  total "
                 f"{_gb(m['total'])} = {100 * m['total'] / t.hbm_bytes:.0f}% -> "
                 + ("fits" if m["total"] <= BUDGET * t.hbm_bytes else "DOES NOT FIT"))
  step_flops = flops_lib.train_step_flops(mc, cfg.data.seq_len, cfg.data.global_batch, s.lam)
  lines.append(f"useful FLOPs per step {step_flops:.3e} (6N + attention, causal at half)"
               + (f"; at 50% MFU {step_flops / (0.5 * t.peak_flops * len(t.devices)):.2f} s/step"
                  if t.peak_flops else ""))
  n, shape = len(t.devices), plan.mesh.shape
  share = 1 if not cfg.optim.sharded_ns else (
      n if mesh_lib.params_whole(plan.mesh) else shape["fsdp"] * shape["tensor"])
  ns = flops_lib.muon_flops_per_device(mc, share, cfg.optim.ns_steps)
  lines.append(f"Muon Newton-Schulz per device {ns:.3e} FLOPs = "
               f"{100 * ns / (step_flops / n):.2f}% of the step's useful FLOPs per device "
               f"(divided among {share} devices)")
  if calibration:
    lines.append(f"FLOPs check (unrolled compile / analytic): layers "
                 f"{calibration['layer_ratio']:.3f}, head {calibration['rest_ratio']:.3f}")
  coll = plan.functions[0].collectives() if plan.functions[0].name == "train step" else {}
  for kind, st in sorted((k, v) for k, v in coll.items() if not k.startswith("_")):
    lines.append(f"train step {kind:18s} x{st['count']:<5d} {_gb(st['bytes'])} per device, "
                 f"{_gb(st['wire_bytes'])} on the wire")
  minimum = all_reduce_minimum(plan)
  if coll and minimum:
    wire = sum(v["wire_bytes"] for v in coll.values())
    lines.append(f"train step collectives on the wire {_gb(wire)} = {wire / minimum:.2f}x one "
                 f"all-reduce of the gradients ({_gb(minimum)})")
  return "\n".join(lines)


def all_reduce_minimum(plan: Plan) -> float | None:
  """Wire bytes per device of one ring all-reduce of the fp32 gradients, 2 P (n-1)/n: the
  analytic minimum of a data-parallel step (None on fsdp/tensor meshes or one device)."""
  n, train = plan.mesh.size, plan.functions[0]
  if n == 1 or not mesh_lib.params_whole(plan.mesh) or train.name != "train step":
    return None
  return 2 * train.memory["params"] * (n - 1) / n


# ------------------------------------------------------------------------------------------------
# CLI.

FLAGS = flags.FlagValues()
_TOPOLOGY = flags.DEFINE_string("topology", None, "the target: v5p:4x4x8, v5e:2x2, 8xH200, ...",
                                flag_values=FLAGS)
_FIT = flags.DEFINE_bool("fit", False, "search rows per device and remat for the fastest fit "
                         "(also what mesh.max_device_rows=-1, the default, asks for)",
                         flag_values=FLAGS)
_FUNCTIONS = flags.DEFINE_list("functions", ["train", "validation", "eval"],
                               "what to compile: train, validation, eval", flag_values=FLAGS)
_CALIBRATE = flags.DEFINE_bool("calibrate", True, "check the analytic FLOPs with an unrolled "
                               "compile (2 and 3 layers, one device)", flag_values=FLAGS)


def _cpu_devices(argv: list[str]) -> None:
  """N CPU devices for an NxGPU target, before jax starts its backends."""
  m = next((re.fullmatch(r"--topology=(\d+)x(H100|H200)", a) for a in argv
            if re.fullmatch(r"--topology=(\d+)x(H100|H200)", a)), None)
  if m:
    flag = f"--xla_force_host_platform_device_count={m.group(1)}"
    prev = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in prev:
      os.environ["XLA_FLAGS"] = (prev + " " + flag).strip()


def main(argv: list[str]) -> int:
  _cpu_devices(argv)
  args = cli.parse(argv, __doc__, FLAGS, config="required")
  if args is None:
    return 0
  if args.config is None:
    cli.fail("--config is required, e.g. --config=configs/rep128.py")
  if not _TOPOLOGY.value:
    cli.fail("--topology is required, e.g. --topology=v5p:4x4x8 or --topology=8xH200")
  unknown = set(_FUNCTIONS.value) - {"train", "validation", "eval"}
  if unknown:
    cli.fail(f"--functions: unknown {sorted(unknown)} (train, validation, eval)")
  target = parse_target(_TOPOLOGY.value)
  log = lambda s: print(s, file=sys.stderr, flush=True)
  fitting = _FIT.value or fitted_rows(args.config)
  try:
    plan = (fit(args.config, target, log, tuple(_FUNCTIONS.value)) if fitting
            else build(args.config, target, tuple(_FUNCTIONS.value)))
  except DoesNotFit as e:
    cli.fail(f"{e.name} does not fit {target.name}: the compiler needs "
             f"{_gb(e.needed) + ' of temporaries' if e.needed else 'more memory'} with "
             f"{_gb(target.hbm_bytes)} per device; try a smaller --config.mesh.max_device_rows or "
             "--config.model.remat=full, or --fit")
  calibration = calibrate_flops(plan.cfg) if _CALIBRATE.value else None
  print(report(plan, calibration))
  if not plan.fits():
    worst = plan.worst()
    cli.fail(f"{worst.name} needs {_gb(worst.memory['total'])} of {_gb(target.hbm_bytes)} per "
             f"device (budget {BUDGET:.0%}); try --config.mesh.max_device_rows="
             f"{max(1, plan.cfg.data.global_batch // (plan.split.cells * plan.mesh.shape['fsdp']) // 2)}"
             f" or --config.model.remat=full, or --fit")
  if fitting:
    print(f"fits with --config.mesh.max_device_rows={plan.cfg.mesh.max_device_rows} "
          f"--config.model.remat={plan.cfg.model.remat}")
  return 0


if __name__ == "__main__":
  cli.run(main, (ConfigError,))

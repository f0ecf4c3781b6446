"""Collectives (and their bytes) of a compiled program, read from its optimized HLO text.

  stats = collective_stats(jax.jit(f).lower(*args).compile().as_text())
  # {kind: {'count', 'bytes', 'wire_bytes'}}; format_stats(stats) prints a table

Conventions (per device, i.e. per SPMD partition):
  count       executions per call of the program: an op inside a while body counts trip-count times
              (nested loops multiply); ops in conditional branches count once per branch (upper
              bound: only one branch runs).
  bytes       payload of one execution x count: all-reduce / all-to-all / collective-permute:
              the operand (= result) size; all-gather: the gathered *output*; reduce-scatter: the
              *input* (= output x group size).
  wire_bytes  ring-algorithm bytes each device sends: all-gather out*(n-1)/n, reduce-scatter
              in*(n-1)/n, all-reduce 2*size*(n-1)/n, all-to-all size*(n-1)/n, permute size.
libtpu's all-reduce-scatter fusion (an all-reduce whose fused slice keeps this device's shard)
is counted as the reduce-scatter it runs as; a collective that libtpu's async collective fusion
spreads over several fusions (start, steps, done: a copy in each) is counted once, at the start
(a collective in a step or done fusion that matches none at a start still counts).
Async pairs: only the *-start op is counted (its tuple shape is (operands, outputs, ...)); *-done
is skipped. Ops wrapped in async-start(calls=...) are found inside the called computation.
Trip counts: backend_config known_trip_count (GPU/CPU), else the condition's `compare(i, K)`,
LT, with a constant init (TPU prints no known_trip_count).
"""

import collections
import math
import re

DTYPE_BYTES = {
    "pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
    "s32": 4, "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8,
    "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1,
    "f8e4m3": 1, "f8e3m4": 1, "f4e2m1fn": 0.5, "f8e8m0fnu": 1, "token": 0,
}
KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all",
         "collective-permute", "collective-broadcast")

_COMP_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\]")


def _split_top(s: str) -> list[str]:
  """Top-level comma split of a tuple body (no outer parens)."""
  out, depth, cur = [], 0, []
  for ch in s:
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    if ch == "," and depth == 0:
      out.append("".join(cur).strip())
      cur = []
    else:
      cur.append(ch)
  if "".join(cur).strip():
    out.append("".join(cur).strip())
  return out


def shape_bytes(shape: str) -> float:
  """Bytes of an HLO shape string (array or tuple; layouts ignored)."""
  total = 0.0
  for dt, dims in _ARRAY.findall(re.sub(r"\{[^{}]*\}", "", shape)):
    if dt not in DTYPE_BYTES:
      continue
    n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    total += n * DTYPE_BYTES[dt]
  return total


def _tuple_elems(shape: str) -> list[str]:
  shape = shape.strip()
  if shape.startswith("(") and shape.endswith(")"):
    return _split_top(shape[1:-1])
  return [shape]


def _group_size(attrs: str, num_partitions: int) -> int:
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
  if m:
    sizes = dict((k.strip("' "), int(v)) for k, v in
                 (kv.split("=") for kv in m.group(1).split(",") if "=" in kv))
    axes = [a.strip("' ") for a in m.group(2).split(",") if a.strip()]
    return math.prod(sizes[a] for a in axes) if axes else 1
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=\{\{([^}]*)\}", attrs)
  if m:
    return len([x for x in m.group(1).split(",") if x.strip()])
  return num_partitions  # replica_groups={} or absent: all partitions


def parse_module(text: str):
  """-> (computations {name: [instr dict]}, entry name, num_partitions)."""
  comps, cur, entry = {}, None, None
  m = re.search(r"num_partitions=(\d+)", text)
  num_partitions = int(m.group(1)) if m else 1
  for line in text.splitlines():
    if cur is None:
      h = _COMP_HEADER.match(line)
      if h and not line.startswith(" "):
        cur = h.group(2)
        comps[cur] = []
        if h.group(1):
          entry = cur
      continue
    if line.startswith("}"):
      cur = None
      continue
    im = _INSTR.match(line)
    if im:
      name, shape, opcode, rest = im.groups()
      comps[cur].append({"name": name, "shape": shape, "opcode": opcode, "rest": rest,
                         "line": line})
  return comps, entry, num_partitions


def _trip_count(instr, comps, by_name) -> int | None:
  m = re.search(r'known_trip_count":\{"n":"(\d+)"', instr["rest"])
  if m:
    return int(m.group(1))
  cond = re.search(r"condition=%([\w.\-]+)", instr["rest"])
  if not cond or cond.group(1) not in comps:
    return None
  consts = {}
  for ins in comps[cond.group(1)]:
    c = re.match(r"(-?\d+)\)", ins["rest"]) if ins["opcode"] == "constant" else None
    if c:
      consts[ins["name"]] = int(c.group(1))
  for ins in comps[cond.group(1)]:
    if ins["opcode"] == "compare" and "direction=LT" in ins["rest"]:
      ops = re.findall(r"%([\w.\-]+)", ins["rest"].split(")")[0])
      bound = [consts[o] for o in ops if o in consts]
      if bound:
        init = _init_value(instr, by_name)
        return bound[0] - (init or 0)
  return None


def _init_value(instr, by_name) -> int | None:
  """Value of tuple element 0 of the while's init operand, if it is a constant."""
  op = re.match(r"%([\w.\-]+)", instr["rest"])
  t = by_name.get(op.group(1)) if op else None
  if not t or t["opcode"] != "tuple":
    return None
  first = re.match(r"%([\w.\-]+)", t["rest"])
  c = by_name.get(first.group(1)) if first else None
  if c and c["opcode"] == "constant":
    v = re.match(r"(-?\d+)\)", c["rest"])
    return int(v.group(1)) if v else None
  return None


def collective_stats(text: str, return_ops: bool = False):
  comps, entry, nparts = parse_module(text)
  by_name = {i["name"]: i for instrs in comps.values() for i in instrs}
  unknown_loops = []
  edges = collections.defaultdict(list)          # caller -> [(callee, factor)]
  for comp, instrs in comps.items():
    for ins in instrs:
      rest = ins["rest"]
      if ins["opcode"] == "while":
        trip = _trip_count(ins, comps, by_name)
        if trip is None:
          unknown_loops.append(ins["name"])
          trip = 1
        body = re.search(r"body=%([\w.\-]+)", rest)
        if body:
          edges[comp].append((body.group(1), trip))
        continue
      for key in ("calls", "true_computation", "false_computation"):
        for c in re.findall(key + r"=%([\w.\-]+)", rest):
          edges[comp].append((c, 1))
      b = re.search(r"branch_computations=\{([^}]*)\}", rest)
      if b:
        edges[comp] += [(c.strip().lstrip("%"), 1) for c in b.group(1).split(",")]
  # Multiplicity = sum over call paths from ENTRY of the product of trip counts (Kahn order).
  reach, stack = {entry}, [entry]
  while stack:
    for c, _ in edges[stack.pop()]:
      if c not in reach:
        reach.add(c)
        stack.append(c)
  indeg = collections.Counter(c for p in reach for c, _ in edges[p])
  mult = collections.Counter({entry: 1})
  ready = [entry]
  while ready:
    p = ready.pop()
    for c, k in edges[p]:
      mult[c] += mult[p] * k
      indeg[c] -= 1
      if indeg[c] == 0:
        ready.append(c)
  # libtpu's async collective fusions: one collective runs from an `async-collective-start`
  # fusion through `async_collective_fusion` steps to an `async-collective-done`, each of which
  # holds a copy of it; only the start's is counted.
  def called(prefix: str) -> set[str]:
    return {c for instrs in comps.values() for ins in instrs if ins["name"].startswith(prefix)
            for c in re.findall(r"calls=%([\w.\-]+)", ins["rest"])}

  def key(ins) -> tuple[str, str]:
    return ins["opcode"], re.sub(r"\{[^{}]*\}", "", ins["shape"])

  started = {key(ins) for c in called("async-collective-start") for ins in comps.get(c, ())
             if ins["opcode"] in KINDS}
  continued = called("async-collective-done") | {c for c in comps
                                                 if c.startswith("async_collective_fusion")}
  stats = collections.defaultdict(lambda: {"count": 0, "bytes": 0.0, "wire_bytes": 0.0})
  ops = []
  for comp, instrs in comps.items():
    k = mult.get(comp, 0)
    if not k:
      continue
    for ins in instrs:
      op = ins["opcode"]
      if comp in continued and key(ins) in started:
        continue  # a copy of a collective counted at its async-collective-start
      if op.endswith("-done"):
        continue
      base = op[:-6] if op.endswith("-start") else op
      if base not in KINDS:
        continue
      if base == "all-reduce" and comp.startswith("all-reduce-scatter"):
        base = "reduce-scatter"  # libtpu's reduce-scatter: an all-reduce fused with its slice
      n = _group_size(ins["rest"], nparts)
      elems = _tuple_elems(ins["shape"])
      if op.endswith("-start") and base != "all-reduce" and len(elems) >= 2:
        out = shape_bytes(elems[1])          # (operands, outputs[, contexts])
      else:
        out = shape_bytes(ins["shape"])
      if base == "reduce-scatter" and op.startswith("all-reduce"):
        payload, wire = out, out * (n - 1) / n  # `out` is the (padded) input here
      elif base == "reduce-scatter":
        payload, wire = out * n, out * (n - 1)
      elif base == "all-gather":
        payload, wire = out, out * (n - 1) / n
      elif base == "all-reduce":
        payload, wire = out, 2 * out * (n - 1) / n
      elif base in ("all-to-all", "ragged-all-to-all"):
        payload, wire = out, out * (n - 1) / n
      else:
        payload, wire = out, out
      s = stats[base]
      s["count"] += k
      s["bytes"] += k * payload
      s["wire_bytes"] += k * wire
      ops.append(dict(kind=base, name=ins["name"], computation=comp, times=k, group=n,
                      payload=payload))
  result = dict(stats)
  if unknown_loops:
    result["_unknown_trip_count_loops"] = unknown_loops
  return (result, ops) if return_ops else result


def format_stats(stats) -> str:
  lines = []
  for kind, s in sorted((k, v) for k, v in stats.items() if not k.startswith("_")):
    lines.append(f"{kind:20s} x{s['count']:<6d} payload {s['bytes'] / 2**20:10.2f} MiB   "
                 f"wire {s['wire_bytes'] / 2**20:10.2f} MiB")
  if "_unknown_trip_count_loops" in stats:
    lines.append(f"loops with unknown trip count (counted once): {stats['_unknown_trip_count_loops']}")
  return "\n".join(lines)


"""Zero-shot evaluation on the nine tasks in four scoring modes (DESIGN.md §7).

Library: `evaluate(params, model_cfg, tokenizer, tasks, modes, ...) -> results dict`.
CLI:
  python -m dualjax.evaluate --checkpoint=PATH | --workdir=DIR [--tasks=arc_easy,...]
      [--modes=ar,prefix,pll,mc] [--limit=N] [--out=FILE]
  python -m dualjax.evaluate --random_init --model=tiny --tokenizer=PATH ...   (smoke tests)
Writes FILE (JSON: raw and normalised scores per task, mode and sub-task, with the config and the
checkpoint step) and FILE with a .md suffix (a Table-2-like Markdown table).
Bad input (unknown task or mode, missing or malformed task file) is one line on stderr, exit 2,
before any scoring and without touching an existing output.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import re
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

from dualjax.evaluation import metrics, prompts, scoring, tasks as tasks_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "eval-data"
DEFAULT_MODES = ("ar", "prefix", "pll", "mc")


def supported_modes(lam: float | None) -> tuple[str, ...]:
  """The scoring modes a model trained with AR share `lam` supports (None: unknown, all).

  An AR-only model (lam = 1) never saw bidirectional attention, so only 'ar'; an MDM-only model
  (lam = 0) never saw causal attention, so 'pll' and 'mc'; a dual model supports all four.
  """
  if lam is None or 0.0 < lam < 1.0:
    return DEFAULT_MODES
  return ("ar",) if lam >= 1.0 else ("pll", "mc")


def trained_lam(path: str | os.PathLike) -> float | None:
  """The AR share of the run a workdir or `<workdir>/checkpoints/N` belongs to, if recorded."""
  from dualjax.checkpoint import split_run_path  # pylint: disable=import-outside-toplevel
  f = split_run_path(path)[0] / "config.json"
  try:
    return float(json.loads(f.read_text())["objective"]["lam"])
  except (OSError, KeyError, TypeError, ValueError):
    return None


def expand_modes(modes: Sequence[str]) -> list[str]:
  """'pll' means both 'pll1' and 'pll6' (the paper reports the better per task)."""
  out: list[str] = []
  for m in modes:
    for x in (("pll1", "pll6") if m == "pll" else (m,)):
      scoring.parse_mode(x)  # Raises on an unknown mode.
      if x not in out:
        out.append(x)
  return out


@dataclasses.dataclass
class _TaskRequests:
  examples: list[tasks_lib.Example]
  completions: list[list[str]]
  cond: list[np.ndarray]  # Request indices per example (one per choice).
  uncond: list[np.ndarray] | None  # PMI: request indices with the "Answer:" context.


def build_requests(examples: dict[str, list[tasks_lib.Example]], tokenizer: Any,
                   mmlu_header: str = prompts.MMLU_HEADER
                   ) -> tuple[list[scoring.Request], dict[str, _TaskRequests]]:
  """Unique (context, completion) requests over all tasks (identical pairs are scored once)."""
  index: dict[tuple[str, str], int] = {}
  requests: list[scoring.Request] = []

  def get(ctx: str, comp: str) -> int:
    key = (ctx, comp)
    if key not in index:
      index[key] = len(requests)
      requests.append(scoring.split_encode(tokenizer, ctx, comp))
    return index[key]

  per_task = {}
  for task, exs in examples.items():
    pmi = metrics.NORMALISATION[task] == "pmi"
    comps, cond, uncond = [], [], []
    for ex in exs:
      ctx, cs = prompts.render(ex, mmlu_header)
      comps.append(cs)
      cond.append(np.array([get(ctx, c) for c in cs]))
      if pmi:
        uncond.append(np.array([get(prompts.UNCONDITIONAL_CONTEXT, c) for c in cs]))
    per_task[task] = _TaskRequests(exs, comps, cond, uncond if pmi else None)
  return requests, per_task


def load_examples(task_names: Sequence[str], data_dir: str | os.PathLike, limit: int | None,
                  seed: int) -> dict[str, list[tasks_lib.Example]]:
  """Loads (and validates) every task before any scoring."""
  for t in task_names:
    if t not in tasks_lib.LOADERS:
      raise tasks_lib.TaskDataError(
          f"unknown task '{t}'; known tasks: {', '.join(tasks_lib.TASKS)}")
  return {t: tasks_lib.load_task(t, data_dir, limit, seed) for t in task_names}


def evaluate(params: Any, model_cfg: Any, tokenizer: Any,
             tasks: Sequence[str] = tasks_lib.TASKS, modes: Sequence[str] = DEFAULT_MODES, *,
             data_dir: str | os.PathLike = DEFAULT_DATA_DIR, limit: int | None = None,
             seed: int = 0, mc_grid: int = 32, mc_seed: int = 0, row_len: int = 512,
             batch_tokens: int = 16384, mesh: Any = None, step: int | None = None,
             checkpoint: str | None = None, mmlu_header: str = prompts.MMLU_HEADER,
             apply_fn: Callable[..., Any] | None = None,
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Scores `tasks` in `modes` and returns the results dict (see module docstring)."""
  mode_list = expand_modes(modes)
  examples = load_examples(tasks, data_dir, limit, seed)
  requests, per_task = build_requests(examples, tokenizer, mmlu_header)
  scorer = scoring.Scorer(params, model_cfg, mesh=mesh, row_len=row_len,
                          batch_tokens=batch_tokens, apply_fn=apply_fn)
  cfg_dict = (dataclasses.asdict(model_cfg) if dataclasses.is_dataclass(model_cfg)
              else dict(vars(model_cfg)))
  results: dict[str, Any] = {
      "config": {
          "tasks": list(tasks), "modes": mode_list, "limit": limit, "seed": seed,
          "mc_grid": mc_grid, "mc_seed": mc_seed, "row_len": scorer.row_len,
          "batch_tokens": batch_tokens, "data_dir": str(data_dir), "mmlu_header": mmlu_header,
          "num_devices": scorer.n_dev, "model": {k: str(v) if not isinstance(
              v, (int, float, bool, str, type(None))) else v for k, v in cfg_dict.items()},
          "tokenizer_checksum": getattr(tokenizer, "checksum", None),
          "num_requests": len(requests),
      },
      "step": step, "checkpoint": checkpoint, "timing": {},
      "tasks": {t: {"normalization": metrics.NORMALISATION[t],
                    "baseline": tasks_lib.random_baseline(t, examples[t]),
                    "num_examples": len(examples[t]), "modes": {}} for t in tasks},
  }
  if callable(results["config"]["tokenizer_checksum"]):
    results["config"]["tokenizer_checksum"] = results["config"]["tokenizer_checksum"]()
  for mode in mode_list:
    before = dict(scorer.stats)
    t0 = time.perf_counter()
    ll = scorer.score(requests, mode, mc_grid_size=mc_grid, mc_seed=mc_seed)
    secs = time.perf_counter() - t0
    results["timing"][mode] = {
        "seconds": secs, **{k: scorer.stats[k] - before[k] for k in scorer.stats}}
    for task, tr in per_task.items():
      results["tasks"][task]["modes"][mode] = metrics.summarise_task(
          task, tr.examples, tr.completions, [ll[i] for i in tr.cond],
          None if tr.uncond is None else [ll[i] for i in tr.uncond])
    if log:
      log(f"{mode}: {len(requests)} requests, "
          f"{results['timing'][mode]['unit_tokens']} tokens in {secs:.1f}s")
  metrics.add_pll_best(results)
  metrics.add_headline(results)
  return results


def write_results(results: dict[str, Any], out: str | os.PathLike) -> tuple[pathlib.Path,
                                                                            pathlib.Path]:
  """Writes `out` (JSON) and `out` with suffix .md (Markdown), each atomically."""
  out = pathlib.Path(out)
  md = out.with_suffix(".md")
  out.parent.mkdir(parents=True, exist_ok=True)
  for path, text in ((out, json.dumps(results, indent=2, sort_keys=True) + "\n"),
                     (md, metrics.to_markdown(results))):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
  return out, md


# ----------------------------------------------------------------------------------------------
# CLI.


class UsageError(ValueError):
  """Bad command-line input (reported in one line, exit code 2)."""


def _model_config(name: str, vocab_size: int) -> Any:
  from dualjax import model as model_lib  # pylint: disable=import-outside-toplevel
  if name == "tiny":
    return model_lib.ModelConfig(vocab_size=vocab_size, num_layers=2, d_model=64, num_heads=4,
                                 head_dim=16, mlp_dim=128, max_seq_len=512,
                                 compute_dtype="float32")
  if name == "470m":
    return model_lib.ModelConfig(vocab_size=vocab_size)
  raise UsageError(f"--model: unknown model '{name}' (tiny, 470m)")


def load_model(args: argparse.Namespace) -> tuple[Any, Any, Any, int | None, str | None]:
  """(params, model_cfg, tokenizer, step, checkpoint) from the command line."""
  if args.random_init:
    if not args.tokenizer:
      raise UsageError("--random_init needs --tokenizer=PATH (a SentencePiece model)")
    if not pathlib.Path(args.tokenizer).is_file():
      raise UsageError(f"--tokenizer: file not found: {args.tokenizer}")
    import jax  # pylint: disable=import-outside-toplevel
    from dualjax import model as model_lib  # pylint: disable=import-outside-toplevel
    from dualjax import tokenizer as tok_lib  # pylint: disable=import-outside-toplevel
    tok = tok_lib.load_tokenizer(args.tokenizer)
    cfg = _model_config(args.model, tok.vocab_size)
    return model_lib.init(cfg, jax.random.key(args.init_seed)), cfg, tok, None, None
  path = args.checkpoint or args.workdir
  if not path:
    raise UsageError("give --checkpoint=PATH, --workdir=DIR or --random_init")
  if not pathlib.Path(path).exists():
    raise UsageError(f"{'--checkpoint' if args.checkpoint else '--workdir'}: not found: {path}")
  try:
    from dualjax.checkpoint import load_for_eval  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise UsageError("dualjax.checkpoint.load_for_eval(path) -> (params, model_cfg, tokenizer) "
                     "is not available in this version of the trainer") from None
  loaded = load_for_eval(path)
  params, cfg, tok = loaded[:3]
  step = loaded[3] if len(loaded) > 3 else None
  if step is None:
    m = re.search(r"(\d+)/?$", str(path))
    step = int(m.group(1)) if m else None
  return params, cfg, tok, step, str(path)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m dualjax.evaluate", description=__doc__.split("\n")[0])
  src = p.add_mutually_exclusive_group()
  src.add_argument("--checkpoint", help="a checkpoint (step) directory")
  src.add_argument("--workdir", help="a training workdir (its latest checkpoint)")
  src.add_argument("--random_init", action="store_true", help="a freshly initialised model")
  p.add_argument("--model", default="tiny", help="with --random_init: tiny | 470m")
  p.add_argument("--tokenizer", help="with --random_init: SentencePiece model file")
  p.add_argument("--init_seed", type=int, default=0)
  p.add_argument("--tasks", default=",".join(tasks_lib.TASKS))
  p.add_argument("--modes", default=None,
                 help="ar,prefix,pll,pll1,pll6,mc (default: those the trained model supports: "
                      "ar for lam=1, pll,mc for lam=0, all four for a dual model)")
  p.add_argument("--data_dir", default=str(DEFAULT_DATA_DIR),
                 help="the task files (eval-data layout), or tfds:DIR for prepared TFDS datasets "
                      "(all tasks but mmlu and siqa, which TFDS lacks: pass --tasks without them)")
  p.add_argument("--limit", type=int, default=None, help="items per task (fixed-seed subsample)")
  p.add_argument("--seed", type=int, default=0, help="subsample seed")
  p.add_argument("--mc_grid", type=int, default=32, help="grid points of t for mode mc")
  p.add_argument("--mc_seed", type=int, default=0)
  p.add_argument("--row_len", type=int, default=512)
  p.add_argument("--batch_tokens", type=int, default=16384)
  p.add_argument("--out", default="eval_results.json")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    task_names = [t for t in args.tasks.split(",") if t]
    if args.modes is None:
      lam = None if args.random_init else trained_lam(args.checkpoint or args.workdir or "")
      modes = expand_modes(supported_modes(lam))
    else:
      modes = expand_modes([m for m in args.modes.split(",") if m])
    if args.limit is not None and args.limit < 1:
      raise UsageError(f"--limit must be ≥ 1, got {args.limit}")
    if args.mc_grid < 1:
      raise UsageError(f"--mc_grid must be ≥ 1, got {args.mc_grid}")
    load_examples(task_names, args.data_dir, args.limit, args.seed)  # Validate files first.
    params, cfg, tok, step, ckpt = load_model(args)
  except (UsageError, tasks_lib.TaskDataError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  results = evaluate(params, cfg, tok, task_names, modes, data_dir=args.data_dir,
                     limit=args.limit, seed=args.seed, mc_grid=args.mc_grid,
                     mc_seed=args.mc_seed, row_len=args.row_len, batch_tokens=args.batch_tokens,
                     step=step, checkpoint=ckpt, log=lambda s: print(s, file=sys.stderr))
  out, md = write_results(results, args.out)
  print(metrics.to_markdown(results))
  print(f"wrote {out} and {md}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())

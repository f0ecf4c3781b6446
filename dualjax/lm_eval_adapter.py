"""lm-evaluation-harness adapter: any lm-eval task on a dualjax model, registered as "dualjax".

  python -m dualjax.lm_eval_adapter run --model dualjax --model_args workdir=DIR[,step=N] \\
      --tasks arc_easy [--limit 100]          (lm-eval's own CLI, with this model registered)

or in Python: `import dualjax.lm_eval_adapter` then `lm_eval.simple_evaluate(model="dualjax",
model_args="workdir=DIR")`, or pass a `DualjaxLM` instance (`DualjaxLM(model=trained.load(p))`).
lm-eval's own task configs download their data; `suite_task_dict` builds lm-eval tasks from
dualjax's task files and prompts instead (no network).

DualjaxLM (the AR mode, causal attention):
- `loglikelihood`: (context, continuation) is encoded jointly and split at the character boundary
  (`scoring.split_encode`, no tokenisation seam), `<s>` (the tokenizer's) in front, oldest context
  tokens dropped beyond max_seq_len, and scored by dualjax's packed `Scorer` in mode 'ar': the same
  requests and code as `dualjax.evaluation.suite`'s AR mode (an empty context is just `<s>`,
  lm-eval's prefix token). is_greedy (lm-eval: every continuation token is the argmax, first index
  on ties) is a second pass of the same Scorer over the one-hot argmax distribution: its
  log-likelihood is 0 exactly when the continuation is the greedy one. `greedy=False` (a model
  arg) skips that pass, half the time, and reports is_greedy False: only for tasks that do not
  use it (multiple-choice acc / acc_norm do not).
- `loglikelihood_rolling`: lm-eval's disjoint rolling windows
  (`lm_eval.utils.get_rolling_token_windows`, max_seq_len - 2 tokens per window so that `<s>` +
  window fits the Scorer); every window starts with `<s>` like every dualjax scoring sequence.
- `generate_until`: dualjax.generate's AR sampler with the KV cache: greedy unless do_sample with
  temperature > 0 (top_k / top_p honoured); a row stops at eos or max_gen_toks (capped so that
  the prompt keeps at least `<s>`; the oldest context tokens are dropped to make room); the text
  is cut at the first `until` string. Prompts are batched `batch_size` at a time, left-padded to
  a power-of-two length.
"""

import logging
import math
import sys
from typing import Any, Sequence

import datasets
import jax
import jax.numpy as jnp
# lm-eval's own models first: its registry imports them only while it is empty.
import lm_eval.models  # noqa: F401
import lm_eval.utils
import numpy as np
from lm_eval.api.group import Group
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.api.task import ConfigurableTask
from lm_eval.config.group import AggMetricConfig

from dualjax import generate as gen_lib
from dualjax import model as model_lib
from dualjax import trained as trained_lib
from dualjax.evaluation import metrics, prompts, scoring, tasks as tasks_lib

NAME = "dualjax"
_GREEDY_THRESHOLD = -0.5  # a greedy continuation scores 0, any other <= -1e9


def greedy_apply(params: Any, tokens_BxL: jax.Array, segment_ids_BxL: jax.Array, *, cfg: Any,
                 mode: str, bidir_BxL: jax.Array | None = None) -> jax.Array:
  """Logits of the one-hot argmax distribution of `model.apply` (0 at the first argmax, -1e9
  elsewhere): a continuation's log-likelihood under it is 0 iff it is the greedy one."""
  logits = model_lib.apply(params, tokens_BxL, segment_ids_BxL, cfg=cfg, mode=mode,
                           bidir_BxL=bidir_BxL)
  first_max = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=bool)
  return jnp.where(first_max, 0.0, -1e9)


def _as_int(x: Any, name: str) -> int | None:
  if x is None or x == "":
    return None
  try:
    return int(x)
  except (TypeError, ValueError):
    raise ValueError(f"model_args {name}={x!r} must be an integer") from None


@register_model(NAME)
class DualjaxLM(LM):
  """A dualjax model (workdir or `trained.Trained`) behind lm-eval's `LM` interface."""

  def __init__(self, workdir: str | None = None, step: int | str | None = None, *,
               model: trained_lib.Trained | None = None, row_len: int = 512,
               batch_tokens: int = 16384, batch_size: int | str = 8, max_gen_toks: int = 256,
               seed: int = 0, greedy: bool | str = True, **unused: Any):
    super().__init__()
    if (workdir is None) == (model is None):
      raise ValueError("DualjaxLM needs workdir=DIR (model_args) or model=trained.load(DIR)")
    # lm-eval passes its own settings (device, max_batch_size); JAX picks its devices.
    unknown = sorted(set(unused) - {"device", "max_batch_size"})
    if unknown:
      logging.getLogger(__name__).warning("DualjaxLM ignores model_args %s", ", ".join(unknown))
    self.model = model or trained_lib.load(workdir, step=_as_int(step, "step"))
    self.cfg, self.tok = self.model.model_cfg, self.model.tokenizer
    self.bos_id, self.mask_id = scoring.special_ids(self.tok)
    auto = isinstance(batch_size, str) and batch_size.startswith("auto")  # lm-eval's "auto[:N]"
    self.batch_size = max(1, _as_int(8 if auto else batch_size, "batch_size"))
    self.max_gen_toks = _as_int(max_gen_toks, "max_gen_toks")
    self.seed = _as_int(seed, "seed")
    self.greedy = greedy not in (False, "False", "false", "0", 0)
    kw = {"row_len": _as_int(row_len, "row_len"), "batch_tokens": _as_int(batch_tokens,
                                                                          "batch_tokens"),
          "bos_id": self.bos_id, "mask_id": self.mask_id}
    self.scorer = scoring.Scorer(self.model.params, self.cfg, **kw)
    self.greedy_scorer = scoring.Scorer(self.scorer.params, self.cfg, apply_fn=greedy_apply,
                                        mesh=self.scorer.mesh, **kw)

  @property
  def max_length(self) -> int:
    return int(self.cfg.max_seq_len)

  @property
  def eot_token_id(self) -> int:
    return int(self.tok.eos_id)

  @property
  def prefix_token_id(self) -> int:
    return self.bos_id

  # -- log-likelihoods ---------------------------------------------------------------------------

  def score_requests(self, reqs: Sequence[scoring.Request], *, greedy: bool = True
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(log-likelihood float64[R], is_greedy bool[R]) of token-level requests, mode 'ar'."""
    ll = self.scorer.score(reqs, "ar")
    if not greedy:
      return ll, np.zeros(len(reqs), bool)
    return ll, self.greedy_scorer.score(reqs, "ar") > _GREEDY_THRESHOLD

  def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
    index: dict[tuple[str, str], int] = {}
    reqs: list[scoring.Request] = []
    which = []
    for inst in requests:
      ctx, cont = inst.args
      if (ctx, cont) not in index:
        index[(ctx, cont)] = len(reqs)
        reqs.append(scoring.split_encode(self.tok, ctx, cont))
      which.append(index[(ctx, cont)])
    ll, greedy = (self.score_requests(reqs, greedy=self.greedy) if reqs
                  else (np.zeros(0), np.zeros(0, bool)))
    out = []
    for inst, i in zip(requests, which):
      answer = (float(ll[i]), bool(greedy[i]))
      self.cache_hook.add_partial("loglikelihood", inst.args, answer)
      out.append(answer)
    return out

  def rolling_requests(self, text: str) -> list[scoring.Request]:
    """lm-eval's disjoint rolling windows of `text` as scoring requests (`<s>` in front)."""
    windows = lm_eval.utils.get_rolling_token_windows(
        token_list=list(self.tok.encode(text)), prefix_token=self.bos_id,
        max_seq_len=self.max_length - 2, context_len=1)
    out = []
    for i, w in enumerate(map(lm_eval.utils.make_disjoint_window, windows)):
      ctx, comp = w
      out.append(scoring.Request(() if i == 0 else tuple(ctx), tuple(comp)))
    return out

  def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
    reqs, owner = [], []
    for r, inst in enumerate(requests):
      windows = self.rolling_requests(inst.args[0])
      reqs += windows
      owner += [r] * len(windows)
    ll = self.scorer.score(reqs, "ar") if reqs else np.zeros(0)
    totals = np.bincount(np.asarray(owner, np.int64), weights=ll, minlength=len(requests))
    out = []
    for inst, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", inst.args, float(total))
      out.append(float(total))
    return out

  # -- generation --------------------------------------------------------------------------------

  def sampling_settings(self, gen_kwargs: dict[str, Any]) -> tuple[list[str], int, dict[str, Any]]:
    """(until strings, max new tokens, sampler settings) of lm-eval's gen_kwargs."""
    kw = dict(gen_kwargs or {})
    until = kw.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    n = _as_int(kw.pop("max_gen_toks", self.max_gen_toks), "max_gen_toks")
    n = max(1, min(n, self.max_length - 1))
    do_sample = bool(kw.pop("do_sample", False))
    temperature = float(kw.pop("temperature", 1.0 if do_sample else 0.0) or 0.0)
    settings = {"temperature": temperature if do_sample else 0.0,
                "top_k": int(kw.pop("top_k", 0) or 0),
                "top_p": float(kw.pop("top_p", 1.0) or 1.0)}
    return until, n, settings

  def generate_until(self, requests: list[Any]) -> list[str]:
    groups: dict[tuple, list[int]] = {}
    parsed = []
    for r, inst in enumerate(requests):
      until, n, settings = self.sampling_settings(inst.args[1])
      parsed.append(until)
      groups.setdefault((n, *sorted(settings.items())), []).append(r)
    texts: list[str] = [""] * len(requests)
    key = jax.random.key(self.seed)
    for (n, *settings), members in groups.items():
      keep = self.max_length - n - 1  # context tokens after <s>
      ids = [[self.bos_id] + (list(self.tok.encode(requests[r].args[0]))[-keep:] if keep else [])
             for r in members]
      bs = min(self.batch_size, len(ids))
      for c0 in range(0, len(ids), bs):
        chunk = ids[c0:c0 + bs]
        chunk += [chunk[-1]] * (bs - len(chunk))
        longest = max(map(len, chunk))
        P = min(1 << math.ceil(math.log2(longest)), self.max_length - n)
        tokens, seg = gen_lib.pad_prompts(chunk, pad_id=self.tok.pad_id, length=max(P, longest))
        out = gen_lib.generate_ar(
            self.model.params, self.cfg, tokens, seg, key=jax.random.fold_in(key, members[c0]),
            max_new_tokens=n, stop_ids=(self.tok.eos_id,), pad_id=self.tok.pad_id,
            **dict(settings))
        for b, text in enumerate(gen_lib.completions(self.tok, out)[:len(members) - c0]):
          r = members[c0 + b]
          cuts = [text.find(u) for u in parsed[r] if u and u in text]
          texts[r] = text[:min(cuts)] if cuts else text
          self.cache_hook.add_partial("generate_until", requests[r].args, texts[r])
    return texts


# ------------------------------------------------------------------------------------------------
# dualjax's suite tasks as local lm-eval tasks.

class LocalTask(ConfigurableTask):
  """A ConfigurableTask over documents in memory (its `download` reads nothing)."""

  def __init__(self, docs: Sequence[dict[str, Any]], config: dict[str, Any]):
    self._local_docs = list(docs)
    super().__init__(config=config)

  def download(self, dataset_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
    self.dataset = datasets.DatasetDict({"test": datasets.Dataset.from_list(self._local_docs)})


def suite_task(name: str, examples: Sequence[tasks_lib.Example]) -> LocalTask:
  """An lm-eval multiple-choice task over `examples` with dualjax's prompts (prompts.render):
  context = the rendered context; continuation = target_delimiter + choice = the rendered
  completion (delimiter " ", or "" for BLiMP's bare sentence after an empty context). Metrics as
  lm-eval's own config of the task: acc, plus acc_norm except for BLiMP (lm-eval's acc_norm
  divides by len(choice), i.e. without the delimiter)."""
  blimp = examples[0].task == "blimp"
  delimiter = "" if blimp else " "
  docs = []
  for ex in examples:
    ctx, comps = prompts.render(ex)
    if comps != [delimiter + c for c in ex.choices]:
      raise ValueError(f"{ex.task} {ex.uid}: completions are not '{delimiter}' + choice")
    docs.append({"uid": ex.uid, "subtask": ex.subtask, "context": ctx,
                 "choices": list(ex.choices), "gold": int(ex.gold)})
  metric_list = [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                 for m in (("acc",) if blimp else ("acc", "acc_norm"))]
  return LocalTask(docs, {
      "task": name, "output_type": "multiple_choice", "test_split": "test",
      "doc_to_text": lambda d: d["context"], "doc_to_choice": lambda d: d["choices"],
      "doc_to_target": lambda d: d["gold"], "target_delimiter": delimiter,
      "metric_list": metric_list, "num_fewshot": 0, "metadata": {"version": 0}})


def suite_task_dict(examples: dict[str, Sequence[tasks_lib.Example]]) -> dict[str, Any]:
  """lm-eval's task dict ({'tasks', 'groups', 'group_map'}) for `lm_eval.evaluator.evaluate`:
  one task `dualjax_<task>` per task; macro-averaged tasks (BLiMP, MMLU) become a group
  `dualjax_<task>` of one task per sub-task, aggregated like lm-eval's own groups (mean of the
  sub-task accuracies, not weighted by size)."""
  task_objs, groups, group_map = {}, {}, {}
  for task, exs in examples.items():
    name = f"dualjax_{task}"
    if task not in metrics.MACRO_AVERAGED:
      task_objs[name] = suite_task(name, exs)
      continue
    subs: dict[str, list[tasks_lib.Example]] = {}
    for ex in exs:
      subs.setdefault(ex.subtask, []).append(ex)
    group = Group(name=name, aggregate_metric_list=[
        AggMetricConfig(metric=m, aggregation="mean", weight_by_size=False)
        for m in (("acc",) if task == "blimp" else ("acc", "acc_norm"))])
    group_map[name] = []
    for sub, sub_exs in sorted(subs.items()):
      t = suite_task(f"{name}_{sub}", sub_exs)
      task_objs[t.config.task] = t
      group.add(t)
      group_map[name].append(t.config.task)
    groups[name] = group
  return {"tasks": task_objs, "groups": groups, "group_map": group_map}


def main(argv: Sequence[str] | None = None) -> None:
  """lm-eval's command line (`argv`, default sys.argv[1:]) with the "dualjax" model registered."""
  from lm_eval import __main__ as lm_eval_main  # pylint: disable=import-outside-toplevel
  if argv is not None:
    sys.argv = [sys.argv[0], *argv]  # lm-eval's CLI reads sys.argv
  lm_eval_main.cli_evaluate()


if __name__ == "__main__":
  main()

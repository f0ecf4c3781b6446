"""OLMES "cloze" (RC) prompts, zero-shot (DESIGN.md §7).

`render(example)` gives the context string and one completion string per choice; the scorer
encodes `context + completion` jointly and splits at the character boundary.
"""

from dualjax.evaluation.tasks import Example

UNCONDITIONAL_CONTEXT = "Answer:"  # PMI's unconditional context.
MMLU_HEADER = "The following are multiple choice questions (with answers) about {subject}.\n\n"


def render_context(ex: Example, mmlu_header: str = MMLU_HEADER) -> str:
  """The prompt (context) of `ex` for its task's template."""
  f = ex.fields
  if ex.task in ("arc_easy", "arc_challenge", "csqa", "openbookqa"):
    return f"Question: {f['question']}\nAnswer:"
  if ex.task == "blimp":
    return ""
  if ex.task == "hellaswag":
    return f["query"]
  if ex.task == "mmlu":
    # lm-eval strips MMLU questions (some CSV fields end in a newline or space).
    header = mmlu_header.format(subject=f["subject"].replace("_", " "))
    return f"{header}Question: {f['question'].strip()}\nAnswer:"
  if ex.task == "piqa":
    return f"Goal: {f['goal']}\nAnswer:"
  if ex.task == "siqa":
    return f"Question: {f['context']} {f['question']}\nAnswer:"
  raise ValueError(f"no prompt template for task '{ex.task}'")


def render_completions(ex: Example) -> list[str]:
  """One completion per choice: the whole sentence for BLiMP, else ' ' + choice."""
  if ex.task == "blimp":
    return list(ex.choices)
  return [" " + c for c in ex.choices]


def render(ex: Example, mmlu_header: str = MMLU_HEADER) -> tuple[str, list[str]]:
  """(context, completions) of `ex`."""
  return render_context(ex, mmlu_header), render_completions(ex)

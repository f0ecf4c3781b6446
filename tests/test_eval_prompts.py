"""One rendered prompt and completion per task equals the DESIGN.md §7 template, character for character."""

import pytest

from dualjax.evaluation import prompts, tasks


@pytest.fixture(scope="module")
def by_uid(eval_data_dir):
  return {t: {e.uid: e for e in tasks.load_task(t, eval_data_dir)} for t in tasks.TASKS}


CASES = [
    ("arc_easy", "Mercury_417466",
     "Question: Which statement best explains why photosynthesis is the foundation of most food"
     " webs?\nAnswer:", " Sunlight is the source of energy for nearly all ecosystems."),
    ("arc_challenge", "NYSEDREGENTS_2010_4_4",
     "Question: A toy truck rolls over a smooth surface. If the surface is covered with sand, the"
     " truck will most likely roll\nAnswer:", " slower"),
    ("blimp", "adjunct_island/0", "", "Who should Derek hug after shocking Richard?"),
    ("csqa", "1afa02df02c908a558b4036e80242fac",
     "Question: A revolving door is convenient for two direction travel, but it also serves as a"
     " security measure at a what?\nAnswer:", " bank"),
    ("hellaswag", "0", "Roof shingle removal: A man is sitting on a roof. he",
     " is using wrap to wrap a pair of skis."),
    ("mmlu", "abstract_algebra/0",
     "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
     "Question: Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over"
     " Q.\nAnswer:", " 0"),
    ("openbookqa", "8-343",
     "Question: A person wants to start saving money so that they can afford a nice vacation at the"
     " end of the year. After looking over their budget and expenses, they decide the best way to"
     " save money is to\nAnswer:", " make more phone calls"),
    ("piqa", "1", "Goal: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
     " Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper"
     " strips, you will also need to supply it with a water bottle and a food dish."),
    ("siqa", "1",
     "Question: Tracy didn't go home that evening and resisted Riley's attacks. What does Tracy"
     " need to do before this?\nAnswer:", " make a new plan"),
]


@pytest.mark.parametrize("task,uid,context,completion", CASES, ids=[c[0] for c in CASES])
def test_template(by_uid, task, uid, context, completion):
  ctx, comps = prompts.render(by_uid[task][uid])
  assert ctx == context
  assert comps[0] == completion
  assert len(comps) == len(by_uid[task][uid].choices)


def test_mmlu_strips_question_and_header_is_configurable(by_uid):
  ex = by_uid["mmlu"]["high_school_computer_science/6"]
  ctx = prompts.render_context(ex, mmlu_header="[{subject}] ")
  assert ctx.startswith("[high school computer science] Question: A large data set")
  assert ctx.endswith("analyzing only information in the data set?\nAnswer:")


def test_unconditional_context():
  assert prompts.UNCONDITIONAL_CONTEXT == "Answer:"

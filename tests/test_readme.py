"""The README's "Train on your own data" section, run verbatim (issue 13 item 11)."""

import json
import os
import pathlib
import re
import subprocess

import pytest
import zstandard

from dualjax import metrics as metrics_lib
from dualjax.evaluation import tasks

REPO = pathlib.Path(__file__).resolve().parents[1]
EVAL_DATA = REPO.parent / "shared" / "eval-data"


def _section(title: str) -> str:
  readme = (REPO / "README.md").read_text()
  m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", readme, re.S | re.M)
  assert m, f"README has no section {title!r}"
  return m.group(1)


def test_own_data_section_names_every_task_directory():
  text = _section("Train on your own data")
  for task in tasks.TASKS:
    assert f"`{task}/`" in text, task


@pytest.mark.slow
@pytest.mark.skipif(not EVAL_DATA.is_dir(), reason=f"evaluation data not found at {EVAL_DATA} "
                    "(the README's evaluate step needs it)")
def test_own_data_section_runs_verbatim(tmp_path):
  """prepare -> train -> evaluate exactly as written, from a directory laid out like the repo
  root (configs/, my_corpus/*.jsonl, eval-data/), on one CPU device as on a fresh machine."""
  script = re.search(r"```bash\n(.*?)```", _section("Train on your own data"), re.S).group(1)
  (tmp_path / "configs").symlink_to(REPO / "configs")
  (tmp_path / "eval-data").symlink_to(EVAL_DATA)
  corpus = tmp_path / "my_corpus"
  corpus.mkdir()
  # The user's documents: the embedded corpus's training text as plain JSONL.
  with open(REPO / "dualjax" / "corpus" / "train.jsonl.zst", "rb") as f:
    lines = zstandard.ZstdDecompressor().stream_reader(f).read().decode().splitlines()
  texts = [json.loads(l)["text"] for l in lines if l.strip()]
  half = len(texts) // 2
  for i, part in enumerate((texts[:half], texts[half:])):
    (corpus / f"part{i}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="",
             PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                     capture_output=True, text=True, timeout=900, check=False)
  assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
  prepared = json.loads((tmp_path / "runs" / "my_prepared" / "manifest.json").read_text())
  assert "my_corpus" in json.dumps(prepared)
  val = metrics_lib.read_metrics(tmp_path / "runs" / "mine", "val")
  assert val[max(val)]["ar_loss"] < val[min(val)]["ar_loss"] - 1.0
  results = sorted((tmp_path / "runs" / "mine" / "eval").glob("*.json"))
  assert results, r.stdout[-2000:]
  res = json.loads(results[-1].read_text())
  assert set(res["tasks"]) == {"arc_easy", "piqa"}
  assert all(set(t["modes"]) == {"ar", "prefix"} and all(m["n"] == 200 for m in t["modes"].values())
             for t in res["tasks"].values())

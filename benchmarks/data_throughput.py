"""Data throughput: prepare (tokens/s per core) and the Grain pipeline (tokens/s, one process).

  python benchmarks/data_throughput.py [--source=embedded] [--vocab_size=2048] [--seq_len=2048]
"""

import argparse
import os
import pathlib
import tempfile
import time

from dualjax import pipeline
from dualjax import prepare as prepare_lib


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--source", default="embedded")
  ap.add_argument("--vocab_size", type=int, default=2048)
  ap.add_argument("--num_workers", type=int, default=0, help="0 = all cores")
  ap.add_argument("--seq_len", type=int, default=2048)
  ap.add_argument("--global_batch", type=int, default=64)
  ap.add_argument("--repetitions", type=int, default=4)
  a = ap.parse_args()
  workers = a.num_workers or os.cpu_count() or 1
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / "prep"
    t = time.perf_counter()
    m = prepare_lib.prepare(a.source, out, vocab_size=a.vocab_size, num_workers=workers, verbose=False)
    wall = time.perf_counter() - t
    tokens = m["train"]["tokens"] + m["val"]["tokens"]
    s = m["stats"]
    print(f"prepare: {tokens:,} tokens, {s['characters']:,} chars, {workers} worker(s); "
          f"tokenize {s['tokenize_seconds']:.2f}s -> {tokens / s['tokenize_seconds'] / workers:,.0f} "
          f"tokens/s per core; whole run incl. tokenizer training {wall:.2f}s")
    for threads in (1, 4):
      budget = m["train"]["tokens"]  # the whole training set once per epoch ...
      ds = pipeline.make_train_dataset(
          out, seq_len=a.seq_len, global_batch=a.global_batch, token_budget=budget * a.repetitions // 1,
          repetitions=a.repetitions, seed=0, process_index=0, process_count=1, num_threads=threads)
      n, t = 0, time.perf_counter()
      for b in ds:
        n += b["tokens"].size
      dt = time.perf_counter() - t
      print(f"pipeline: seq_len {a.seq_len}, global batch {a.global_batch}, r={a.repetitions}, "
            f"{threads} thread(s): {n:,} tokens in {dt:.2f}s -> {n / dt:,.0f} tokens/s")


if __name__ == "__main__":
  main()

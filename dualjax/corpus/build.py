"""Rebuilds the embedded corpus (train.jsonl.zst, val.jsonl.zst) from the Debian packages.

Needs (as root): `apt-get install -y bible-kjv bible-kjv-text jargon-text dict-devil`, and the
sentencepiece 0.2.0 source distribution for Botchan:
`pip download --no-deps --no-binary :all: sentencepiece==0.2.0 -d /tmp/sp && tar xzf ...`.

  python -m dualjax.corpus.build --botchan=/tmp/sp/sentencepiece-0.2.0/test/botchan.txt

Documents: KJV chapters, Jargon File chapters/glossary entries/appendix sections, Devil's
Dictionary entries, Botchan chapters. The validation part is every document whose
sha256(source/id) falls in the lowest VAL_FRACTION of the hash range (deterministic, disjoint).
See PROVENANCE.md.
"""

import argparse
import gzip
import hashlib
import json
import pathlib
import re
import subprocess
import textwrap

import zstandard

HERE = pathlib.Path(__file__).resolve().parent
VAL_FRACTION = 0.02
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _unwrap(block: str) -> str:
  """Joins hard-wrapped prose lines of each paragraph; keeps indented (verse/code) paragraphs."""
  out = []
  for para in re.split(r"\n[ \t]*\n", block.strip("\n")):
    lines = para.split("\n")
    if not para.strip():
      continue
    if all(not l.startswith((" ", "\t")) for l in lines[1:]) and len(lines) > 1:
      out.append(" ".join(l.strip() for l in lines))
    else:
      out.append(para.rstrip())
  return "\n\n".join(out)


def kjv_docs() -> list[dict]:
  """One document per chapter: 'Book N' then the verses (numbers dropped), one per line."""
  text = subprocess.run(["bible", "-l100000", "Gen1:1-Rev22:21"], check=True,
                        capture_output=True, text=True).stdout
  docs, title, verses = [], None, []
  for line in text.split("\n"):
    if not line.strip():
      continue
    m = re.match(r"^\s+\d+ (.*)$", line)
    if m:
      verses.append(m.group(1).strip())
      continue
    if title:
      docs.append((title, verses))
    title, verses = line.strip(), []
  docs.append((title, verses))
  assert len(docs) == 1189, len(docs)
  return [{"source": "kjv", "id": t, "text": t + "\n\n" + "\n".join(v)} for t, v in docs]


def jargon_docs(path: str = "/usr/share/doc/jargon-text/jargon.txt.gz") -> list[dict]:
  """Chapters 1-12, glossary entries, appendix sections; {cross refs} lose braces, NBSP -> space."""
  lines = gzip.open(path, "rt", encoding="utf-8").read().replace("\xa0", " ").split("\n")
  start = next(i for i, l in enumerate(lines) if l.startswith("Chapter 1."))
  gloss = next(i for i, l in enumerate(lines) if l == "Glossary")
  appx = next(i for i, l in enumerate(lines) if l.startswith("Appendix A."))
  biblio = next(i for i, l in enumerate(lines) if l == "Bibliography")
  docs = []

  def add(title: str, body: list[str]):
    body_text = textwrap.dedent("\n".join(body))
    body_text = re.sub(r"[{}]", "", body_text)
    body_text = _unwrap(body_text)
    if body_text.strip():
      docs.append({"source": "jargon", "id": title, "text": f"{title}\n\n{body_text}"})

  def sections(lo: int, hi: int, is_head):
    title, body = None, []
    for l in lines[lo:hi]:
      if is_head(l):
        if title:
          add(title, body)
        title, body = l.strip(), []
      else:
        body.append(l)
    if title:
      add(title, body)

  sections(start, gloss, lambda l: l.startswith("Chapter "))
  # Glossary entries: '   :headword: pronunciation, pos.'
  entry_start = next(i for i in range(gloss, appx) if lines[i].startswith("   :"))
  title, body = None, []
  for l in lines[entry_start:appx]:
    m = re.match(r"^   :(.+?):(.*)$", l)
    if m:
      if title:
        add(title, body)
      title, body = m.group(1).strip(), [m.group(2).strip()]
    elif re.match(r"^   [A-Z]$", l):  # letter headings between entries
      continue
    else:
      body.append(l)
  add(title, body)
  sections(appx, biblio, lambda l: bool(l) and not l[0].isspace() and not l.startswith(("│", "├", "└", "┌")))
  return docs


def devil_docs(dict_path: str = "/usr/share/dictd/devil.dict.dz",
               index_path: str = "/usr/share/dictd/devil.index") -> list[dict]:
  """One document per dictionary entry (dictd index offsets); _italics_ markers dropped."""
  data = gzip.open(dict_path, "rb").read()

  def num(s: str) -> int:
    n = 0
    for c in s:
      n = n * 64 + _B64.index(c)
    return n

  seen, docs = set(), []
  for line in open(index_path, encoding="utf-8"):
    word, off, length = line.rstrip("\n").split("\t")
    if word.startswith("00database"):
      continue
    off, length = num(off), num(length)
    if off in seen:
      continue
    seen.add(off)
    text = data[off:off + length].decode("utf-8")
    text = re.sub(r"(?<!\w)_([^_]+)_(?!\w)", r"\1", text)
    text = _unwrap(text)
    docs.append({"source": "devil", "id": text.split(",")[0].split("\n")[0].strip(), "text": text})
  return docs


def botchan_docs(path: str) -> list[dict]:
  """Gutenberg header, licence and transcriber's notes removed; the preface and 11 chapters."""
  text = open(path, encoding="utf-8-sig").read().replace("\r\n", "\n")
  body = text.split("*** START OF THIS PROJECT GUTENBERG EBOOK BOTCHAN (MASTER DARLING) ***")[1]
  body = body.split("--(THE END)--")[0] + "--(THE END)--"  # drops the transcriber's notes
  parts = re.split(r"\n(CHAPTER [IVX]+)\.?\n", body)
  # Paragraphs are not blank-line separated here, so the line breaks are kept as they are.
  docs = [{"source": "botchan", "id": "PREFACE", "text": parts[0].strip()}]
  for title, chapter in zip(parts[1::2], parts[2::2]):
    docs.append({"source": "botchan", "id": title, "text": f"{title}\n\n{chapter.strip()}"})
  assert len(docs) == 12, len(docs)
  return docs


def is_val(doc: dict) -> bool:
  h = hashlib.sha256(f"{doc['source']}/{doc['id']}".encode()).digest()
  return int.from_bytes(h[:8], "big") / 2**64 < VAL_FRACTION


def write(docs: list[dict], path: pathlib.Path) -> None:
  raw = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode()
  path.write_bytes(zstandard.ZstdCompressor(level=19).compress(raw))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--botchan", required=True, help="path to sentencepiece-0.2.0/test/botchan.txt")
  ap.add_argument("--out", default=str(HERE))
  a = ap.parse_args()
  docs = kjv_docs() + jargon_docs() + devil_docs() + botchan_docs(a.botchan)
  ids = [(d["source"], d["id"]) for d in docs]
  # Make ids unique inside a source (repeated headwords get a suffix).
  seen: dict[tuple[str, str], int] = {}
  for d, key in zip(docs, ids):
    n = seen.get(key, 0)
    seen[key] = n + 1
    if n:
      d["id"] = f"{d['id']}#{n + 1}"
  train = [d for d in docs if not is_val(d)]
  val = [d for d in docs if is_val(d)]
  out = pathlib.Path(a.out)
  write(train, out / "train.jsonl.zst")
  write(val, out / "val.jsonl.zst")
  for name, part in (("train", train), ("val", val)):
    by = {}
    for d in part:
      s = by.setdefault(d["source"], [0, 0])
      s[0] += 1
      s[1] += len(d["text"])
    print(name, {k: f"{v[0]} docs, {v[1]:,} chars" for k, v in sorted(by.items())})


if __name__ == "__main__":
  main()

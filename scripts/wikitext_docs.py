"""WikiText-2 (raw, tokenized variant) -> train/val JSONL documents for `distill bench kd` on non-FineWeb text.

    python scripts/wikitext_docs.py ../shared/data/fallback/wikitext2_valid.txt --out-dir W --val-articles 10

One document per article (a line ` = Title = `); the tokenized spacing is undone where it is unambiguous
(` @-@ ` -> `-`, ` , ` -> `, `, ...). The last --val-articles articles are the validation documents, the rest
training: the two never share an article.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

TITLE = re.compile(r"^ = [^=].* = $")
FIXES = [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" , ", ", "), (" . ", ". "), (" ; ", "; "),
         (" : ", ": "), (" 's", "'s"), ("( ", "("), (" )", ")"), (" n't", "n't")]


def detok(line: str) -> str:
    s = line.strip()
    for a, b in FIXES:
        s = s.replace(a, b)
    return re.sub(r" ([.,;:!?])$", r"\1", s)


def articles(text: str) -> list[str]:
    docs: list[list[str]] = []
    for line in text.splitlines():
        if TITLE.match(line):
            docs.append([line.strip(" =")])
        elif docs and line.strip():
            docs[-1].append(detok(line))
    return ["\n".join(d) for d in docs if len(d) > 1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--val-articles", type=int, default=10)
    a = ap.parse_args()
    docs = articles(a.src.read_text(encoding="utf-8"))
    if len(docs) <= a.val_articles:
        raise SystemExit(f"{a.src}: only {len(docs)} articles, need more than --val-articles {a.val_articles}")
    a.out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", docs[: -a.val_articles]), ("val", docs[-a.val_articles:])):
        path = a.out_dir / f"{name}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps({"text": d}) + "\n" for d in part), encoding="utf-8")
        tmp.replace(path)
        print(f"{path}: {len(part)} docs, {sum(len(d.encode()) for d in part):,} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

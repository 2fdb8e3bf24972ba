"""Rebuild distill/assets/demo_corpus.jsonl.xz, the demo's embedded public-domain English corpus.

Source: three public-domain books from the Canterbury corpus as shipped in the PyPI source distribution
of `brotli` (brotli-1.2.1.tar.gz, tests/testdata/): alice29.txt (Lewis Carroll, Alice's Adventures in
Wonderland), asyoulik.txt (Shakespeare, As You Like It), plrabn12.txt (Milton, Paradise Lost; its Project
Gutenberg preamble is cut). Each book is split on blank lines into documents of ~1,500 characters.

    pip download brotli==1.2.1 --no-binary :all: --no-deps -d /tmp/b && python scripts/make_demo_corpus.py /tmp/b/brotli-1.2.1.tar.gz
"""

from __future__ import annotations

import json
import lzma
import re
import sys
import tarfile
from pathlib import Path

BOOKS = {"alice29.txt": "carroll-alice", "asyoulik.txt": "shakespeare-as-you-like-it",
         "plrabn12.txt": "milton-paradise-lost"}
TARGET_CHARS = 1500


def split_docs(text: str) -> list[str]:
    paras = []
    for p in re.split(r"\n\s*\n", text):
        lines = [ln.rstrip() for ln in p.strip("\n").split("\n")]
        # verse has no blank lines: cut very long paragraphs into groups of lines
        for i in range(0, len(lines), 30):
            chunk = "\n".join(lines[i : i + 30]).strip("\n")
            if chunk.strip():
                paras.append(chunk)
    docs, cur = [], []
    for p in paras:
        cur.append(p)
        if sum(len(c) for c in cur) >= TARGET_CHARS:
            docs.append("\n\n".join(cur))
            cur = []
    if cur:
        docs.append("\n\n".join(cur))
    return docs


def main(sdist: str) -> None:
    out = Path(__file__).resolve().parents[1] / "distill" / "assets" / "demo_corpus.jsonl.xz"
    lines = []
    with tarfile.open(sdist) as tar:
        for name, tag in BOOKS.items():
            member = next(m for m in tar.getmembers() if m.name.endswith("tests/testdata/" + name))
            text = tar.extractfile(member).read().decode("latin-1").replace("\r\n", "\n")
            if name == "plrabn12.txt":  # drop the Project Gutenberg preamble before the poem
                text = text[text.index("PARADISE LOST") :] if "PARADISE LOST" in text else text
                text = text[text.index("Book I") :] if "Book I" in text else text
            for i, doc in enumerate(split_docs(text)):
                lines.append(json.dumps({"text": doc, "source": f"{tag}#{i}"}))
    data = ("\n".join(lines) + "\n").encode("utf-8")
    out.write_bytes(lzma.compress(data, preset=9))
    print(f"{out}: {len(lines)} docs, {len(data)} bytes raw, {out.stat().st_size} bytes xz")


if __name__ == "__main__":
    main(sys.argv[1])

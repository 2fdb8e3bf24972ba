"""Document sources for `distill data build|tokenizer --docs SRC`.

SRC is one of
  *.jsonl / *.json      one JSON object per line, the document in field "text" (blank lines skipped)
  *.parquet             a Parquet file with a string column "text" (read in record batches)
  *.txt (or any other)  plain text; documents are separated by one or more blank lines
  hf:REPO[:CONFIG[:SPLIT]]   a Hugging Face dataset streamed with `datasets` (e.g. hf:HuggingFaceFW/fineweb:sample-10BT)
A glob (e.g. "data/*.jsonl") expands to its sorted matches, read one after another.

Every reader is a generator (constant memory); bad input raises DistillError naming the file (and the
line number for JSONL) so the CLI can print one line.
"""

from __future__ import annotations

import glob as _glob
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from distill.errors import DistillError

TEXT_FIELD = "text"


@dataclass(frozen=True)
class HFSpec:
    repo: str
    config: str | None
    split: str


def parse_hf(src: str) -> HFSpec:
    """'hf:REPO[:CONFIG[:SPLIT]]' -> HFSpec (split defaults to 'train')."""
    parts = src[len("hf:"):].split(":")
    if not parts[0] or len(parts) > 3 or any(p == "" for p in parts[1:]):
        raise DistillError(f"--docs {src}: expected hf:REPO[:CONFIG[:SPLIT]]")
    return HFSpec(parts[0], parts[1] if len(parts) > 1 else None, parts[2] if len(parts) > 2 else "train")


def resolve_sources(src: str) -> list[str]:
    """Expand SRC to a list of concrete sources; refuse a missing file or an empty glob."""
    if src.startswith("hf:"):
        parse_hf(src)
        return [src]
    if any(c in src for c in "*?["):
        hits = sorted(_glob.glob(src))
        if not hits:
            raise DistillError(f"{src}: no files match")
        return hits
    if not Path(src).is_file():
        raise DistillError(f"{src}: documents file not found")
    return [src]


def iter_jsonl(path: str) -> Iterator[str]:
    with open(path, "r", encoding="utf-8", errors="strict") as f:
        lineno = 0
        while True:
            try:
                line = f.readline()
            except UnicodeDecodeError as e:
                raise DistillError(f"{path}:{lineno + 1}: not valid UTF-8 ({e.reason})") from None
            if not line:
                return
            lineno += 1
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DistillError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(TEXT_FIELD), str):
                raise DistillError(f"{path}:{lineno}: expected an object with a string field {TEXT_FIELD!r}")
            yield obj[TEXT_FIELD]


def iter_parquet(path: str, batch_rows: int = 4096) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 — pyarrow raises ArrowInvalid/OSError with multi-line messages
        raise DistillError(f"{path}: not a Parquet file ({str(e).splitlines()[0][:120]})") from None
    if TEXT_FIELD not in pf.schema_arrow.names:
        raise DistillError(f"{path}: Parquet file has no column {TEXT_FIELD!r} (columns: {pf.schema_arrow.names})")
    for batch in pf.iter_batches(batch_size=batch_rows, columns=[TEXT_FIELD]):
        for text in batch.column(0).to_pylist():
            if text is None:
                continue
            if not isinstance(text, str):
                raise DistillError(f"{path}: column {TEXT_FIELD!r} is not a string column")
            yield text


def iter_text(path: str) -> Iterator[str]:
    """Paragraph-split plain text: a run of blank lines ends a document."""
    buf: list[str] = []
    try:
        with open(path, "r", encoding="utf-8", errors="strict") as f:
            for line in f:
                if line.strip():
                    buf.append(line.rstrip("\n"))
                elif buf:
                    yield "\n".join(buf)
                    buf = []
    except UnicodeDecodeError as e:
        raise DistillError(f"{path}: not valid UTF-8 text ({e.reason} at byte {e.start})") from None
    if buf:
        yield "\n".join(buf)


def iter_hf(src: str) -> Iterator[str]:
    """Stream an HF dataset (needs network; `datasets` is imported lazily)."""
    spec = parse_hf(src)
    try:
        import datasets
    except ImportError:
        raise DistillError(f"--docs {src}: the `datasets` package is required for hf: sources") from None
    try:
        ds = datasets.load_dataset(spec.repo, spec.config, split=spec.split, streaming=True)
    except Exception as e:  # noqa: BLE001 — network / unknown repo: one line
        raise DistillError(f"--docs {src}: cannot open dataset ({str(e).splitlines()[0][:160]})") from None
    for row in ds:
        text = row.get(TEXT_FIELD)
        if isinstance(text, str):
            yield text


def iter_source(src: str) -> Iterator[str]:
    if src.startswith("hf:"):
        return iter_hf(src)
    suffix = Path(src).suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return iter_jsonl(src)
    if suffix == ".parquet":
        return iter_parquet(src)
    return iter_text(src)


def iter_docs(src: str, max_docs: int | None = None) -> Iterator[str]:
    """Every document of SRC in order (at most `max_docs`). SRC is resolved NOW (a missing file is an
    error before anything else runs); the documents are read lazily."""
    if max_docs is not None and max_docs < 0:
        raise DistillError(f"--max-docs: must be >= 0, got {max_docs}")
    return _iter_all(resolve_sources(src), max_docs)


def _iter_all(sources: list[str], max_docs: int | None) -> Iterator[str]:
    if max_docs == 0:
        return
    n = 0
    for one in sources:
        for text in iter_source(one):
            n += 1
            yield text
            if max_docs is not None and n >= max_docs:
                return  # stop before reading further (a bad line past the limit is never touched)

"""Resolve a `--teacher` argument and load the teacher's tokenizer with exact per-token bytes.

Accepted teachers: a HF model id or transformers directory, a `.gguf` file, or a student checkpoint
directory of this project (`model.safetensors` + `config.json` with a "model" section: same tokenizer as
the student, so the projection is the identity).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from distill.errors import DistillError
from teachers.backend import TeacherSpec

FINGERPRINT_EDGE_BYTES = 16 << 20  # hash the first/last 16 MiB + size: exact enough, fast on 100 GB


def _fingerprint(files: list[Path]) -> str:
    """Content identity of weight files without reading all of a multi-GB checkpoint."""
    h = hashlib.sha256()
    for p in sorted(files):
        size = p.stat().st_size
        h.update(f"{p.name}:{size}\n".encode())
        with open(p, "rb") as f:
            h.update(f.read(FINGERPRINT_EDGE_BYTES))
            if size > 2 * FINGERPRINT_EDGE_BYTES:
                f.seek(size - FINGERPRINT_EDGE_BYTES)
                h.update(f.read())
            elif size > FINGERPRINT_EDGE_BYTES:
                h.update(f.read())
    return "sha256-edges:" + h.hexdigest()[:32]


def resolve_teacher(arg: str) -> TeacherSpec:
    """`--teacher` -> TeacherSpec, or a one-line DistillError for an unknown/unusable path."""
    p = Path(arg).expanduser()
    looks_like_path = arg.startswith((".", "/", "~")) or arg.endswith(".gguf") or arg.count("/") != 1
    if p.is_file():
        if p.suffix != ".gguf":
            raise DistillError(f"--teacher {arg}: a file teacher must be a .gguf")
        return TeacherSpec(kind="gguf", path=str(p.resolve().parent), gguf_file=p.name,
                           model_id=p.name, revision=_fingerprint([p]))
    if p.is_dir():
        cfg_path = p / "config.json"
        if not cfg_path.is_file():
            raise DistillError(f"--teacher {arg}: directory has no config.json (not a model)")
        try:
            cfg = json.loads(cfg_path.read_text())
        except ValueError:
            raise DistillError(f"{cfg_path}: not valid JSON") from None
        if isinstance(cfg.get("model"), dict):
            w = p / "model.safetensors"
            if not w.is_file():
                raise DistillError(f"--teacher {arg}: student checkpoint without model.safetensors")
            return TeacherSpec(kind="inhouse", path=str(p.resolve()), model_id=f"inhouse:{p.resolve().name}",
                               revision=_fingerprint([w]), extra={"model": cfg["model"]})
        weights = [f for f in p.iterdir() if f.suffix in (".safetensors", ".bin")]
        if not weights:
            raise DistillError(f"--teacher {arg}: no weight files (*.safetensors / *.bin) in the directory")
        # inside a HF cache snapshot the folder name is the commit hash
        rev = p.resolve().name if p.resolve().parent.name == "snapshots" else _fingerprint(weights)
        return TeacherSpec(kind="hf", path=str(p.resolve()), model_id=str(p.resolve()), revision=rev)
    if looks_like_path:
        raise DistillError(f"--teacher {arg}: no such file or directory")
    # a hub id: loaded offline from the local HF cache (no network at run time)
    rev = ""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(arg, "config.json")
        if isinstance(hit, str):
            rev = Path(hit).parent.name
            return TeacherSpec(kind="hf", path=str(Path(hit).parent), model_id=arg, revision=rev)
    except (ImportError, ValueError):  # no huggingface_hub, or not a valid repo id
        rev = ""
    raise DistillError(f"--teacher {arg}: not a local path and not in the local Hugging Face cache")


# ----------------------------------------------------------------------------- teacher tokenizer

def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable-unicode table, inverted (byte-level BPE token strings -> bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TeacherTokenizer:
    """A HF tokenizer plus the exact bytes of every token, so teacher tokens can be placed on the text."""

    def __init__(self, spec: TeacherSpec):
        from transformers import AutoTokenizer

        kwargs = {"gguf_file": spec.gguf_file} if spec.gguf_file else {}
        try:
            self.tok = AutoTokenizer.from_pretrained(spec.path, **kwargs)
        except (OSError, ValueError, KeyError) as e:
            raise DistillError(f"{spec.model_id}: cannot load the teacher tokenizer ({str(e).splitlines()[0][:160]})") from None
        # BOS convention: the tokenizer's bos; GPT-2 style tokenizers without one use eos as separator
        bos = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id
        if bos is None:
            raise DistillError(f"{spec.model_id}: teacher tokenizer has neither a bos nor an eos token")
        self.bos_id = int(bos)
        self.tok.model_max_length = 1 << 60  # whole documents are tokenised, then windowed: no length warning
        self.vocab_size = len(self.tok)
        self.token_bytes = self._byte_table()

    def _byte_table(self) -> list[bytes]:
        special = set(self.tok.all_special_ids)
        toks = self.tok.convert_ids_to_tokens(list(range(self.vocab_size)))
        dec = _byte_decoder()
        plain = [t for i, t in enumerate(toks) if i not in special and t]
        byte_level = sum(all(c in dec for c in t) for t in plain) > 0.99 * max(len(plain), 1)
        table: list[bytes] = []
        for i, t in enumerate(toks):
            if i in special or t is None:
                table.append(b"")
            elif byte_level:
                table.append(bytes(dec[c] for c in t) if all(c in dec for c in t) else t.encode())
            elif len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                table.append(bytes([int(t[3:5], 16)]))
            else:
                table.append(t.replace("\u2581", " ").encode("utf-8"))
        return table

    def encode(self, text: str) -> list[int] | None:
        """Token ids of `text` (no specials), or None if the tokens' bytes do not spell the text exactly
        (a normalising tokenizer): such documents are skipped rather than mis-aligned."""
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        if b"".join(self.token_bytes[i] for i in ids) != text.encode("utf-8"):
            return None
        return [int(i) for i in ids]

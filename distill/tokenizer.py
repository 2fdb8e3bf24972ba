"""SentencePiece with the challenge's spec, and the byte look-up tables the bpb metric is built on.

Metric LUTs (openai/parameter-golf `train_gpt.py`, `build_sentencepiece_luts`), one entry per id:
  is_boundary[id]       control / unknown / unused ids, and ids past the tokenizer's vocab
  base_bytes[id]        1 for byte-fallback pieces, else UTF-8 length of the piece without a leading "▁",
                        0 for boundary ids
  has_leading_space[id] the piece starts with "▁"
For a target y after input x: bytes(y) = base_bytes[y] + (has_leading_space[y] and not is_boundary[x]).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distill.errors import DistillError
from distill.fsutil import atomic_path, sha256_file

SPACE = "\u2581"  # "▁", SentencePiece's whitespace marker

# The challenge's tokenizer spec (golf-spec.md). pad/bos/eos/unk = 0/1/2/3.
CHALLENGE_SPEC = dict(
    model_type="bpe",
    character_coverage=0.999,
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="nmt_nfkc",
    add_dummy_prefix=False,
    pad_id=0,
    bos_id=1,
    eos_id=2,
    unk_id=3,
    hard_vocab_limit=False,
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_path: str | os.PathLike,
                    max_sentence_length: int = 16384, num_threads: int | None = None,
                    user_defined_symbols: Sequence[str] = ()) -> Path:
    """Train a SentencePiece BPE model with the challenge's spec; write `out_path` (+ .vocab) atomically.
    `user_defined_symbols` become whole pieces right after the 4 specials (CaseOps: its 4 operators)."""
    import sentencepiece as spm

    out_path = Path(out_path)
    if out_path.suffix != ".model":
        raise DistillError(f"{out_path}: tokenizer output must end in .model")
    texts = [t for t in texts if t]
    if not texts:
        raise DistillError(f"{out_path}: no text to train a tokenizer on")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp_model:
        prefix = str(tmp_model)[: -len(".tmp")] + "_sp"
        extra = {"user_defined_symbols": list(user_defined_symbols)} if user_defined_symbols else {}
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(texts),
                model_prefix=prefix,
                vocab_size=vocab_size,
                max_sentence_length=max_sentence_length,
                num_threads=num_threads or max(1, os.cpu_count() or 1),
                minloglevel=2,
                **extra,
                **CHALLENGE_SPEC,
            )
        except RuntimeError as e:  # e.g. a vocab smaller than the characters it must cover: one line
            raise DistillError(f"{out_path}: SentencePiece training failed ({str(e).splitlines()[0][-160:]})") from None
        os.replace(prefix + ".model", tmp_model)
        os.replace(prefix + ".vocab", out_path.with_suffix(".vocab"))
    return out_path


def load_tokenizer(path: str | os.PathLike):
    """Load a SentencePiece model; a missing or unreadable file is a one-line DistillError."""
    import sentencepiece as spm

    path = Path(path)
    if not path.is_file():
        raise DistillError(f"{path}: tokenizer not found")
    sp = spm.SentencePieceProcessor()
    try:
        sp.load(str(path))
    except Exception as e:  # sentencepiece raises OSError/RuntimeError with long messages
        raise DistillError(f"{path}: not a SentencePiece model ({str(e).splitlines()[0][:120]})") from None
    return sp


def tokenizer_hash(path: str | os.PathLike) -> str:
    """sha256 of the .model file: the identity of a student vocabulary in manifests."""
    return sha256_file(path)


@dataclass(frozen=True)
class ByteLUTs:
    base_bytes: np.ndarray  # int16 [table]
    has_leading_space: np.ndarray  # bool [table]
    is_boundary: np.ndarray  # bool [table]

    def target_bytes(self, prev_ids: np.ndarray, target_ids: np.ndarray) -> np.ndarray:
        """Bytes of each target given its previous (input) token: int64 array, same shape."""
        prev_ids = np.asarray(prev_ids, dtype=np.int64)
        target_ids = np.asarray(target_ids, dtype=np.int64)
        b = self.base_bytes[target_ids].astype(np.int64)
        b += (self.has_leading_space[target_ids] & ~self.is_boundary[prev_ids]).astype(np.int64)
        return b


def build_luts(sp, vocab_size: int | None = None) -> ByteLUTs:
    """The challenge's byte LUTs for a loaded SentencePiece model (table covers max(sp vocab, vocab_size))."""
    n_sp = int(sp.vocab_size())
    size = max(n_sp, vocab_size or 0)
    base = np.zeros(size, dtype=np.int16)
    lead = np.zeros(size, dtype=np.bool_)
    boundary = np.ones(size, dtype=np.bool_)
    for i in range(n_sp):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith(SPACE):
            lead[i] = True
            piece = piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return ByteLUTs(base, lead, boundary)


def encode_docs(sp, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
    """Each document as [BOS] + ids (the challenge's packing: BOS before each doc, no EOS)."""
    ids = sp.encode(list(texts), out_type=int, num_threads=num_threads)
    bos = sp.bos_id()
    return [[bos] + doc for doc in ids]


def pack_docs(docs: Sequence[Sequence[int]]) -> np.ndarray:
    """Concatenate [BOS]+ids documents into one uint16 stream."""
    if not docs:
        return np.zeros(0, dtype=np.uint16)
    return np.concatenate([np.asarray(d, dtype=np.uint16) for d in docs])

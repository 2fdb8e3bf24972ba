"""Document curation: Unicode normalisation, quality heuristics, exact and near-duplicate removal.

Split in two so that the expensive part runs in worker processes:
  `analyze(text, cfg)`  (pure, per document; runs in workers) -> normalised text, the first quality filter
                        that rejects it (or None), an exact-dup key and a MinHash signature + LSH band keys
  `Deduper.check(info)` (stateful, in the main process, in document order) -> "exact_dup" / "near_dup" / None

Quality heuristics follow Gopher (Rae et al. 2021) / C4 in spirit, with thresholds loose enough for
FineWeb (which already passed similar filters). Filters are applied in FILTERS order and a document is
charged to the FIRST one that rejects it, so per-filter counts add up: kept + Σ dropped = input.

Near duplicates: MinHash over word 5-gram shingles (numpy-vectorised: one (num_perm x shingles) universal
hash matrix per document), LSH with `bands` x `rows` (candidate threshold ≈ (1/bands)^(1/rows) ≈ 0.71 for
16 x 8), and every candidate verified by its estimated Jaccard >= `near_dup_jaccard` against the kept
document it collided with. Memory in the main process: ~0.6 KB per kept document (signature + band keys);
plan ~1 GB per 1.5 M documents.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

# Order matters: a document is charged to the first filter that rejects it.
QUALITY_FILTERS = ("length", "mean_word_length", "symbol_ratio", "alpha_fraction", "repeated_lines")
DEDUP_FILTERS = ("exact_dup", "near_dup")
FILTERS = QUALITY_FILTERS + DEDUP_FILTERS

_MERSENNE_P = (1 << 31) - 1  # universal hashing modulus: a*x+b < 2^62 stays exact in uint64
_WORD_RE = re.compile(r"\w+", re.UNICODE)


@dataclass
class CurationConfig:
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_ratio: float = 0.1  # ("#" + "..." + "…") per word
    min_alpha_fraction: float = 0.8  # words containing at least one letter
    max_repeated_line_fraction: float = 0.3  # lines that duplicate an earlier line of the same doc
    shingle_words: int = 5
    num_perm: int = 128
    bands: int = 16
    near_dup_jaccard: float = 0.8
    seed: int = 1337

    def to_dict(self) -> dict:
        return asdict(self)


class DocInfo(NamedTuple):
    text: str  # normalised
    reject: str | None  # first quality filter that rejects it
    exact_key: bytes
    band_keys: np.ndarray | None  # uint64 [bands]; None when the doc has no words
    signature: np.ndarray | None  # uint32 [num_perm]


def normalize(text: str) -> str:
    """NFC (canonical composition; the tokenizer applies nmt_nfkc itself) and '\\n' line endings."""
    return unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))


def quality_reject(text: str, words: list[str], cfg: CurationConfig) -> str | None:
    """Name of the first quality filter that rejects the document, or None."""
    n_words = len(words)
    if not cfg.min_words <= n_words <= cfg.max_words:
        return "length"
    mean_len = sum(len(w) for w in words) / n_words
    if not cfg.min_mean_word_length <= mean_len <= cfg.max_mean_word_length:
        return "mean_word_length"
    symbols = text.count("#") + text.count("...") + text.count("\u2026")
    if symbols / n_words > cfg.max_symbol_ratio:
        return "symbol_ratio"
    alpha = sum(1 for w in words if any(c.isalpha() for c in w))
    if alpha / n_words < cfg.min_alpha_fraction:
        return "alpha_fraction"
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    if lines:
        repeated = len(lines) - len(set(lines))
        if repeated / len(lines) > cfg.max_repeated_line_fraction:
            return "repeated_lines"
    return None


class MinHasher:
    """Deterministic MinHash (same seed -> same signatures in every process)."""

    def __init__(self, cfg: CurationConfig):
        if cfg.num_perm % cfg.bands:
            raise ValueError(f"num_perm ({cfg.num_perm}) must be a multiple of bands ({cfg.bands})")
        rng = np.random.default_rng(cfg.seed)
        self.n = cfg.shingle_words
        self.bands, self.rows = cfg.bands, cfg.num_perm // cfg.bands
        self.a = rng.integers(1, _MERSENNE_P, size=(cfg.num_perm, 1), dtype=np.uint64)
        self.b = rng.integers(0, _MERSENNE_P, size=(cfg.num_perm, 1), dtype=np.uint64)
        # odd 64-bit multipliers to fold shingle positions and band rows into one key (wrapping arithmetic)
        self.pos_mult = rng.integers(1, 2**63, size=self.n, dtype=np.uint64) | np.uint64(1)
        self.row_mult = rng.integers(1, 2**63, size=self.rows, dtype=np.uint64) | np.uint64(1)

    def shingle_hashes(self, words: list[str]) -> np.ndarray:
        """uint64 values in [0, P): one per word n-gram (one gram for docs shorter than n words)."""
        wh = np.fromiter((zlib.crc32(w.encode("utf-8")) for w in words), dtype=np.uint64, count=len(words))
        n = min(self.n, len(wh))
        m = len(wh) - n + 1
        h = np.zeros(m, dtype=np.uint64)
        for k in range(n):  # vectorised over all shingles; uint64 overflow wraps (intended)
            h += wh[k : k + m] * self.pos_mult[k]
        return (h >> np.uint64(17)) % np.uint64(_MERSENNE_P)

    def signature(self, words: list[str], chunk: int = 4096) -> np.ndarray:
        x = self.shingle_hashes(words)
        sig = np.full(self.a.shape[0], _MERSENNE_P, dtype=np.uint64)
        for i in range(0, len(x), chunk):  # bounded (num_perm x chunk) matrix for very long docs
            hx = (self.a * x[None, i : i + chunk] + self.b) % np.uint64(_MERSENNE_P)
            np.minimum(sig, hx.min(axis=1), out=sig)
        return sig.astype(np.uint32)

    def band_keys(self, sig: np.ndarray) -> np.ndarray:
        bands = sig.astype(np.uint64).reshape(self.bands, self.rows)
        keys = (bands * self.row_mult[None, :]).sum(axis=1)  # wraps mod 2^64
        return keys ^ (np.arange(self.bands, dtype=np.uint64) << np.uint64(56))  # band id in the key


def analyze(text: str, cfg: CurationConfig, hasher: MinHasher) -> DocInfo:
    norm = normalize(text)
    words = _WORD_RE.findall(norm.lower())
    reject = quality_reject(norm, words, cfg)
    exact_key = hashlib.blake2b(norm.encode("utf-8"), digest_size=16).digest()
    if reject is not None or not words:
        return DocInfo(norm, reject, exact_key, None, None)
    sig = hasher.signature(words)
    return DocInfo(norm, None, exact_key, hasher.band_keys(sig), sig)


class Deduper:
    """Exact (hash of the normalised text) and near (MinHash LSH, verified) duplicate removal."""

    def __init__(self, cfg: CurationConfig):
        self.threshold = cfg.near_dup_jaccard
        self.exact: set[bytes] = set()
        self.buckets: dict[int, int] = {}  # band key -> index of the kept doc that owns it
        self.sigs: list[np.ndarray] = []

    def check(self, info: DocInfo) -> str | None:
        """'exact_dup' / 'near_dup' if `info` duplicates a kept doc, else None (and remember it)."""
        if info.exact_key in self.exact:
            return "exact_dup"
        if info.band_keys is not None:
            keys = info.band_keys.tolist()
            for key in keys:
                j = self.buckets.get(key)
                if j is not None and float(np.mean(self.sigs[j] == info.signature)) >= self.threshold:
                    return "near_dup"
            idx = len(self.sigs)
            self.sigs.append(info.signature)
            for key in keys:
                self.buckets.setdefault(key, idx)
        self.exact.add(info.exact_key)
        return None

"""The one interface every teacher scoring engine implements (transformers `hf`, `vllm`).

A backend only turns teacher token-id sequences into log-softmax top-k rows; tokenisation, BOS handling,
windowing of long documents, projection to the student vocabulary and writing the cache live in
teachers/precompute.py, so both engines feed the same writer and the same teacher + text gives the same
targets.

Contract of `score(seqs, k)`, for each sequence of n teacher token ids (2 <= n <= backend.max_len):
  row j (0 <= j < n-1) is the teacher's distribution predicting token j+1 given tokens[0..j]:
    topk_ids       int32   [n-1, k]  the k most likely ids, sorted by descending log-probability
    topk_logprobs  float32 [n-1, k]  log-softmax of the raw logits (no temperature) at those ids
    actual_logprob float32 [n-1]     log-softmax at the actual next token tokens[j+1]
Ties may be broken in any order. The returned list has one entry per input sequence, in order.
Callers never ask for k > backend.max_k and never pass a sequence longer than backend.max_len.

Constructing a backend: `make_backend(name, spec, ...)` (below) imports the engine lazily, so the core
and the tests run without vllm. An engine module exposes a class with the constructor signature of
`BackendFactory`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from distill.errors import DistillError


@dataclass
class TeacherScores:
    """One sequence's scores (see the module docstring for shapes and meaning)."""

    topk_ids: np.ndarray  # int32 [n-1, k]
    topk_logprobs: np.ndarray  # float32 [n-1, k], descending per row
    actual_logprob: np.ndarray  # float32 [n-1]

    def __post_init__(self) -> None:
        self.topk_ids = np.ascontiguousarray(self.topk_ids, dtype=np.int32)
        self.topk_logprobs = np.ascontiguousarray(self.topk_logprobs, dtype=np.float32)
        self.actual_logprob = np.ascontiguousarray(self.actual_logprob, dtype=np.float32)
        n1 = self.topk_ids.shape[0]
        if self.topk_logprobs.shape != self.topk_ids.shape or self.actual_logprob.shape != (n1,):
            raise ValueError(
                f"TeacherScores: inconsistent shapes {self.topk_ids.shape} {self.topk_logprobs.shape} "
                f"{self.actual_logprob.shape}"
            )


@dataclass(frozen=True)
class TeacherSpec:
    """A resolved `--teacher` argument (teachers/registry.py builds it).

    kind:       "hf" (HF model id or local transformers dir), "gguf" (a .gguf file), or "inhouse"
                (a student checkpoint dir of this project: same tokenizer, identity projection)
    path:       what transformers/vLLM load: model id or directory (for gguf: the directory holding it)
    gguf_file:  the .gguf file name inside `path` (kind == "gguf" only)
    model_id:   the identity recorded in the manifest (the user's argument, normalised)
    revision:   a content identity: HF commit hash if known, else sha256 of the weights file(s)
    """

    kind: str
    path: str
    model_id: str
    revision: str
    gguf_file: str | None = None
    extra: dict = field(default_factory=dict)


@runtime_checkable
class TeacherBackend(Protocol):
    name: str  # "hf" | "vllm"
    version: str  # engine version, e.g. transformers.__version__ / vllm.__version__
    model_id: str
    vocab_size: int  # size of the teacher's logit vector
    max_len: int  # longest sequence score() accepts (teacher context, capped by --max-model-len)
    max_k: int  # largest k score() accepts (vllm: max_logprobs; hf: vocab_size)

    def score(self, seqs: list[list[int]], k: int) -> list[TeacherScores]:
        ...


class BackendFactory(Protocol):
    """Constructor signature every engine class implements."""

    def __call__(self, spec: TeacherSpec, *, max_model_len: int | None, batch_tokens: int,
                 max_k: int, device: str | None, dtype: str | None) -> TeacherBackend:
        ...


DTYPES = ("float32", "bfloat16", "float16")  # --dtype choices besides "auto"

# backend name -> "module:Class"
BACKENDS = {
    "hf": "teachers.backend_hf:HFBackend",
    "vllm": "teachers.backend_vllm:VLLMBackend",
}


def make_backend(name: str, spec: TeacherSpec, *, max_model_len: int | None = None,
                 batch_tokens: int = 16384, max_k: int = 64, device: str | None = None,
                 dtype: str | None = None) -> TeacherBackend:
    """Build backend `name` for `spec`. `max_k` is the largest k the caller will request (vllm needs it
    up front as max_logprobs). `dtype` None/"auto" = the engine's default for the device. A missing engine
    package is a one-line DistillError."""
    if name not in BACKENDS:
        raise DistillError(f"--backend: unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    mod_name, cls_name = BACKENDS[name].split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        raise DistillError(f"--backend {name}: engine not available ({e.name} is not installed)") from None
    cls = getattr(mod, cls_name)
    if dtype not in (None, "auto", *DTYPES):
        raise DistillError(f"--dtype {dtype}: choose from auto, {', '.join(DTYPES)}")
    return cls(spec, max_model_len=max_model_len, batch_tokens=batch_tokens, max_k=max_k, device=device,
               dtype=None if dtype == "auto" else dtype)


def check_scores(scores: list[TeacherScores], seqs: list[list[int]], k: int) -> None:
    """Shape check of a backend's answer (cheap; catches an engine returning fewer rows)."""
    if len(scores) != len(seqs):
        raise RuntimeError(f"backend returned {len(scores)} results for {len(seqs)} sequences")
    for s, seq in zip(scores, seqs):
        if s.topk_ids.shape != (len(seq) - 1, k):
            raise RuntimeError(f"backend returned shape {s.topk_ids.shape}, expected {(len(seq) - 1, k)}")

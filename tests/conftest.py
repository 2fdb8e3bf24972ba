"""Shared fixtures. Tests that need ../shared/data skip cleanly when it is absent (a user's clone).

Run: pytest -q            (default: everything but `slow`-marked long runs is quick)
     pytest -q -m slow    (long end-to-end runs)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DISTILL_SHARED_DATA", REPO.parent / "shared" / "data"))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not available (../shared/data is absent)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return _need(SHARED_DATA)


@pytest.fixture(scope="session")
def sp1024_path(shared_data) -> Path:
    return _need(shared_data / "tokenizers" / "fineweb_1024_bpe.model")


@pytest.fixture(scope="session")
def val_head_shard(shared_data) -> Path:
    return _need(shared_data / "fineweb" / "fineweb_val_head_sp1024_000000.bin")


@pytest.fixture(scope="session")
def val_head_docs(shared_data) -> list[str]:
    p = _need(shared_data / "fineweb" / "fineweb_val_head_docs.jsonl")
    return [json.loads(line)["text"] for line in p.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def sample200_path(shared_data) -> Path:
    return _need(shared_data / "fineweb" / "fineweb_docs_sample200.jsonl")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)

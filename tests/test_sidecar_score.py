"""Original-byte sidecars: `distill data build --caseops` writes them in the records' format, and
`distill score` divides by the ORIGINAL text's bytes read from them — checked against an independent count
(the documents' UTF-8 bytes) and an independent NLL sum; bad sidecars are refused in one line.

Run: DISTILL_SHARED_DATA=/path/to/shared/data OMP_NUM_THREADS=1 python -m pytest -q tests/test_sidecar_score.py
(~15 s; skips without ../shared/data)
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from distill.cli import main
from distill.errors import DistillError
from distill.shards import HEADER_BYTES, MAGIC, read_shard, resolve_shards, write_shard
from student import load_checkpoint
from student.checkpoint import save_checkpoint
from student.model import GPT, ModelConfig

RECORD_TOKENIZER = "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
VAL_DOCS = 6


@pytest.fixture(scope="module")
def record_tok(shared_data):
    path = shared_data / "tokenizers" / RECORD_TOKENIZER
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


@pytest.fixture(scope="module")
def docs(sample200_path):
    return [json.loads(line)["text"] for line in sample200_path.read_text(encoding="utf-8").splitlines()][:16]


@pytest.fixture(scope="module")
def built(tmp_path_factory, sample200_path, record_tok):
    """8 raw FineWeb docs, the first 6 val, CaseOps shards of 4,000 tokens (so documents straddle shards)."""
    out = tmp_path_factory.mktemp("caseops_shards")
    assert main(["data", "build", "--caseops", "--docs", str(sample200_path), "--tokenizer", str(record_tok),
                 "--out", str(out), "--no-curate", "--val-docs", str(VAL_DOCS), "--max-docs", "8",
                 "--shard-tokens", "4000", "--workers", "1", "--force"]) == 0
    return out


def val_stream(folder):
    shards = resolve_shards(str(folder / "fineweb_val_*.bin"))
    return shards, np.concatenate([np.asarray(read_shard(p)) for p in shards])


def test_sidecar_format_and_document_bytes(built, docs):
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["text_transform"] == "lossless_caps_caseops_v1"
    shards, tokens = val_stream(built)
    assert len(shards) >= 3 and all("_bytes_" not in p.name for p in shards)  # the glob skips sidecars
    assert [r["name"] for r in manifest["sidecars"]] == [p.name.replace("val_", "val_bytes_") for p in shards]
    assert not list(built.glob("fineweb_train_bytes_*.bin"))
    counts = []
    for p in shards:
        car = p.with_name(p.name.replace("fineweb_val_", "fineweb_val_bytes_"))
        header = np.fromfile(car, dtype="<i4", count=256)
        n = len(read_shard(p))
        assert header[:3].tolist() == [MAGIC, 1, n] and not header[3:].any()  # the shard header, same count
        assert car.stat().st_size == HEADER_BYTES + 2 * n
        counts.append(np.fromfile(car, dtype="<u2", offset=HEADER_BYTES))
    counts = np.concatenate(counts)
    starts = np.flatnonzero(tokens == 1)
    assert len(starts) == VAL_DOCS and starts[0] == 0 and (counts[starts] == 0).all()  # BOS = 0
    per_doc = np.add.reduceat(counts.astype(np.int64), starts)
    assert per_doc.tolist() == [len(d.encode("utf-8")) for d in docs[:VAL_DOCS]]  # the independent count


class Bigram(torch.nn.Module):
    """Any ids -> logits model will do for the metric: a fixed random low-rank bigram table."""

    def __init__(self, vocab: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(vocab, 8, generator=g))
        self.out = torch.nn.Parameter(torch.randn(8, vocab, generator=g))

    def forward(self, x):
        return self.emb[x] @ self.out


@torch.no_grad()
def reference_nll(model, tokens: np.ndarray, n: int) -> float:
    """float64 NLL of targets tokens[1 : n + 1], each after its own input (a bigram has no context)."""
    x = torch.from_numpy(tokens[:n].astype(np.int64))
    y = torch.from_numpy(tokens[1 : n + 1].astype(np.int64))
    total = 0.0
    for i in range(0, n, 1024):
        logp = torch.log_softmax(model(x[i : i + 1024]).double(), -1)
        total -= logp.gather(-1, y[i : i + 1024, None]).sum().item()
    return total


def test_metric_counts_original_bytes(built, docs, record_tok):
    from distill.metric import evaluate_bpb
    from distill.shards import load_byte_counts
    from distill.tokenizer import build_luts, load_tokenizer

    shards, tokens = val_stream(built)
    counts = load_byte_counts(shards)
    assert len(counts) == len(tokens)
    model = Bigram(8192)
    luts = build_luts(load_tokenizer(record_tok), 8192)
    # the shortest complete document, from its BOS to the next one, in one window scoring every target: the
    # bytes are exactly that document's UTF-8 bytes (the last target, a BOS, stands for none)
    starts = np.flatnonzero(tokens == 1)
    k = int(np.argmin(np.diff(starts)))
    head, head_counts = tokens[starts[k] : starts[k + 1] + 1], counts[starts[k] : starts[k + 1] + 1]
    L = len(head) - 1
    original = len(docs[k].encode("utf-8"))
    ref = reference_nll(model, head, L) / (math.log(2) * original)
    for stride in (None, L // 2):
        res = evaluate_bpb(model, head, luts, L, stride=stride, batch_size=1, byte_counts=head_counts)
        assert res["bytes"] == original and res["tokens"] == L
        assert res["val_bpb"] == pytest.approx(ref, rel=1e-6)
    # the LUT count of the transformed pieces is a different number for CaseOps text
    lut = evaluate_bpb(model, head, luts, L, batch_size=1)
    assert lut["bytes"] != original and lut["val_loss"] == pytest.approx(res["val_loss"], rel=1e-6)
    # windows that leave the tail unscored: bytes = the sidecar entries of exactly the scored targets
    L2 = 1000
    res = evaluate_bpb(model, tokens, luts, L2, batch_size=2, byte_counts=counts, max_windows=2)
    assert res["bytes"] == int(counts[1 : 2 * L2 + 1].sum())
    with pytest.raises(DistillError, match="byte sidecar has"):
        evaluate_bpb(model, tokens, luts, L2, byte_counts=counts[:-1])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=8192, num_layers=1, model_dim=16, num_heads=2, num_kv_heads=1, mlp_mult=2)
    d = tmp_path_factory.mktemp("ckpt8192")
    save_checkpoint(d, GPT(cfg), {"model": cfg.to_dict()})
    return d


def score_json(capsys, *args) -> dict:
    assert main(["score", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_score_cli_uses_sidecar(built, docs, ckpt, record_tok, capsys, tmp_path):
    val = str(built / "fineweb_val_*.bin")
    common = ["--seq-len", "256", "--max-windows", "6", "--batch-size", "6", "--device", "cpu"]
    res = score_json(capsys, str(ckpt), "--tokenizer", str(record_tok), "--val", val, *common)
    shards, tokens = val_stream(built)
    n = 6 * 256
    counts = np.concatenate([np.fromfile(p.with_name(p.name.replace("val_", "val_bytes_")), dtype="<u2",
                                         offset=HEADER_BYTES) for p in shards])
    assert res["bytes_source"] == "sidecar" and res["bytes"] == int(counts[1 : n + 1].sum())
    assert res["val_bpb"] == pytest.approx(res["val_loss"] * res["tokens"] / (math.log(2) * res["bytes"]), rel=1e-12)
    model = load_checkpoint(ckpt)
    with torch.no_grad():
        x = torch.from_numpy(tokens[:n].astype(np.int64)).view(-1, 256)
        y = torch.from_numpy(tokens[1 : n + 1].astype(np.int64)).view(-1, 256)
        nll = torch.nn.functional.cross_entropy(model(x).double().flatten(0, 1), y.flatten(), reduction="sum").item()
    assert res["val_bpb"] == pytest.approx(nll / (math.log(2) * res["bytes"]), rel=1e-5)
    # without the sidecars: the challenge's LUT count, as before
    plain = tmp_path / "plain"
    plain.mkdir()
    for p in shards:
        shutil.copy(p, plain / p.name)
    res2 = score_json(capsys, str(ckpt), "--tokenizer", str(record_tok), "--val", str(plain / "fineweb_val_*.bin"),
                      *common)
    assert res2["bytes_source"] == "lut" and res2["bytes"] != res["bytes"]
    assert res2["val_loss"] == pytest.approx(res["val_loss"], rel=1e-12)


def _corrupt_copy(built, tmp_path, how: str):
    d = tmp_path / how
    shutil.copytree(built, d)
    car = d / ("fineweb_val_bytes_000000.bin" if how == "bos" else "fineweb_val_bytes_000001.bin")
    arr = np.fromfile(car, dtype="<u2", offset=HEADER_BYTES)
    if how == "truncated":
        car.write_bytes(car.read_bytes()[:-2])
    elif how == "magic":
        raw = bytearray(car.read_bytes())
        raw[0] ^= 0xFF
        car.write_bytes(bytes(raw))
    elif how == "length":
        write_shard(car, arr[:-1])
    elif how == "bos":
        toks = np.asarray(read_shard(d / "fineweb_val_000000.bin"))
        arr = arr.copy()
        arr[np.flatnonzero(toks == 1)[0]] = 7
        write_shard(car, arr)
    elif how == "missing":
        car.unlink()
    return d, car


@pytest.mark.parametrize("how,msg", [("truncated", "truncated or corrupt"), ("magic", "not a shard"),
                                     ("length", "byte sidecar has"), ("bos", "to the BOS at position"),
                                     ("missing", "byte sidecar missing")])
def test_bad_sidecar_is_one_line(built, ckpt, record_tok, tmp_path, capsys, how, msg):
    from distill.score import score

    d, car = _corrupt_copy(built, tmp_path, how)
    with pytest.raises(DistillError, match=msg) as e:
        score(str(ckpt), str(record_tok), str(d / "fineweb_val_*.bin"), 256, progress=False, max_windows=1)
    assert str(car) in str(e.value) and "\n" not in str(e.value)


def test_glob_skips_sidecars_explicit_path_does_not(built):
    assert all("_bytes_" not in p.name for p in resolve_shards(str(built / "fineweb_*.bin")))
    explicit = built / "fineweb_val_bytes_000000.bin"
    assert resolve_shards(str(explicit)) == [explicit]


def test_build_is_the_same_in_workers_and_small_batches(built, sample200_path, record_tok, tmp_path):
    """Worker processes, and batches small enough that train batches skip the span decoding, write the
    same files byte for byte."""
    from distill.data.build import BuildConfig, build_shards

    for name, kw in (("pool", {"workers": 2}), ("small", {"workers": 1, "batch_docs": 2})):
        out = tmp_path / name
        build_shards(BuildConfig(docs=str(sample200_path), tokenizer=str(record_tok), out=str(out), curate=False,
                                 val_docs=VAL_DOCS, max_docs=8, shard_tokens=4000, caseops=True, **kw),
                     progress=False)
        names = sorted(p.name for p in built.glob("fineweb_*.bin"))
        assert names == sorted(p.name for p in out.glob("fineweb_*.bin"))
        for n in names:
            assert (out / n).read_bytes() == (built / n).read_bytes(), (name, n)

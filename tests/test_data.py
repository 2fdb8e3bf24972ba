"""`distill data build|tokenizer|download` on real documents and real SentencePiece models.

Run: python -m pytest -q tests/test_data.py      (~15 s; needs ../shared/data, skips without it)
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from distill.cli import main
from distill.data.build import BuildConfig, build_shards
from distill.data.filters import CurationConfig, Deduper, MinHasher, analyze
from distill.data.sources import iter_docs, parse_hf
from distill.errors import DistillError
from distill.fsutil import sha256_file
from distill.shards import read_header, read_shard, write_shard
from distill.tokenizer import encode_docs, load_tokenizer, pack_docs

REPO = Path(__file__).resolve().parents[1]


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def _sample_docs(sample200_path: Path, n: int) -> list[str]:
    return [json.loads(line)["text"] for line in sample200_path.read_text().splitlines()[:n]]


def _stream(out: Path, split: str) -> np.ndarray:
    paths = sorted(out.glob(f"fineweb_{split}_*.bin"))
    return np.concatenate([np.asarray(read_shard(p)) for p in paths]) if paths else np.zeros(0, np.uint16)


def _docs_of(stream: np.ndarray) -> list[np.ndarray]:
    starts = np.flatnonzero(stream == 1)
    return [stream[a + 1 : b] for a, b in zip(starts, list(starts[1:]) + [len(stream)])]


# ------------------------------------------------------------------------------------ exactness


def test_no_curate_reencodes_official_val_head(tmp_path, sp1024_path, val_head_shard, shared_data):
    """--no-curate reproduces the challenge's own tokenization: the official val shard's first 131,072 ids."""
    docs = shared_data / "fineweb" / "fineweb_val_head_docs.jsonl"
    out = tmp_path / "out"
    rc = main(["data", "build", "--docs", str(docs), "--tokenizer", str(sp1024_path), "--out", str(out),
               "--no-curate", "--val-docs", "109", "--workers", "1"])
    assert rc == 0
    official = np.asarray(read_shard(val_head_shard))
    ours = np.asarray(read_shard(out / "fineweb_val_000000.bin", vocab_size=1024))
    assert len(ours) >= len(official) == 131_072
    assert np.array_equal(ours[: len(official)], official)
    assert not list(out.glob("fineweb_train_*.bin"))  # all 109 docs are validation
    m = json.loads((out / "manifest.json").read_text())
    assert m["docs"] == {"input": 109, "kept": 109, "val": 109, "train": 0, "dropped": {}}


# ------------------------------------------------------------------------------------ curation


def _junk_and_dups(base: list[str]) -> tuple[list[str], dict[str, int]]:
    """Real docs + inserted exact dups, near dups and low-quality docs; returns (docs, expected drops)."""
    rng = random.Random(0)
    docs = list(base)
    exact = [base[i] for i in (1, 5, 9, 20)]
    # canonically-equivalent copies (NFD, CRLF) are exact dups once normalised (NFC, "\n")
    nfd = next(d for d in base[21:] if unicodedata.normalize("NFD", d) != d)
    exact += [unicodedata.normalize("NFD", nfd), base[22].replace("\n", "\r\n") if "\n" in base[22] else base[22]]
    near = []
    for i in (2, 6, 11):  # change 2 words of a long doc: Jaccard of 5-gram shingles stays > 0.9
        words = base[i].split(" ")
        for _ in range(2):
            words[rng.randrange(len(words))] = "zebra"
        near.append(" ".join(words))
    junk = {
        "length": ["Too short to be a document.", "Buy now!"],
        "symbol_ratio": [" ".join(["#tag #more #hash word"] * 30)],
        "alpha_fraction": [" ".join(str(rng.randrange(10**6)) for _ in range(120))],
        "repeated_lines": ["\n".join(["Click here to subscribe to our newsletter today and save"] * 12)],
        "mean_word_length": [" ".join(["a b c d e f"] * 20)],
    }
    for d in exact + near + [t for v in junk.values() for t in v]:
        docs.insert(rng.randrange(len(base) // 2, len(docs) + 1), d)  # after the originals they copy
    expected = {k: len(v) for k, v in junk.items()} | {"exact_dup": len(exact), "near_dup": len(near)}
    return docs, expected


def test_curation_counts_add_up_and_dups_removed(tmp_path, sp1024_path, sample200_path):
    base = _sample_docs(sample200_path, 40)
    docs, expected = _junk_and_dups(base)
    src = _write_jsonl(tmp_path / "docs.jsonl", docs)
    out = tmp_path / "out"
    m = build_shards(BuildConfig(docs=str(src), tokenizer=str(sp1024_path), out=str(out), val_docs=7,
                                 shard_tokens=20_000, workers=1), progress=False)
    d, t = m["docs"], m["tokens"]
    assert d["input"] == len(docs)
    assert d["kept"] + sum(d["dropped"].values()) == d["input"]
    assert t["kept"] + sum(t["dropped"].values()) == t["input"]
    for name, n in expected.items():
        assert d["dropped"][name] == n, (name, d["dropped"])
    assert d["kept"] == len(base)  # every original real doc survives (no false positives)
    # the kept stream is exactly the originals in order: val = first 7, train = the rest
    sp = load_tokenizer(sp1024_path)
    want = pack_docs(encode_docs(sp, base))
    got = np.concatenate([_stream(out, "val"), _stream(out, "train")])
    assert np.array_equal(got, want)
    assert len(_docs_of(_stream(out, "val"))) == 7 and d["val"] == 7
    assert t["val"] + t["train"] == t["kept"] == len(want)


def test_shards_validate_and_manifest_checksums(tmp_path, sp1024_path, sample200_path):
    src = _write_jsonl(tmp_path / "docs.jsonl", _sample_docs(sample200_path, 30))
    out = tmp_path / "out"
    m = build_shards(BuildConfig(docs=str(src), tokenizer=str(sp1024_path), out=str(out), val_docs=5,
                                 shard_tokens=15_000, workers=1), progress=False)
    assert len(m["shards"]) >= 4  # small shards: docs straddle shard boundaries
    on_disk = sorted(p.name for p in out.glob("fineweb_*.bin"))
    assert on_disk == sorted(r["name"] for r in m["shards"])
    for r in m["shards"]:
        p = out / r["name"]
        assert read_header(p) == r["tokens"] and p.stat().st_size == r["bytes"]
        assert sha256_file(p) == r["sha256"]
        assert r["tokens"] <= 15_000
    assert sum(r["tokens"] for r in m["shards"]) == m["tokens"]["kept"]
    assert m["tokenizer"]["sha256"] == sha256_file(sp1024_path)
    assert m["settings"]["val_docs"] == 5 and m["settings"]["shard_tokens"] == 15_000
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left behind
    # a second build into the same folder is refused unless --force
    with pytest.raises(DistillError, match="--force"):
        build_shards(BuildConfig(docs=str(src), tokenizer=str(sp1024_path), out=str(out), val_docs=5), progress=False)


def test_workers_give_identical_shards(tmp_path, sp1024_path, sample200_path):
    docs, _ = _junk_and_dups(_sample_docs(sample200_path, 30))
    src = _write_jsonl(tmp_path / "docs.jsonl", docs)
    shas = []
    for w in (1, 2):
        m = build_shards(BuildConfig(docs=str(src), tokenizer=str(sp1024_path), out=str(tmp_path / f"w{w}"),
                                     val_docs=4, shard_tokens=30_000, workers=w, batch_docs=8), progress=False)
        shas.append(([r["sha256"] for r in m["shards"]], m["docs"]))
    assert shas[0] == shas[1]


def test_text_and_parquet_sources_match_jsonl(tmp_path, sp1024_path, sample200_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [t.strip() for t in _sample_docs(sample200_path, 12)]
    texts = ["\n".join(ln for ln in t.split("\n") if ln.strip()) for t in texts]  # no blank lines inside
    jsonl = _write_jsonl(tmp_path / "d.jsonl", texts)
    txt = tmp_path / "d.txt"
    txt.write_text("\n\n\n".join(texts) + "\n", encoding="utf-8")
    pq.write_table(pa.table({"text": texts, "id": list(range(len(texts)))}), tmp_path / "d.parquet")
    for src in (jsonl, txt, tmp_path / "d.parquet"):
        assert list(iter_docs(str(src))) == texts, src
    assert list(iter_docs(str(tmp_path / "d.*l"), max_docs=3)) == texts[:3]  # glob + limit
    assert parse_hf("hf:HuggingFaceFW/fineweb:sample-10BT").config == "sample-10BT"
    assert parse_hf("hf:HuggingFaceFW/fineweb").split == "train"
    with pytest.raises(DistillError):
        parse_hf("hf:")


def test_near_dup_detector_on_real_text(sample200_path):
    cfg = CurationConfig()
    h = MinHasher(cfg)
    docs = _sample_docs(sample200_path, 60)
    dd = Deduper(cfg)
    verdicts = [dd.check(analyze(t, cfg, h)) for t in docs]
    assert verdicts.count(None) == 60  # distinct real docs are never merged
    w = docs[3].split(" ")
    w[len(w) // 2] = "giraffe"
    assert dd.check(analyze(" ".join(w), cfg, h)) == "near_dup"
    assert dd.check(analyze(docs[3], cfg, h)) == "exact_dup"
    # MinHash estimate tracks the true shingle Jaccard of a half-overlapping pair
    from distill.data.filters import _WORD_RE

    for x, y in ((docs[0], docs[0] + " " + docs[1]), (docs[4], docs[4] + " " + docs[5] + " " + docs[6])):
        sa, sb = (set(h.shingle_hashes(_WORD_RE.findall(t.lower())).tolist()) for t in (x, y))
        jaccard = len(sa & sb) / len(sa | sb)
        est = float(np.mean(analyze(x, cfg, h).signature == analyze(y, cfg, h).signature))
        assert abs(est - jaccard) < 0.15, (est, jaccard)  # estimator std ~ sqrt(J(1-J)/128) <= 0.045


# ------------------------------------------------------------------------------------ bad input


def test_malformed_jsonl_one_line_exit_2(tmp_path, sp1024_path, sample200_path):
    src = _write_jsonl(tmp_path / "bad.jsonl", _sample_docs(sample200_path, 5))
    with open(src, "a") as f:
        f.write('{"text": "ok doc"}\n{"text": broken\n')
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "distill.cli", "data", "build", "--docs", str(src), "--tokenizer",
                        str(sp1024_path), "--out", str(out), "--val-docs", "2", "--workers", "2"],
                       check=False, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert f"{src}:7:" in lines[0] and "malformed JSON" in lines[0]
    assert not out.exists()  # nothing half-written


def test_bad_inputs_in_process(tmp_path, sp1024_path, capsys):
    cases = [
        ["--docs", str(tmp_path / "missing.jsonl"), "--tokenizer", str(sp1024_path)],
        ["--docs", str(_write_jsonl(tmp_path / "a.jsonl", ["x"])), "--tokenizer", str(tmp_path / "no.model")],
        ["--docs", str(_write_jsonl(tmp_path / "b.jsonl", ["x"])) , "--tokenizer", str(sp1024_path),
         "--val-docs", "-1"],
    ]
    (tmp_path / "nofield.jsonl").write_text('{"body": "x"}\n')
    cases.append(["--docs", str(tmp_path / "nofield.jsonl"), "--tokenizer", str(sp1024_path)])
    errors = []
    for i, extra in enumerate(cases):
        args = ["data", "build", "--out", str(tmp_path / f"o{i}"), "--workers", "1"] + extra
        if "--val-docs" not in extra:
            args += ["--val-docs", "1"]
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("distill: error: ")
        assert not (tmp_path / f"o{i}").exists()
        errors.append(err[0])
    assert "missing.jsonl" in errors[0] and "no.model" in errors[1] and "--val-docs" in errors[2]
    assert "nofield.jsonl:1:" in errors[3]


# ------------------------------------------------------------------------------------ tokenizer + download


def test_tokenizer_cli_trains_challenge_spec(tmp_path, sample200_path, capsys):
    out = tmp_path / "tok" / "t512.model"
    rc = main(["data", "tokenizer", "--docs", str(sample200_path), "--vocab-size", "512", "--out", str(out),
               "--max-docs", "60", "--threads", "2", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    sp = load_tokenizer(out)
    assert res["vocab_size"] == sp.vocab_size() == 512 and res["docs"] == 60
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert sp.is_byte(4) and sp.id_to_piece(4) == "<0x00>"  # byte fallback on
    assert sp.encode("2024", out_type=str) == ["2", "0", "2", "4"]  # split_digits
    assert res["sha256"] == sha256_file(out)


def _mirror(tmp_path: Path, sp1024_path: Path, val_head_shard: Path, sample200_path: Path) -> tuple[Path, dict]:
    """A local directory laid out like the hub dataset repo (remote root `datasets/`)."""
    repo = tmp_path / "repo"
    ds = repo / "datasets" / "datasets" / "fineweb10B_sp1024"
    tk = repo / "datasets" / "tokenizers"
    ds.mkdir(parents=True)
    tk.mkdir(parents=True)
    (ds / "fineweb_val_000000.bin").write_bytes(val_head_shard.read_bytes())
    sp = load_tokenizer(sp1024_path)
    for i in range(2):
        write_shard(ds / f"fineweb_train_00000{i}.bin", pack_docs(encode_docs(sp, _sample_docs(sample200_path, 3 + i))))
    (tk / "fineweb_1024_bpe.model").write_bytes(sp1024_path.read_bytes())
    (tk / "fineweb_1024_bpe.vocab").write_bytes(sp1024_path.with_suffix(".vocab").read_bytes())
    files = [{"path": f"datasets/fineweb10B_sp1024/{p.name}", "bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(ds.iterdir())]
    manifest = {"datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024",
                              "stats": {"files_train": 2, "files_val": 1}, "files": files}],
                "tokenizers": [{"name": "sp_bpe_1024", "vocab_size": 1024,
                                "model_path": "tokenizers/fineweb_1024_bpe.model",
                                "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}]}
    (repo / "datasets" / "manifest.json").write_text(json.dumps(manifest))
    return repo, manifest


def test_download_from_local_repo_layout(tmp_path, sp1024_path, val_head_shard, sample200_path, capsys):
    repo, _ = _mirror(tmp_path, sp1024_path, val_head_shard, sample200_path)
    out = tmp_path / "data"
    args = ["data", "download", "--variant", "sp1024", "--train-shards", "1", "--repo-id", str(repo),
            "--out", str(out), "--json"]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ds = out / "datasets" / "fineweb10B_sp1024"
    assert sorted(p.name for p in ds.iterdir()) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]
    assert (ds / "fineweb_val_000000.bin").read_bytes() == val_head_shard.read_bytes()
    assert (out / "tokenizers" / "fineweb_1024_bpe.model").read_bytes() == sp1024_path.read_bytes()
    assert res["shards"][0]["tokens"] == 131_072
    # resume: files that validate are kept (not re-copied)
    mtime = (ds / "fineweb_val_000000.bin").stat().st_mtime_ns
    assert main(args[:-1]) == 0
    assert (ds / "fineweb_val_000000.bin").stat().st_mtime_ns == mtime
    capsys.readouterr()
    # more train shards than published -> one line, exit 2
    assert main(["data", "download", "--variant", "sp1024", "--train-shards", "3", "--repo-id", str(repo),
                 "--out", str(tmp_path / "d2")]) == 2
    assert "only 2 training shards" in capsys.readouterr().err
    # a corrupted file in the mirror is caught by the manifest sha256
    bad = repo / "datasets" / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000001.bin"
    raw = bytearray(bad.read_bytes())
    raw[-1] ^= 0x01
    bad.write_bytes(bytes(raw))
    assert main(["data", "download", "--variant", "sp1024", "--train-shards", "2", "--repo-id", str(repo),
                 "--out", str(tmp_path / "d3")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fineweb_train_000001.bin" in err[0] and "sha256" in err[0]
    assert not (tmp_path / "d3" / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000001.bin").exists()

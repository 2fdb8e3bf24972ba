"""`distill export` and honest code bytes: the standalone train_gpt.py (distill.bundle) is what pack counts
and export writes; run in a process that cannot import the project (nor accelerate / safetensors / tqdm /
matplotlib), it scores exactly like `distill score`, retrains the same weights and packs the same file.

Run: pytest -q tests/test_export.py     (~1 min on 2 loaded cores; needs ../shared/data, else skips)
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distill import bundle, export, standalone
from distill.errors import DistillError

REPO = Path(__file__).resolve().parents[1]
TINY = ["--max-steps", "3", "--train.max_wallclock_s", "0", "--train.device", "cpu", "--train.plot", "false",
        "--model.num_layers", "2", "--model.model_dim", "64", "--model.num_heads", "2", "--model.num_kv_heads", "1",
        "--train.seq_len", "64", "--train.batch_tokens", "512", "--eval.val_max_windows", "2"]
# Run a generated script the way an evaluator without this project would: the project's packages and the
# optional dependencies cannot be imported (a finder refuses them; the script's own importer sits before
# it), the repo is off sys.path, cwd is the submission folder.
GUARD = f"""
import importlib.util, runpy, sys
BLOCK = ("distill", "student", "teachers", "accelerate", "safetensors", "tqdm", "matplotlib", "transformers")
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCK:
            raise ModuleNotFoundError("blocked " + name, name=name)
sys.meta_path.insert(0, Block())
sys.path[:] = [p for p in sys.path if "__editable__" not in p and not p.startswith({str(REPO)!r})]
try:
    import distill
    sys.exit("the project is importable")
except ModuleNotFoundError:
    pass
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_standalone(folder: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", GUARD, "train_gpt.py", *args], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def export_args(run: Path, out: Path, *extra: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    export.add_parser(ap.add_subparsers())
    return ap.parse_args(["export", str(run), "--out", str(out), *extra])


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def packed_run(tmp_path_factory, sp1024_path, sample200_path, val_head_shard):
    """A 3-step tiny CE run on real FineWeb tokens, packed at 8 bits -> (workdir, run dir, pack report)."""
    from distill.pack import pack_checkpoint
    from distill.shards import read_shard, write_shard
    from distill.tokenizer import encode_docs, load_tokenizer, pack_docs
    from student.train import main as train_main

    wd = tmp_path_factory.mktemp("export")
    sp = load_tokenizer(sp1024_path)
    docs = [json.loads(line)["text"] for line in sample200_path.read_text().splitlines()[:60]]
    write_shard(wd / "fineweb_train_000000.bin", pack_docs(encode_docs(sp, docs)))
    write_shard(wd / "fineweb_val_000000.bin", np.asarray(read_shard(val_head_shard))[:4097])
    data = ["--data.train_shards", str(wd / "fineweb_train_*.bin"), "--data.val_shards",
            str(wd / "fineweb_val_*.bin"), "--data.tokenizer", str(sp1024_path)]
    run = wd / "run"
    assert train_main(["--out", str(run), *TINY, *data]) == 0
    report = pack_checkpoint(run, run / "model.golf", progress=False)
    return wd, run, report


@pytest.fixture(scope="module")
def exported(packed_run):
    wd, run, _ = packed_run
    out = wd / "sub"
    rep = export.export_run(export_args(run, out, "--author", "A. Tester", "--github-id", "atester"))
    return out, rep


def distill_score_json(artifact: Path, val: str, tok: Path, seq_len: int) -> dict:
    proc = subprocess.run([sys.executable, "-m", "distill.cli", "score", str(artifact), "--tokenizer", str(tok),
                           "--val", val, "--seq-len", str(seq_len), "--json"], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ the bundle


def test_bundle_holds_the_package_sources_and_is_closed():
    """The script's sources are the files on disk, byte for byte, and every project import inside them
    (module-level or lazy) names a bundled module, so no code path needs the installed package."""
    script = bundle.build_script()
    sources = bundle.read_bundled_sources(script)
    assert len(sources) == len(bundle.MODULES)
    for rel, src in sources.items():
        assert (REPO / rel).read_text(encoding="utf-8") == src, rel
    bundled = set(bundle.MODULES)
    for rel, src in sources.items():
        for node in ast.walk(ast.parse(src)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for name in names:
                if name.split(".")[0] in bundle.NAMESPACES and name not in bundle.EXCLUDED:
                    assert name in bundled, f"{rel} imports {name}, which is not bundled"
    assert script == bundle.render(dict(reversed(list(sources.items()))))  # key order does not matter
    assert script.decode("ascii")  # plain ASCII text: base85 blob + ASCII bootstrap


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool])
def test_safetensors_stand_in_interoperates(tmp_path, dtype):
    """The script's minimal safetensors writer/reader and the real library read each other's files."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    t = {"w": (torch.randn(5, 3, generator=g) * 100).to(dtype), "scalar": torch.tensor(7).to(dtype),
         "empty": torch.zeros(0, 4, dtype=dtype)}
    standalone.st_save_file(t, tmp_path / "a.safetensors")
    save_file(t, str(tmp_path / "b.safetensors"))
    for got in (load_file(str(tmp_path / "a.safetensors")), standalone.st_load_file(tmp_path / "b.safetensors")):
        assert sorted(got) == sorted(t)
        for k, v in t.items():
            assert got[k].dtype == dtype and got[k].shape == v.shape and torch.equal(got[k], v), k
    with pytest.raises(standalone.SafetensorError):
        (tmp_path / "bad.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{nope")
        standalone.st_load_file(tmp_path / "bad.safetensors")


# ------------------------------------------------------------------------------------------ honest bytes


def test_pack_counts_the_script_as_code(packed_run):
    _, run, rep = packed_run
    code, file_bytes = len(bundle.build_script()), (run / "model.golf").stat().st_size
    assert rep["code_bytes"] == code > 20_000
    assert rep["model_bytes"] == file_bytes
    assert rep["artifact_bytes"] == code + file_bytes
    assert rep["model_budget_bytes"] == 16_000_000 - code and rep["budget_bytes"] == 16_000_000
    assert rep["embedded_code_bytes"] < file_bytes


def test_pack_budget_includes_code(packed_run, tmp_path):
    """budget = code + file: one byte less is refused (nothing written); --fit then fits the file into
    budget - code."""
    from distill.pack import pack_checkpoint

    _, run, rep = packed_run
    exact = rep["artifact_bytes"]
    assert pack_checkpoint(run, tmp_path / "ok.golf", budget_bytes=exact, progress=False)["artifact_bytes"] == exact
    with pytest.raises(DistillError, match="bytes of code"):
        pack_checkpoint(run, tmp_path / "no.golf", budget_bytes=exact - 1, progress=False)
    assert not (tmp_path / "no.golf").exists()
    six = pack_checkpoint(run, tmp_path / "six.golf", bits=6, progress=False, write=False)
    budget = rep["code_bytes"] + (six["model_bytes"] + rep["model_bytes"]) // 2  # 8 bits do not fit, 6 would
    fit = pack_checkpoint(run, tmp_path / "fit.golf", bits=8, budget_bytes=budget, fit=True, progress=False)
    size = (tmp_path / "fit.golf").stat().st_size
    assert fit["rd_mode"] == "fit" and size == fit["model_bytes"] <= budget - rep["code_bytes"]
    assert fit["artifact_bytes"] == size + rep["code_bytes"] <= budget


# ------------------------------------------------------------------------------------------ export


def test_export_folder(packed_run, exported):
    wd, run, rep = packed_run
    out, summary = exported
    files = tree(out)
    assert {"train_gpt.py", "final_model.golf", "submission.json", "README.md", "requirements.txt",
            "config.json", "config.toml", "logs/metrics.jsonl"} <= set(files)
    assert files["final_model.golf"] == (run / "model.golf").read_bytes()
    assert files["train_gpt.py"] == bundle.build_script()
    sub = json.loads(files["submission.json"])
    assert sub["bytes_code"] == len(files["train_gpt.py"]) == rep["code_bytes"]
    assert sub["bytes_model"] == len(files["final_model.golf"])
    assert sub["bytes_total"] == sub["bytes_code"] + sub["bytes_model"] == rep["artifact_bytes"] <= 16_000_000
    assert sub["track"] == "non_record_16mb" and sub["author"] == "A. Tester" and sub["github_id"] == "atester"
    assert sub["seeds"] == [1337] and sub["seed_results"]["1337"]["val_bpb"] == sub["val_bpb"]
    assert sub["pytorch_version"] == torch.__version__ and sub["kd"] is None
    ref = distill_score_json(run / "model.golf", str(wd / "fineweb_val_*.bin"),
                             Path(json.loads(files["config.json"])["data"]["tokenizer"]), 64)
    assert abs(sub["val_bpb"] - ref["val_bpb"]) < 1e-9 and sub["eval"]["tokens"] == ref["tokens"] == 4096
    readme = files["README.md"].decode()
    assert f"{sub['bytes_total']:,}" in readme and "python train_gpt.py eval --val" in readme
    assert "python train_gpt.py train --config config.toml --out smoke_run --max-steps 3" in readme
    assert summary["bytes_total"] == sub["bytes_total"]


def test_standalone_eval_matches_distill_score(packed_run, exported, sp1024_path):
    """train_gpt.py eval without the project installed == `distill score --json`; it writes nothing."""
    wd, _, _ = packed_run
    out, _ = exported
    val = str(wd / "fineweb_val_*.bin")
    before = {p: p.stat().st_mtime_ns for p in wd.rglob("*")}
    proc = run_standalone(out, "eval", "--val", val, "--tokenizer", str(sp1024_path), "--seq-len", "64")
    assert {p: p.stat().st_mtime_ns for p in wd.rglob("*")} == before  # no file added, none touched
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    ref = distill_score_json(out / "final_model.golf", val, sp1024_path, 64)
    assert abs(got["val_bpb"] - ref["val_bpb"]) < 1e-6
    assert got["val_loss"] == pytest.approx(ref["val_loss"], abs=1e-9)
    assert (got["tokens"], got["bytes"]) == (ref["tokens"], ref["bytes"])
    assert got["bytes_total"] == got["bytes_code"] + got["bytes_model"] == \
        json.loads((out / "submission.json").read_text())["bytes_total"]


def test_standalone_train_and_pack_reproduce_the_run(packed_run, exported, tmp_path):
    """The script retrains the same weights (same config and seed; safetensors/accelerate stand-ins) and
    packs them into the same file, counting its own size as the code."""
    from safetensors.torch import load_file

    _, run, rep = packed_run
    out, _ = exported
    folder = tmp_path / "sub"
    folder.mkdir()
    for name in ("train_gpt.py", "config.toml"):
        (folder / name).write_bytes((out / name).read_bytes())
    run_standalone(folder, "train", "--config", "config.toml", "--out", "again", *TINY)
    a, b = load_file(str(folder / "again" / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    proc = run_standalone(folder, "pack", "again", "--out", "again.golf", "--json")
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (folder / "again.golf").read_bytes() == (run / "model.golf").read_bytes()
    assert got["code_bytes"] == (folder / "train_gpt.py").stat().st_size == rep["code_bytes"]
    assert got["artifact_bytes"] == rep["artifact_bytes"]


def test_export_is_deterministic(packed_run, exported, tmp_path):
    _, run, _ = packed_run
    out, _ = exported
    again = tmp_path / "again"
    export.export_run(export_args(run, again, "--author", "A. Tester", "--github-id", "atester"))
    assert tree(again) == tree(out)


def test_export_refusals(packed_run, tmp_path, monkeypatch):
    _, run, rep = packed_run
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((run / name).read_bytes())
    with pytest.raises(DistillError, match="distill pack"):
        export.export_run(export_args(bare, tmp_path / "o1"))
    with pytest.raises(DistillError, match="10-minute budget"):
        export.check_track("10min_16mb", {"kd": {"teacher_cache": "c"}, "train": {"max_wallclock_s": 600}}, 100.0)
    with pytest.raises(DistillError, match="capped"):
        export.check_track("10min_16mb", {"kd": {}, "train": {"max_wallclock_s": 0}}, 100.0)
    export.check_track("10min_16mb", {"kd": {"teacher_cache": ""}, "train": {"max_wallclock_s": 600}}, 599.0)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(DistillError, match="--force"):
        export.export_run(export_args(run, tmp_path / "full"))
    assert (tmp_path / "full" / "x").read_text() == "keep"
    monkeypatch.setattr(export, "BUDGET_BYTES", rep["artifact_bytes"] - 1)
    with pytest.raises(DistillError, match="over the"):
        export.export_run(export_args(run, tmp_path / "o2"))
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_export_from_saved_score(packed_run, exported, tmp_path):
    """--score takes a saved `distill score --json` output (e.g. the demo's logs/score_kd.log) instead of
    scoring again: same numbers; an output for another file, or a partial one, is refused."""
    _, run, _ = packed_run
    out, _ = exported
    sub = json.loads((out / "submission.json").read_text())
    saved = {"model": str(run / "model.golf"), "val_loss": sub["val_loss"], "val_bpb": sub["val_bpb"],
             "tokens": sub["eval"]["tokens"], "bytes": sub["eval"]["bytes"], "seq_len": 64, "stride": None,
             "partial": False, "tokenizer": "t.model"}
    log = tmp_path / "score.log"
    log.write_text("score | ...\n" + json.dumps(saved) + "\n")
    rep = export.export_run(export_args(run, tmp_path / "o", "--score", str(log)))
    assert rep["val_bpb"] == sub["val_bpb"] and rep["bytes_total"] == sub["bytes_total"]
    for bad in ({**saved, "model": str(tmp_path / "other.golf")}, {**saved, "partial": True}):
        log.write_text(json.dumps(bad) + "\n")
        with pytest.raises(DistillError, match="--score"):
            export.export_run(export_args(run, tmp_path / "o2", "--score", str(log)))

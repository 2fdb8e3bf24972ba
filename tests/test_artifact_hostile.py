"""Hostile artifacts: every malformed file is refused with ONE line (DistillError; exit 2 from `distill score`),
in under 5 s and 500 MB peak memory — codec bombs in every section for every codec, absurd model configs,
transposed shapes, swapped embedded code, truncation, flipped bytes. Also: valid files still load bit-exactly
through the bounded decompressors (every codec), files without the code sha256 (older writers) still load,
and resume state loads with torch.load(weights_only=True) and round-trips exactly.

The files are built here: valid ones with the writer (distill.artifact.encode_artifact), hostile ones by
re-assembling sections with a correct header checksum (an attacker can compute it, so the checksum is no
defence). Bombs decompress to 1 GiB (each is checked independently, by streaming, to exceed the memory limit).
Peak memory is the peak RSS (VmHWM, else ru_maxrss) of a subprocess that loads every file in turn.

Run: python -m pytest -q tests/test_artifact_hostile.py      (~1 min on a loaded 2-core box)
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import lzma
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distill import artifact, quant
from distill.artifact import Entry
from distill.errors import DistillError
from student.model import GPT, ModelConfig

REPO = Path(__file__).resolve().parents[1]
TINY = {"vocab_size": 64, "num_layers": 2, "model_dim": 32, "num_heads": 2, "num_kv_heads": 1}
BOMB_BYTES = 1 << 30
PEAK_LIMIT_BYTES = 500_000_000
TIME_LIMIT_S = 5.0
HAVE_BROTLI = importlib.util.find_spec("brotli") is not None
CODECS = ["zstd", "lzma"] + (["brotli"] if HAVE_BROTLI else [])
SECTIONS = ("code", "meta", "weights")


# --------------------------------------------------------------------------------------------- builders


def tiny_entries(cfg: dict = TINY, seed: int = 0) -> list[Entry]:
    """A tiny GPT's tensors as the packer stores them: 2-D matrices 6-bit RTN, the rest fp16."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig(**cfg))
    entries = []
    for name, t in model.state_dict().items():
        t = t + 0.02 * torch.randn_like(t)
        if t.dim() == 2:
            q, s = quant.quantize_rtn(t, 6)
            entries.append(Entry(name, list(t.shape), 6, codes=q, scales=s, clip="absmax*1", method="rtn"))
        else:
            entries.append(Entry(name, list(t.shape), 16, values=t.to(torch.float16)))
    return entries


def valid_file(codec: str = "zstd", entries: list[Entry] | None = None, cfg: dict = TINY) -> bytes:
    return artifact.encode_artifact(entries or tiny_entries(cfg), cfg, [codec], ["byte"])[0]


def split(data: bytes) -> dict:
    """A file's header fields and raw (still compressed) sections — parsed independently of the reader."""
    f = artifact._HEAD.unpack_from(data)
    clen, mlen = f[6], f[7]
    body = data[artifact.HEADER_BYTES:]
    return {"codecs": [artifact.CODECS[i] for i in f[2:5]], "layout": artifact.quant.LAYOUTS[f[5]],
            "code": body[:clen], "meta": body[clen:clen + mlen], "weights": body[clen + mlen:]}


def craft(code: bytes, meta: bytes, weights: bytes, codecs=("zstd", "zstd", "zstd"), layout: str = "byte") -> bytes:
    """Assemble compressed sections into a file with a CORRECT header checksum (a codec may be a raw id)."""
    ids = (artifact.CODEC_IDS.get(c, c) for c in codecs)
    head = artifact._HEAD.pack(artifact.MAGIC, artifact.FORMAT_VERSION, *ids,
                               artifact.LAYOUT_IDS[layout], len(code), len(meta), len(weights))
    body = code + meta + weights
    return head + hashlib.sha256(head + body).digest() + body


def raw_meta(data: bytes) -> dict:
    s = split(data)
    import zstandard

    assert s["codecs"][1] == "zstd"
    return json.loads(zstandard.ZstdDecompressor().decompress(s["meta"]))


def with_meta(data: bytes, meta: dict | bytes, code: bytes | None = None) -> bytes:
    """`data` with its meta (and optionally its code) section replaced, recompressed with zstd."""
    s = split(data)
    m = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    c = s["code"] if code is None else artifact.compress(code, "zstd")
    return craft(c, artifact.compress(m, "zstd"), s["weights"], ("zstd", "zstd", s["codecs"][2]), s["layout"])


def make_bomb(kind: str) -> bytes:
    """A stream that decompresses to BOMB_BYTES zero bytes."""
    chunk = bytes(1 << 24)
    if kind.startswith("zstd"):
        import zstandard

        declared = kind == "zstd"
        co = zstandard.ZstdCompressor(level=1, write_content_size=declared).compressobj(
            size=BOMB_BYTES if declared else -1)
        return b"".join(co.compress(chunk) for _ in range(BOMB_BYTES // len(chunk))) + co.flush()
    if kind == "lzma":  # 64 MiB of zeros as raw LZMA2 chunks (dict reset in the first), repeated 16 times
        lc = lzma.LZMACompressor(format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 0}])
        one = lc.compress(bytes(1 << 26)) + lc.flush()
        assert one[-1] == 0  # the LZMA2 end marker
        return one[:-1] * (BOMB_BYTES >> 26) + b"\x00"
    import brotli

    bc = brotli.Compressor(quality=1)
    return b"".join(bc.process(chunk) for _ in range(BOMB_BYTES // len(chunk))) + bc.finish()


def streamed_size(blob: bytes, kind: str, stop: int) -> int:
    """Decompressed size of `blob` counted in 16 MiB pieces, stopping once past `stop` (test-side check)."""
    n = 0
    if kind.startswith("zstd"):
        import zstandard

        with zstandard.ZstdDecompressor().stream_reader(blob) as r:
            while n <= stop and (piece := r.read(1 << 24)):
                n += len(piece)
    elif kind == "lzma":
        d = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=artifact._LZMA_FILTERS)
        buf = blob
        while n <= stop and not d.eof:
            piece, buf = d.decompress(buf, max_length=1 << 24), b""
            n += len(piece)
    else:
        import brotli

        d = brotli.Decompressor()
        piece = d.process(blob, output_buffer_limit=1 << 24)
        while True:
            n += len(piece)
            if n > stop or d.is_finished():
                break
            piece = d.process(b"", output_buffer_limit=1 << 24)
    return n


BOMB_KINDS = ["zstd", "zstd-undeclared", "lzma"] + (["brotli"] if HAVE_BROTLI else [])


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    out = {k: make_bomb(k) for k in BOMB_KINDS}
    for k, b in out.items():  # really bombs: each would take more than the whole memory limit
        assert len(b) < 200_000 and streamed_size(b, k, PEAK_LIMIT_BYTES) > PEAK_LIMIT_BYTES, k
    return out


def hostile_files(d: Path, bombs: dict[str, bytes]) -> dict[str, Path]:
    """name -> path of every malformed file (each must be refused)."""
    good = valid_file()
    s = split(good)
    meta = raw_meta(good)
    files: dict[str, bytes] = {}
    # codec bombs: every codec in every section (the other sections valid)
    for kind, bomb in bombs.items():
        codec = kind.split("-")[0]
        for sec in SECTIONS:
            parts = {k: s[k] for k in SECTIONS}
            codecs = list(s["codecs"])
            parts[sec], codecs[SECTIONS.index(sec)] = bomb, codec
            files[f"bomb-{kind}-{sec}"] = craft(parts["code"], parts["meta"], parts["weights"], codecs, s["layout"])

    def meta_case(name: str, **changes) -> None:
        m = json.loads(json.dumps(meta))
        for k, v in changes.items():
            m[k] = v
        files[name] = with_meta(good, m)

    def config_case(name: str, **changes) -> None:
        meta_case(name, config={**meta["config"], **changes})

    # absurd configs
    config_case("config-vocab1e6-dim4096", vocab_size=1_000_000, model_dim=4096)
    config_case("config-200k-layers", num_layers=200_000)
    config_case("config-negative-dim", model_dim=-32)
    config_case("config-string-layers", num_layers="2")
    config_case("config-bool-heads", num_heads=True)
    config_case("config-heads-not-dividing", num_heads=3)
    config_case("config-mlp-mult-huge", mlp_mult=1e9)
    config_case("config-nested", rope_base={"x": 1})
    meta_case("config-not-object", config=[1, 2])
    inf = json.dumps({**meta, "config": {**meta["config"], "logit_softcap": "INF"}}).replace('"INF"', "1e999")
    files["meta-inf-softcap"] = with_meta(good, inf.encode())
    # tensor metadata that disagrees with the model or the file
    t = meta["tensors"]
    big = [dict(x) for x in t]
    big[0]["s"] = [1_000_000, 4096]
    meta_case("tensors-huge-declared", tensors=big)
    zero_cfg = {**TINY, "vocab_size": 8192, "model_dim": 512, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2}
    zero = [Entry(e.name, e.shape, 16, values=torch.zeros(e.shape, dtype=torch.float16))
            for e in tiny_entries(zero_cfg)]  # a consistent 12M-param model of zeros: a few KB compressed
    files["consistent-12M-params-of-zeros"] = valid_file("zstd", zero, zero_cfg)
    i2 = next(i for i, x in enumerate(t) if len(x["s"]) == 2 and x["s"][0] != x["s"][1])
    tr = [dict(x) for x in t]
    tr[i2]["s"] = tr[i2]["s"][::-1]  # same byte count, transposed
    meta_case("transposed-shape", tensors=tr)
    for name, bad in {"bits-99": 99, "bits-float": 6.5, "bits-1": 1}.items():
        bt = [dict(x) for x in t]
        bt[i2]["b"] = bad
        meta_case(f"tensor-{name}", tensors=bt)
    zt = [dict(x) for x in t]
    zt[0]["s"] = [0, 4]
    meta_case("tensor-zero-dim", tensors=zt)
    meta_case("tensor-duplicate-name", tensors=t + t[:1])
    meta_case("tensors-not-list", tensors={"a": 1})
    meta_case("tensors-empty", tensors=[])
    missing = [x for x in t if x["n"] != t[-1]["n"]]
    meta_case("tensor-missing", tensors=missing)
    meta_case("layout-mismatch", layout="dense")
    meta_case("code-sha-wrong", code_sha256="0" * 64)
    files["meta-not-json"] = with_meta(good, b"{not json")
    files["meta-huge-int"] = with_meta(good, b'{"format": "distill-artifact", "n": 1' + b"0" * 10_000 + b"}")
    files["meta-deep-nesting"] = with_meta(good, b"[" * 200_000 + b"]" * 200_000)
    # swapped embedded code (refused unless --trust-code), with and without a matching code_sha256
    evil = b"raise RuntimeError('embedded code ran')\n"
    files["code-swapped"] = with_meta(good, {**meta, "code_sha256": hashlib.sha256(evil).hexdigest()}, code=evil)
    legacy = {k: v for k, v in meta.items() if k != "code_sha256"}
    files["code-swapped-no-sha"] = with_meta(good, legacy, code=evil)
    # weights section: too short / too long / not a frame
    import zstandard

    wraw = zstandard.ZstdDecompressor().decompress(s["weights"])
    files["weights-short"] = craft(s["code"], s["meta"], artifact.compress(wraw[:-2], "zstd"))
    files["weights-long"] = craft(s["code"], s["meta"], artifact.compress(wraw + b"\0\0", "zstd"))
    files["weights-garbage"] = craft(s["code"], s["meta"], bytes(range(256)) * 4)
    files["weights-lzma-truncated"] = craft(s["code"], s["meta"], artifact.compress(wraw, "lzma")[:-20],
                                            ("zstd", "zstd", "lzma"))
    # truncation and flipped bytes (the header's checksum / lengths catch them)
    for n in (0, 10, artifact.HEADER_BYTES - 1, artifact.HEADER_BYTES + 5, len(good) // 2, len(good) - 1):
        files[f"truncated-{n}"] = good[:n]
    for pos in (9, 12, 20, artifact.HEADER_BYTES + 3, len(good) // 2, len(good) - 1):
        b = bytearray(good)
        b[pos] ^= 0x10
        files[f"flipped-{pos}"] = bytes(b)
    files["wrong-magic"] = b"NOTGOLF!" + good[8:]
    files["unknown-codec"] = craft(s["code"], s["meta"], s["weights"], ("zstd", "zstd", 9))
    paths = {}
    for name, data in files.items():
        p = d / f"{name}.art"
        p.write_bytes(data)
        paths[name] = p
    return paths


RUNNER = r"""
import contextlib, io, json, resource, sys, time
mode, files, extra = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
from distill.errors import DistillError
from distill.cli import main
from distill.artifact import load_artifact

def peak():
    # VmHWM: this process's own peak RSS. ru_maxrss would do, but Linux carries it over fork+exec, so it
    # starts at the (large) pytest parent's RSS; it is the fallback where /proc is absent
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

print(json.dumps({"baseline_peak_bytes": peak()}), flush=True)
for f in files:
    t0, err = time.perf_counter(), io.StringIO()
    try:
        if mode == "cli":
            with contextlib.redirect_stderr(err):
                rc = main(["score", f, *extra])
            msg = err.getvalue()
        else:
            load_artifact(f)
            rc, msg = 0, ""
    except DistillError as e:
        rc, msg = 2, "distill: error: " + str(e) + "\n"
    except BaseException as e:
        rc, msg = 99, "UNCAUGHT " + type(e).__name__ + ": " + str(e)[:300]
    print(json.dumps({"file": f, "rc": rc, "msg": msg, "s": time.perf_counter() - t0, "peak_bytes": peak()}),
          flush=True)
"""


def run_all(mode: str, paths: list[Path], extra) -> tuple[int, list[dict]]:
    p = subprocess.run([sys.executable, "-c", RUNNER, mode, json.dumps([str(x) for x in paths]), json.dumps(extra)],
                       capture_output=True, text=True, cwd=REPO, timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    return lines[0]["baseline_peak_bytes"], lines[1:]


def check_refusals(rows: list[dict], paths: dict[str, Path]) -> None:
    by_file = {r["file"]: r for r in rows}
    bad = []
    for name, path in paths.items():
        r = by_file[str(path)]
        msg = r["msg"].rstrip("\n")
        ok = (r["rc"] == 2 and msg.startswith("distill: error: ") and "\n" not in msg and str(path) in msg
              and r["s"] < TIME_LIMIT_S)
        if not ok:
            bad.append(f"{name}: rc={r['rc']} {r['s']:.2f}s {msg[:200]!r}")
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------------------------------------ tests


def test_every_hostile_file_is_refused_in_one_line_bounded(tmp_path, bombs):
    """Library path (load_artifact): each hostile file -> one-line DistillError naming the file, < 5 s each,
    the subprocess's peak RSS (torch loaded) < 500 MB over all of them."""
    paths = hostile_files(tmp_path, bombs)
    assert len(paths) >= 50
    baseline, rows = run_all("lib", list(paths.values()), {})
    check_refusals(rows, paths)
    peak = max(r["peak_bytes"] for r in rows)
    worst = max(rows, key=lambda r: r["s"])
    print(f"{len(rows)} files; baseline {baseline / 1e6:.0f} MB, peak {peak / 1e6:.0f} MB; slowest "
          f"{Path(worst['file']).name} {worst['s']:.2f} s")
    assert peak < PEAK_LIMIT_BYTES, [(Path(r["file"]).name, r["peak_bytes"]) for r in rows]
    msgs = {name: next(r["msg"] for r in rows if r["file"] == str(p)) for name, p in paths.items()}
    # the refusals name the real problem (not just "cannot load")
    assert "declares 1073741824 bytes" in msgs["bomb-zstd-weights"]
    assert "more than the" in msgs["bomb-zstd-undeclared-meta"] and "more than the" in msgs["bomb-lzma-code"]
    assert "the model config implies" in msgs["transposed-shape"]
    assert "num_layers=200000 is not an int in [1, 256]" in msgs["config-200k-layers"]
    assert "per byte" in msgs["consistent-12M-params-of-zeros"]
    assert "differs from the installed student/model.py" in msgs["code-swapped"]
    assert "differs from the installed student/model.py" in msgs["code-swapped-no-sha"]
    assert "does not match its recorded sha256" in msgs["code-sha-wrong"]


def test_cli_score_exits_2_on_hostile_files(tmp_path, bombs, sp1024_path):
    """`distill score ART ...` (cli.main in one process, then one real console run): exit 2, one line."""
    from distill.shards import write_shard

    val = tmp_path / "fineweb_val_000000.bin"
    write_shard(val, np.arange(4096) % 1024)
    paths = hostile_files(tmp_path, bombs)
    pick = {k: v for k, v in paths.items() if k.startswith(("bomb-", "config-vocab", "transposed", "code-swapped",
                                                              "truncated-", "flipped-", "consistent"))}
    extra = ["--tokenizer", str(sp1024_path), "--val", str(val), "--seq-len", "16", "--device", "cpu"]
    _baseline, rows = run_all("cli", list(pick.values()), extra)
    check_refusals(rows, pick)
    assert max(r["peak_bytes"] for r in rows) < PEAK_LIMIT_BYTES
    p = subprocess.run([sys.executable, "-m", "distill.cli", "score", str(paths["bomb-zstd-weights"]), *extra],
                       capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "declares 1073741824 bytes" in p.stderr


@pytest.mark.parametrize("codec", CODECS)
def test_valid_files_load_bit_exactly_through_bounded_decompression(codec, tmp_path):
    """Every codec: the bounded reader returns exactly what was written (dequantized values bit-exact)."""
    entries = tiny_entries(seed=1)
    path = tmp_path / f"ok-{codec}.art"
    path.write_bytes(valid_file(codec, entries))
    assert split(path.read_bytes())["codecs"] == [codec] * 3
    sd = artifact.load_artifact(path).state_dict()
    assert set(sd) == {e.name for e in entries}
    for e in entries:
        assert torch.equal(sd[e.name], e.dequantized()), e.name
    assert artifact.read_artifact_info(path)["code_sha256"] == hashlib.sha256(artifact.model_source()).hexdigest()


def test_older_files_without_code_sha_still_load(tmp_path):
    good = valid_file()
    meta = raw_meta(good)
    del meta["code_sha256"]
    old, new = tmp_path / "old.art", tmp_path / "new.art"
    old.write_bytes(with_meta(good, meta))
    new.write_bytes(good)
    assert "code_sha256" not in raw_meta(old.read_bytes())
    a, b = artifact.load_artifact(old), artifact.load_artifact(new)
    ids = torch.arange(16)[None] % TINY["vocab_size"]
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


def test_swapped_code_runs_only_with_trust_code(tmp_path):
    """Default: refused before executing anything. trust_code=True runs the file's code (as documented)."""
    good = valid_file()
    meta = raw_meta(good)
    marker = tmp_path / "ran"
    evil = f"open({str(marker)!r}, 'w').write('x')\nraise RuntimeError('boom')\n".encode()
    p = tmp_path / "evil.art"
    p.write_bytes(with_meta(good, {**meta, "code_sha256": hashlib.sha256(evil).hexdigest()}, code=evil))
    with pytest.raises(DistillError, match="differs from the installed student/model.py") as ei:
        artifact.load_artifact(p)
    assert "\n" not in str(ei.value) and not marker.exists()
    with pytest.raises(DistillError, match="embedded model code failed \\(RuntimeError: boom\\)"):
        artifact.load_artifact(p, trust_code=True)
    assert marker.exists()
    # a genuine file under trust_code: the embedded source builds the model
    ok = tmp_path / "ok.art"
    ok.write_bytes(good)
    assert type(artifact.load_artifact(ok, trust_code=True)).__module__ == "distill_artifact_model"


def test_decompress_caps_each_codec_exactly():
    """decompress(max_bytes): exactly max_bytes is fine, one byte more is refused (never returned)."""
    data = bytes(range(256)) * 400
    for codec in CODECS:
        blob = artifact.compress(data, codec)
        assert artifact.decompress(blob, codec, len(data)) == data
        with pytest.raises(DistillError, match="more than the"):
            artifact.decompress(blob, codec, len(data) - 1)
        with pytest.raises(DistillError, match="where-x"):
            artifact.decompress(blob[: len(blob) // 2], codec, len(data), "where-x")


# ------------------------------------------------------------------------------------- resume state


def test_resume_state_is_weights_only_and_exact(tmp_path):
    """save_resume/load_resume: numpy RNG state, numpy scalars and arrays, python RNG, tensors, tuples come
    back identical (types included), and the file loads with torch.load(weights_only=True)."""
    import random

    from student.checkpoint import load_resume, rng_state, save_resume

    np.random.seed(1)
    random.seed(2)
    np.random.rand(5)
    obj = {"rng": rng_state(), "loader": {"shard": np.int64(3), "pos": 17, "epoch": 0},
           "arr": np.arange(12, dtype=np.uint16).reshape(3, 4), "empty": np.zeros((0, 2), np.float32),
           "t": torch.randn(3, dtype=torch.bfloat16), "tup": (1, 2.5, "x", None), "f32": np.float32(0.1)}
    save_resume(tmp_path, "state", obj)
    torch.load(tmp_path / "resume" / "state.pt", weights_only=True)  # no pickle globals needed
    back = load_resume(tmp_path, "state")
    assert back["rng"]["python"] == obj["rng"]["python"]
    n0, n1 = obj["rng"]["numpy"], back["rng"]["numpy"]
    assert type(n1) is tuple and n1[0] == n0[0] and n1[1].dtype == n0[1].dtype and np.array_equal(n1[1], n0[1])
    assert n1[2:] == n0[2:] and torch.equal(back["rng"]["torch"], obj["rng"]["torch"])
    assert type(back["loader"]["shard"]) is np.int64 and back["loader"]["shard"] == 3
    assert back["arr"].dtype == np.uint16 and np.array_equal(back["arr"], obj["arr"])
    assert back["empty"].shape == (0, 2) and back["empty"].dtype == np.float32
    assert torch.equal(back["t"], obj["t"]) and back["tup"] == obj["tup"]
    assert type(back["f32"]) is np.float32 and back["f32"] == obj["f32"]
    np.random.set_state(back["rng"]["numpy"])
    a = np.random.rand()
    np.random.set_state(obj["rng"]["numpy"])
    assert a == np.random.rand()


class _Evil:
    def __reduce__(self):
        return (exec, ("open(__import__('os').environ['EVIL_MARKER'], 'w').write('x')",))


def test_resume_with_code_is_refused_without_running_it(tmp_path, monkeypatch):
    from student.checkpoint import load_resume

    marker = tmp_path / "ran"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    (tmp_path / "resume").mkdir()
    torch.save({"step": 1, "x": _Evil()}, tmp_path / "resume" / "state.pt", pickle_module=pickle)
    with pytest.raises(DistillError, match="weights_only=True") as ei:
        load_resume(tmp_path, "state")
    assert "\n" not in str(ei.value) and not marker.exists()

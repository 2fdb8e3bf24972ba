"""`distill score` against an INDEPENDENT implementation of the challenge's metric, the known byte-count
bugs, and bad inputs.

The reference below never touches distill.metric or ByteLUTs: plain loops over windows, float64 NLL from
torch.log_softmax in float64, and bytes from decoding each target piece to its UTF-8 bytes (a decoder
that is itself checked against SentencePiece's own decode of whole documents).

Run: python -m pytest -q tests/test_score.py      (~40 s; needs ../shared/data, skips without it)
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.cli import main
from distill.errors import DistillError
from distill.score import check_space_piece
from distill.shards import read_shard, write_shard
from distill.tokenizer import CHALLENGE_SPEC, build_luts, encode_docs, load_tokenizer, pack_docs
from student.checkpoint import save_checkpoint
from student.model import GPT, ModelConfig

REPO = Path(__file__).resolve().parents[1]
SPACE = "\u2581"


# ---------------------------------------------------------------------------- independent reference


class PieceDecoder:
    """UTF-8 bytes each target piece adds to the decoded text (SentencePiece's decoding rules)."""

    def __init__(self, sp):
        self.sp = sp
        self.cache: dict[tuple[int, bool], bytes] = {}

    def piece_bytes(self, tid: int, at_doc_start: bool) -> bytes:
        key = (tid, at_doc_start)
        if key not in self.cache:
            sp = self.sp
            if sp.is_control(tid) or sp.is_unknown(tid) or sp.is_unused(tid):
                out = b""  # sentinels decode to nothing
            elif sp.is_byte(tid):
                out = bytes([int(sp.id_to_piece(tid)[3:-1], 16)])  # "<0xE2>" is the raw byte 0xE2
            else:
                text = sp.id_to_piece(tid).replace(SPACE, " ")
                if at_doc_start and text.startswith(" "):
                    text = text[1:]  # the decoder drops a document's leading whitespace
                out = text.encode("utf-8")
            self.cache[key] = out
        return self.cache[key]

    def is_start(self, prev: int) -> bool:
        sp = self.sp
        return bool(sp.is_control(prev) or sp.is_unknown(prev) or sp.is_unused(prev))

    def decode(self, ids) -> bytes:
        """Bytes of a stream [BOS, a, b, ...] from its pieces (targets ids[1:], each after its input)."""
        return b"".join(self.piece_bytes(int(t), self.is_start(int(p))) for p, t in pairwise(ids))

    def target_bytes(self, prev: int, tgt: int) -> int:
        return len(self.piece_bytes(tgt, self.is_start(prev)))


@torch.no_grad()
def reference_score(model, tokens: np.ndarray, sp, L: int, stride: int | None = None) -> dict:
    """The challenge's metric written out: truncate, window, float64 NLL, decoded bytes."""
    dec = PieceDecoder(sp)
    toks = np.asarray(tokens, dtype=np.int64)
    n_targets = ((len(toks) - 1) // L) * L  # tokens kept: n_targets + 1
    s = L if stride is None else stride
    windows = []  # (start, first scored position in the window)
    ws = 0
    while ws + L <= n_targets:
        windows.append((ws, 0 if ws == 0 else L - s))
        ws += s
    last_end = windows[-1][0] + L
    if last_end < n_targets:  # stride does not divide: one more window flush with the end
        windows.append((n_targets - L, L - (n_targets - last_end)))
    seen = np.zeros(n_targets, dtype=np.int64)
    nll_sum, n_bytes = 0.0, 0
    for ws, first in windows:
        x = toks[ws : ws + L]
        y = toks[ws + 1 : ws + L + 1]
        logp = torch.log_softmax(model(torch.from_numpy(x)[None]).double()[0], dim=-1)
        for j in range(first, L):
            nll_sum += -float(logp[j, y[j]])
            n_bytes += dec.target_bytes(int(x[j]), int(y[j]))
            seen[ws + j] += 1
    assert (seen == 1).all()  # every target scored exactly once
    n_tok = int(seen.sum())
    return {"val_loss": nll_sum / n_tok, "val_bpb": nll_sum / (math.log(2) * n_bytes), "tokens": n_tok,
            "bytes": n_bytes, "windows": len(windows)}


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is several times faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_checkpoint(d: Path, vocab_size: int, seed: int = 0) -> Path:
    cfg = ModelConfig(vocab_size=vocab_size, num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2)
    torch.manual_seed(seed)
    model = GPT(cfg)
    for p in model.parameters():  # random, non-trivial predictions (zero-init projections would be flat)
        p.data.normal_(0.0, 0.3)
    save_checkpoint(d, model, {"model": cfg.to_dict()})
    return d


def load_ckpt_model(d: Path):
    import student

    return student.load_checkpoint(d)


@pytest.fixture(scope="module")
def ckpt1024(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt1024"), 1024)


def run_score(capsys, *args: str) -> dict:
    assert main(["score", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def assert_same(ours: dict, ref: dict) -> None:
    assert ours["tokens"] == ref["tokens"] and ours["bytes"] == ref["bytes"] and ours["windows"] == ref["windows"]
    assert ours["val_bpb"] == pytest.approx(ref["val_bpb"], rel=1e-4)
    assert ours["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-4)


# ---------------------------------------------------------------------------- acceptance: official val head


def test_val_head_bytes_and_bpb_match_reference(ckpt1024, sp1024_path, val_head_shard, val_head_docs, capsys):
    sp = load_tokenizer(sp1024_path)
    dec = PieceDecoder(sp)
    tokens = np.asarray(read_shard(val_head_shard))
    # the piece decoder is SentencePiece's decode: whole docs agree byte for byte
    starts = list(np.flatnonzero(tokens == 1)) + [len(tokens)]
    for a, b in list(pairwise(starts))[:-1]:  # the last doc is cut by the shard: skip it
        assert dec.decode(tokens[a:b]) == sp.decode(tokens[a + 1 : b].tolist()).encode("utf-8")
    assert len(dec.decode(tokens)) == 315_257  # the official LUT count over tokens[1:]
    L = 1024  # 131,071 targets is prime: 127 windows score the first 130,048 of them
    ours = run_score(capsys, str(ckpt1024), "--tokenizer", str(sp1024_path), "--val", str(val_head_shard),
                     "--seq-len", str(L), "--batch-size", "16")
    assert ours["tokens"] == 127 * L
    assert ours["bytes"] == len(dec.decode(tokens[: 127 * L + 1]))
    ref = reference_score(load_ckpt_model(ckpt1024), tokens, sp, L)
    assert_same(ours, ref)
    assert ours["model"] == str(ckpt1024) and ours["seq_len"] == L and ours["stride"] is None


# ---------------------------------------------------------------------------- acceptance: other text


@pytest.fixture(scope="module")
def shakespeare_shard(tmp_path_factory, sp1024_path, shared_data):
    """tinyshakespeare paragraphs -> shards with `distill data build --no-curate` (sp1024)."""
    src = shared_data / "fallback" / "tinyshakespeare_input.txt"
    if not src.exists():
        pytest.skip("tinyshakespeare not available")
    out = tmp_path_factory.mktemp("shakes")
    assert main(["data", "build", "--docs", str(src), "--tokenizer", str(sp1024_path), "--out", str(out),
                 "--no-curate", "--val-docs", "150", "--max-docs", "150", "--workers", "1"]) == 0
    return out / "fineweb_val_000000.bin"


def test_other_text_default_and_sliding(ckpt1024, sp1024_path, shakespeare_shard, capsys):
    sp = load_tokenizer(sp1024_path)
    tokens = np.asarray(read_shard(shakespeare_shard))
    assert 5_000 < len(tokens) < 30_000
    model = load_ckpt_model(ckpt1024)
    common = [str(ckpt1024), "--tokenizer", str(sp1024_path), "--val", str(shakespeare_shard), "--seq-len", "256"]
    default = run_score(capsys, *common)
    assert_same(default, reference_score(model, tokens, sp, 256))
    # stride == L is the default exactly
    same = run_score(capsys, *common, "--stride", "256")
    for k in ("val_loss", "val_bpb", "tokens", "bytes", "windows"):
        assert same[k] == default[k]
    # sliding windows: every target scored once (the reference asserts it), same tokens and bytes
    slide = run_score(capsys, *common, "--stride", "64", "--batch-size", "32")
    assert_same(slide, reference_score(model, tokens, sp, 256, stride=64))
    assert slide["tokens"] == default["tokens"] and slide["bytes"] == default["bytes"]
    assert slide["windows"] > default["windows"]
    # a stride that does not divide L: the final window is flush with the end, still each target once
    odd = run_score(capsys, *common, "--stride", "100", "--batch-size", "32")
    assert_same(odd, reference_score(model, tokens, sp, 256, stride=100))


def test_artifact_scores_like_its_model(ckpt1024, sp1024_path, shakespeare_shard, tmp_path, capsys):
    from distill.artifact import load_artifact
    from distill.pack import pack_checkpoint

    art = tmp_path / "m.golf"
    pack_checkpoint(ckpt1024, art, bits=8, codec="zstd", min_quant_numel=1024, progress=False)
    sp = load_tokenizer(sp1024_path)
    tokens = np.asarray(read_shard(shakespeare_shard))
    ours = run_score(capsys, str(art), "--tokenizer", str(sp1024_path), "--val", str(shakespeare_shard),
                     "--seq-len", "512")
    assert_same(ours, reference_score(load_artifact(art), tokens, sp, 512))


# ---------------------------------------------------------------------------- known byte-count bugs


def _train_sp(prefix: Path, texts: list[str], vocab: int, **extra) -> object:
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(prefix), vocab_size=vocab,
                                   minloglevel=2, num_threads=2, **{**CHALLENGE_SPEC, **extra})
    return load_tokenizer(str(prefix) + ".model")


@pytest.fixture(scope="module")
def bug_setup(tmp_path_factory, sample200_path, shared_data):
    d = tmp_path_factory.mktemp("bugs")
    docs = [json.loads(x)["text"] for x in sample200_path.read_text().splitlines()]
    train, held_out = docs[:60], docs[150:175]
    wiki = (shared_data / "fallback" / "wikitext2_valid.txt").read_text().split("\n \n")[:40]
    eval_docs = held_out + [w for w in wiki if w.strip()]
    good = _train_sp(d / "good", train, 512)
    # the community bug: a tokenizer with no standalone "▁" (here: declared a control symbol)
    nospace = _train_sp(d / "nospace", train, 512, control_symbols=[SPACE])
    return d, eval_docs, good, nospace


def _true_bytes(sp, docs: list[str]) -> int:
    """UTF-8 bytes of the text the tokenizer actually encodes (its nmt_nfkc normalisation)."""
    return sum(len(sp.normalize(t).replace(SPACE, " ").encode("utf-8")) for t in docs)


def _lut_bytes(luts, stream: np.ndarray) -> int:
    return int(luts.target_bytes(stream[:-1], stream[1:]).sum())


def _buggy_bytes(sp, stream: np.ndarray, bug: str) -> int:
    """The byte count as the buggy community variants computed it."""
    total = 0
    for p, t in pairwise(stream.tolist()):
        piece = sp.id_to_piece(t)
        boundary = sp.is_control(p) or sp.is_unknown(p) or sp.is_unused(p)
        if sp.is_control(t) or sp.is_unknown(t) or sp.is_unused(t):
            total += len(piece.encode()) if bug == "sentinels" else 0
        elif sp.is_byte(t):
            total += 3 if bug == "byte3" else 1
        else:
            lead = piece.startswith(SPACE)
            body = piece.replace(SPACE, " ") if bug == "space_twice" else piece.lstrip(SPACE)
            total += len(body.encode()) + (lead and not boundary)
    return total


@pytest.mark.parametrize("bug", ["byte3", "space_twice", "sentinels"])
def test_lut_matches_true_bytes_where_buggy_counts_differ(bug_setup, bug):
    _, docs, sp, _ = bug_setup
    stream = pack_docs(encode_docs(sp, docs))
    assert np.isin(stream, [i for i in range(sp.vocab_size()) if sp.is_byte(i)]).sum() > 50  # byte pieces occur
    true = _true_bytes(sp, docs)
    assert _lut_bytes(build_luts(sp, sp.vocab_size()), stream) == true
    assert len(PieceDecoder(sp).decode(stream)) == true
    assert _buggy_bytes(sp, stream, bug) != true  # the situation does exercise the bug


def test_tokenizer_without_space_piece_is_refused(bug_setup, tmp_path, capsys):
    d, docs, good, nospace = bug_setup
    stream = pack_docs(encode_docs(nospace, docs))
    true = _true_bytes(nospace, docs)
    lut = _lut_bytes(build_luts(nospace, nospace.vocab_size()), stream)
    assert lut > 1.1 * true  # each space is 3 byte tokens: bytes overstated, bpb understated
    check_space_piece(good, "good.model")  # the challenge-spec tokenizer passes
    with pytest.raises(DistillError, match="standalone"):
        check_space_piece(nospace, "nospace.model")
    shard = tmp_path / "fineweb_val_000000.bin"
    write_shard(shard, stream)
    ckpt = make_checkpoint(tmp_path / "ck", 512)
    assert main(["score", str(ckpt), "--tokenizer", str(d / "nospace.model"), "--val", str(shard),
                 "--seq-len", "128"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nospace.model" in err[0] and "standalone" in err[0]


def test_score_bytes_with_trained_tokenizer(bug_setup, tmp_path, capsys):
    """The score path (shards -> distill score) on a tokenizer trained here, against decoded bytes."""
    d, docs, sp, _ = bug_setup
    stream = pack_docs(encode_docs(sp, docs))
    shard = tmp_path / "fineweb_val_000000.bin"
    write_shard(shard, stream)
    ckpt = make_checkpoint(tmp_path / "ck", 512, seed=1)
    L = 128
    ours = run_score(capsys, str(ckpt), "--tokenizer", str(d / "good.model"), "--val", str(shard),
                     "--seq-len", str(L), "--batch-size", "32")
    n = ((len(stream) - 1) // L) * L
    assert ours["tokens"] == n and ours["bytes"] == len(PieceDecoder(sp).decode(stream[: n + 1]))
    assert_same(ours, reference_score(load_ckpt_model(ckpt), stream, sp, L))


# ---------------------------------------------------------------------------- bad input


def _flip(src: Path, dst: Path, pos: int) -> Path:
    raw = bytearray(src.read_bytes())
    raw[pos] ^= 0x5A
    dst.write_bytes(bytes(raw))
    return dst


def test_bad_inputs_one_line(ckpt1024, sp1024_path, val_head_shard, tmp_path, capsys):
    from distill.pack import pack_checkpoint

    good = tmp_path / "fineweb_val_000000.bin"
    good.write_bytes(val_head_shard.read_bytes())
    trunc = tmp_path / "trunc_val.bin"
    trunc.write_bytes(val_head_shard.read_bytes()[:-3])
    magic = _flip(val_head_shard, tmp_path / "magic_val.bin", 0)
    big = tmp_path / "vocab_val.bin"
    write_shard(big, np.array([1, 5, 7, 1500, 9] * 300, dtype=np.uint16))
    art = tmp_path / "m.golf"
    pack_checkpoint(ckpt1024, art, bits=8, codec="zstd", progress=False)
    tampered = _flip(art, tmp_path / "tampered.golf", art.stat().st_size // 2)
    small = make_checkpoint(tmp_path / "ck512", 512)
    cases = {  # name -> (model, shard, text the one-line error must contain)
        "truncated": (ckpt1024, trunc, [str(trunc), "truncated"]),
        "magic": (ckpt1024, magic, [str(magic), "magic"]),
        "vocab": (ckpt1024, big, [str(big), "1500"]),
        "tampered": (tampered, good, [str(tampered), "checksum"]),
        "missing": (tmp_path / "nope.golf", good, [str(tmp_path / "nope.golf"), "not found"]),
        "model_vocab": (small, good, [str(small), "512", "1024"]),
    }
    for name, (model, shard, needles) in cases.items():
        rc = main(["score", str(model), "--tokenizer", str(sp1024_path), "--val", str(shard), "--seq-len", "64"])
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert rc == 2, name
        assert len(err) == 1 and err[0].startswith("distill: error: "), (name, captured.err)
        for s in needles:
            assert s in err[0], (name, err[0])
        assert "Traceback" not in captured.err and not captured.out.strip()
    # the same through a real process: exit code 2, one stderr line, no traceback
    r = subprocess.run([sys.executable, "-m", "distill.cli", "score", str(tampered), "--tokenizer",
                        str(sp1024_path), "--val", str(good), "--seq-len", "64", "--json"],
                       check=False, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and str(tampered) in r.stderr

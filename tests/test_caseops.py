"""CaseOps (distill/caseops.py): the transform against an independent, slow reference written here, exact
round trips of every FineWeb document we have and of hostile strings, the record's tokenizer, per-token
original bytes against an independent count, and `distill data tokenizer --caseops`.

Run: DISTILL_SHARED_DATA=/path/to/shared/data OMP_NUM_THREADS=1 python -m pytest -q tests/test_caseops.py
(~10 s; the FineWeb / tokenizer tests skip without ../shared/data)
"""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest

from distill import caseops
from distill.caseops import ALLCAPS, CAPNEXT, ESC, OPERATORS, TITLE, CaseOpsError
from distill.cli import main
from distill.errors import DistillError
from distill.tokenizer import load_tokenizer

RECORD_TOKENIZER = "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"


# ---------------------------------------------------------------------------- independent reference


def ref_encode(text: str) -> str:
    """The rules as the module docstring states them, one group of characters at a time."""
    out = []
    for is_letter, group in itertools.groupby(text, key=lambda c: c.isascii() and c.isalpha()):
        g = "".join(group)
        if not is_letter:
            out.append("".join(ESC + c if c in OPERATORS else c for c in g))
            continue
        uppers = [c.isupper() for c in g]
        if not any(uppers):
            out.append(g)
        elif all(uppers) and len(g) > 1:
            out.append(ALLCAPS + g.lower())
        elif uppers[0] and not any(uppers[1:]):
            out.append(TITLE + g.lower())
        else:
            out.append((TITLE if uppers[0] else "") + g[0].lower()
                       + "".join((CAPNEXT if u else "") + c.lower() for c, u in zip(g[1:], uppers[1:])))
    return "".join(out)


def surface_original_bytes(surface: str) -> int:
    """A token's original bytes in a text without literal operators: every character keeps its UTF-8 length
    (lower-casing ASCII does not change it) except the operators, which stand for nothing."""
    return len(surface.encode("utf-8")) - sum(len(c.encode("utf-8")) for c in surface if c in OPERATORS)


HOSTILE = [
    "", "A", "a", "I", "ß", "SS", "ẞ", "Straße STRASSE", "İstanbul ıi İİ", "ǅemal ǈ ǋ Ǳ ǲ",
    "McDonald iPhone eBay ABCd aBC HTTPServer", "x\u0301Y", "ÀB Ωmega ΣΑΣ", "ﬁ ﬀ Ⅻ ①",
    TITLE, ALLCAPS + CAPNEXT + ESC, "A" + ESC + "B", ESC + ESC, "\ue000\ue005", "ABC123DEF 4G", "a\nB\tC\r\nD",
    "  leading and trailing  ", "\U0001F600 Emoji", "\x00NUL", "é" * 3 + "E" * 3,
]


def random_strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = "aAbBzZ 1.-\n" + "".join(OPERATORS) + "ßİǅé\u0301"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 16))) for _ in range(n)]


# ---------------------------------------------------------------------------------------- transform


def test_known_encodings():
    assert caseops.encode("The NASA launch") == f"{TITLE}the {ALLCAPS}nasa launch"
    assert caseops.encode("McDonald") == f"{TITLE}mc{CAPNEXT}donald"
    assert caseops.encode("iPhone A") == f"i{CAPNEXT}phone {TITLE}a"
    assert caseops.encode("É ß") == "É ß"  # non-ASCII letters are left as they are
    assert caseops.encode(f"x{TITLE}") == f"x{ESC}{TITLE}"


def test_matches_reference_and_round_trips():
    for text in HOSTILE + random_strings(3000):
        enc = caseops.encode(text)
        assert enc == ref_encode(text), text
        assert caseops.decode(enc) == text, text
        assert not any("A" <= c <= "Z" for c in enc)  # no ASCII capital survives


def test_round_trip_every_fineweb_document(shared_data):
    n = 0
    for name in ("fineweb_docs_sample200.jsonl", "fineweb_val_head_docs.jsonl"):
        path = shared_data / "fineweb" / name
        if not path.exists():
            pytest.skip(f"{path} not available")
        for line in path.read_text(encoding="utf-8").splitlines():
            doc = json.loads(line)["text"]
            enc = caseops.encode(doc)
            assert enc == ref_encode(doc)
            assert caseops.decode(enc) == doc
            n += 1
    assert n == 309


@pytest.mark.parametrize("bad", [ESC, TITLE, f"a{CAPNEXT}", f"{TITLE}1", f"{ALLCAPS} x", f"{ESC}a",
                                 f"{TITLE}{ALLCAPS}a", f"a{TITLE}b", f"{CAPNEXT}{CAPNEXT}a"])
def test_decode_refuses_malformed(bad):
    with pytest.raises(CaseOpsError):
        caseops.decode(bad)
    assert issubclass(CaseOpsError, DistillError)  # one line at the CLI


# ------------------------------------------------------------------ the record's tokenizer and bytes


@pytest.fixture(scope="module")
def record_sp(shared_data):
    path = shared_data / "tokenizers" / RECORD_TOKENIZER
    if not path.exists():
        pytest.skip(f"{path} not available")
    return load_tokenizer(path)


def test_record_tokenizer_has_our_operators(record_sp, sp1024_path):
    assert [record_sp.piece_to_id(op) for op in OPERATORS] == [4, 5, 6, 7]
    caseops.check_tokenizer(record_sp, RECORD_TOKENIZER)
    with pytest.raises(DistillError, match="fineweb_1024_bpe.model: tokenizer has no piece for the CaseOps"):
        caseops.check_tokenizer(load_tokenizer(sp1024_path), str(sp1024_path))


def test_spans_and_original_bytes_on_fineweb(record_sp, shared_data):
    path = shared_data / "fineweb" / "fineweb_docs_sample200.jsonl"
    docs = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()][:30]
    docs += [json.loads(line)["text"] for line in
             (shared_data / "fineweb" / "fineweb_val_head_docs.jsonl").read_text(encoding="utf-8").splitlines()]
    transformed = [caseops.encode(d) for d in docs]
    n_tok = n_ops = 0
    spans = caseops.encode_with_spans(record_sp, transformed)
    for k, (doc, t, (ids, begin, end)) in enumerate(zip(docs, transformed, spans)):
        assert ids.tolist() == record_sp.encode(t)  # the proto walk reads the same pieces
        assert (begin[1:] == end[:-1]).all()  # surfaces tile the text (here: no edge whitespace)
        counts = caseops.token_original_bytes(t, begin, end)
        if k % 4 == 0:  # token by token on a quarter of the documents (slow python)
            raw = t.encode("utf-8")
            ref = [surface_original_bytes(raw[b:e].decode("utf-8")) for b, e in zip(begin, end)]
            assert counts.tolist() == ref
        assert int(counts.sum()) == len(doc.encode("utf-8"))  # the independent count: the document's bytes
        n_tok += len(ids)
        n_ops += int(np.isin(ids, [4, 5, 6, 7]).sum())
    assert n_tok > 100_000 and n_ops > 3_000  # the operators are real tokens, used often


def test_original_bytes_of_hostile_text(record_sp):
    for text in HOSTILE + random_strings(300, seed=1):
        t = caseops.encode(text)
        ((_ids, begin, end),) = caseops.encode_with_spans(record_sp, [t])
        counts = caseops.token_original_bytes(t, begin, end)
        # the tokenizer's normaliser drops whitespace at the ends; nothing else goes uncounted
        if text.strip() == text:
            assert int(counts.sum()) == len(text.encode("utf-8")), text
        else:
            assert int(counts.sum()) <= len(text.encode("utf-8"))
    t = caseops.encode("  Hi  ")
    ((_, begin, end),) = caseops.encode_with_spans(record_sp, [t])
    assert int(caseops.token_original_bytes(t, begin, end).sum()) == 2  # "Hi": the edge spaces are dropped


def test_escaped_literal_operator_counts_its_bytes(record_sp):
    text = f"A{TITLE}b"
    t = caseops.encode(text)  # TITLE a ESC TITLE b
    per_char = caseops.char_original_bytes(t).tolist()
    assert per_char == [0, 1, 0, 3, 1]
    ((_, begin, end),) = caseops.encode_with_spans(record_sp, [t])
    assert int(caseops.token_original_bytes(t, begin, end).sum()) == len(text.encode("utf-8")) == 5


def test_tokenizer_cli_caseops(tmp_path, sample200_path, capsys):
    out = tmp_path / "tok" / "caseops_512.model"
    assert main(["data", "tokenizer", "--caseops", "--docs", str(sample200_path), "--vocab-size", "512",
                 "--max-docs", "20", "--threads", "1", "--out", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["text_transform"] == "lossless_caps_caseops_v1" and res["vocab_size"] == 512
    sp = load_tokenizer(out)
    assert [sp.piece_to_id(op) for op in OPERATORS] == [4, 5, 6, 7]  # the record's layout
    caseops.check_tokenizer(sp, str(out))
    # trained on transformed text: no upper-case ASCII piece was learned
    assert not any(any("A" <= c <= "Z" for c in sp.id_to_piece(i)) for i in range(8, 512)
                   if not sp.is_byte(i))

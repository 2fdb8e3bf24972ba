"""Cross-tokenizer top-k projection (teachers/projection.py) with the real sp1024 student tokenizer.

The teacher side here is a hand-written token table + distributions (data, not a model), so the
expected student targets can be computed by hand.
Run: python -m pytest -q tests/test_projection.py      (~3 s)
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from teachers.precompute import windows
from teachers.projection import DocTeacher, StudentVocab, project_document


@pytest.fixture(scope="module")
def sv(sp1024_path):
    from distill.tokenizer import load_tokenizer

    return StudentVocab(load_tokenizer(sp1024_path))


def _pid(sv, piece: str) -> int:
    i = sv.sp.piece_to_id(piece)
    assert sv.sp.id_to_piece(i) == piece
    return i


def test_leading_space_guard(sv):
    # plain encode(" world") silently drops the space (remove_extra_whitespaces); the guard keeps it
    assert sv.sp.encode(" world", out_type=str)[0] == "w"
    assert sv.first_piece(b" world") == _pid(sv, "\u2581wor")
    assert sv.first_piece(b" ") == _pid(sv, "\u2581")  # a lone (trailing) space survives too
    assert sv.first_piece(b"standing") == _pid(sv, "st")
    assert sv.first_piece("é".encode()[1:]) == sv.byte_ids["é".encode()[1]]  # mid-character byte
    assert sv.piece_bytes[_pid(sv, "\u2581the")] == b" the"


def _doc(tokens, rows):
    """rows: list of {teacher id: prob} for rows 0..n-2 (row j predicts token j+1)."""
    k = max(len(r) for r in rows)
    ids = np.zeros((len(rows), k), np.int32)
    lp = np.full((len(rows), k), -30.0, np.float32)
    act = np.zeros(len(rows), np.float32)
    for j, r in enumerate(rows):
        items = sorted(r.items(), key=lambda kv: -kv[1])
        for c, (t, p) in enumerate(items):
            ids[j, c], lp[j, c] = t, math.log(p)
        act[j] = math.log(r[tokens[j + 1]])
    return DocTeacher(np.array(tokens), ids, lp, act)


def test_chaining_across_teacher_boundary(sv):
    # teacher: " the" | "re"; student: "▁there" (one piece running past the teacher boundary)
    tb = [b"", b" the", b"re", b" a", b" cat"]
    doc = _doc([0, 1, 2], [{1: 0.6, 3: 0.3}, {2: 0.5, 4: 0.4}])
    there, the, a = _pid(sv, "\u2581there"), _pid(sv, "\u2581the"), _pid(sv, "\u2581a")
    sids = np.array([1, there])
    ids, probs, flags = project_document(sids, doc, tb, sv, range(1), 4)
    got = {int(i): float(p) for i, p in zip(ids[0], probs[0]) if p > 0}
    # chained: 0.6*0.5 to "▁there"; 0.6*(0.4 + untracked 0.1) stays "▁the"; " a" in isolation
    assert got == pytest.approx({there: 0.30, the: 0.30, a: 0.30}, abs=1e-6)
    assert flags[0] == 1 and len(set(ids[0].tolist())) == 4  # aligned; padding ids are distinct
    assert 1.0 - probs[0].sum() == pytest.approx(0.10, abs=1e-6)  # the teacher's own untracked tail


def test_inside_teacher_token_conditions_on_prefix(sv):
    # teacher: one token " understanding"; student: "▁under" "st" "and" "ing"
    tb = [b"", b" understanding", b" under", b" understand", b" the"]
    doc = _doc([0, 1], [{1: 0.5, 2: 0.2, 3: 0.1, 4: 0.2}])
    sids = np.array([1] + [_pid(sv, p) for p in ("\u2581under", "st", "and", "ing")])
    ids, probs, flags = project_document(sids, doc, tb, sv, range(4), 4)
    st = _pid(sv, "st")
    row1 = {int(i): float(p) for i, p in zip(ids[1], probs[1]) if p > 0}
    # u = " under": " the" is inconsistent; " under" (== u, continuation unknown) is left out of the
    # normaliser (it is assumed to continue like the longer candidates): 0.6 / 0.6
    assert row1 == pytest.approx({st: 1.0}, abs=1e-6)
    assert list(flags) == [1, 2, 2, 2]
    row3 = {int(i): float(p) for i, p in zip(ids[3], probs[3]) if p > 0}
    # u = " understand": only " understanding" is consistent and longer than u
    assert row3 == pytest.approx({_pid(sv, "ing"): 1.0}, abs=1e-6)
    # with the candidate equal to u sent to the residual instead (kd-method's plain rule)
    import teachers.projection as proj

    proj.RENORM_EQUAL = False
    try:
        ids, probs, _ = project_document(sids, doc, tb, sv, range(1, 2), 4)
    finally:
        proj.RENORM_EQUAL = True
    assert probs[0].max() == pytest.approx(0.6 / 0.8, abs=1e-6) and ids[0][probs[0].argmax()] == st


def test_windows_cover_every_row_once_with_context():
    for n, L in ((5, 8), (8, 8), (9, 8), (100, 8), (100, 3), (1000, 64), (257, 128)):
        seen = np.zeros(n - 1, int)
        for s, e, lo, hi in windows(n, L):
            assert e - s <= L and s <= lo <= hi <= e - 1
            seen[lo:hi] += 1
            if s > 0:
                assert lo - s >= L // 2  # every row taken from a later window has >= L/2 tokens of context
        assert np.all(seen == 1)

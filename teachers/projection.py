"""Teacher top-k distributions -> student-vocabulary targets (kd-method.md "top-k projection").

Same tokenizer: the identity (ids map 1:1). Foreign tokenizer, per document:
  1. The student ids are decoded to bytes B; the teacher tokenises the same text, and every teacher token
     gets its exact byte span on B.
  2. The student row predicting the token that starts at byte b reads the teacher distribution of the
     teacher token spanning b; u = that token's bytes before b. Candidates (top-k + the actual token)
     whose bytes start with u keep their mass, renormalised by the consistent mass when u is non-empty.
     A candidate equal to u (the teacher would end its token at b; what follows is unknown) is left out
     of that normaliser, i.e. assumed to continue like the longer consistent candidates: on SmolLM2-135M
     over the val head this took the projected/teacher bpb ratio from 1.051 to 1.043 (RENORM_EQUAL).
     At aligned rows (u empty) the teacher's untracked tail stays in the residual (no renormalisation:
     a renormalised top-k is a biased target; it would give a ratio of 0.997, below the teacher's own).
  3. A candidate's remainder r maps to the student piece the student tokenizer produces first for r
     (encoded as "0" + r + "0": the challenge's SentencePiece drops a leading space otherwise, and a
     trailing one; digits never merge).
  4. Chaining (step 5): when the remainder of the ACTUAL teacher token is one whole student piece, the
     student's piece may run past the teacher boundary ("st" | "anding" -> "standing"). Along the actual
     text we hold the next teacher distribution, so that mass is split over the next candidates c' and
     mapped to the first piece of r + bytes(c') (recursively, up to MAX_CHAIN teacher tokens). The next
     distribution's untracked tail keeps the isolated mapping of r (sending it to the residual instead
     gave a ratio of 1.107). Without chaining the ratio is 1.056; with it 1.043.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from distill.tokenizer import SPACE

PROJECTION_VERSION = 2
RENORM_EQUAL = True  # see step 2 above
CHAIN_TAIL_ISOLATED = True  # see step 4 above
MAX_CHAIN = 3  # teacher tokens a student piece may span beyond the first (pieces are short; 3 is ample)


class StudentVocab:
    """Student piece bytes and a memoised 'first student piece of these bytes' (step 3)."""

    def __init__(self, sp):
        self.sp = sp
        self.vocab_size = int(sp.vocab_size())
        self.piece_bytes: list[bytes] = []
        self.byte_ids = [0] * 256
        for i in range(self.vocab_size):
            piece = sp.id_to_piece(i)
            if sp.is_byte(i):
                b = int(piece[3:5], 16)
                self.byte_ids[b] = i
                self.piece_bytes.append(bytes([b]))
            elif sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                self.piece_bytes.append(b"")
            else:
                self.piece_bytes.append(piece.replace(SPACE, " ").encode("utf-8"))
        self.piece_len = np.array([len(b) for b in self.piece_bytes], dtype=np.int64)
        self.zero_id = sp.piece_to_id("0")
        self._memo: dict[bytes, int] = {}

    def first_piece(self, s: bytes) -> int:
        """The student piece the student tokenizer produces first for the text `s` (non-empty bytes)."""
        hit = self._memo.get(s)
        if hit is not None:
            return hit
        try:
            text = s.decode("utf-8")
        except UnicodeDecodeError as e:
            text = s[: e.start].decode("utf-8") if e.start > 0 else ""
        pid = self.byte_ids[s[0]]  # fallback: mid-character bytes are byte pieces for the student too
        if text:
            ids = self.sp.encode("0" + text + "0", out_type=int)
            if len(ids) >= 3 and ids[0] == self.zero_id:
                pid = ids[1]
        self._memo[s] = pid
        return pid


@dataclass
class DocTeacher:
    """One document on the teacher side: token ids (teacher BOS first) and, for row j (predicting token
    j+1), top-k ids/logprobs and the actual token's logprob. Rows not scored hold NaN logprobs."""

    tokens: np.ndarray  # int64 [n]
    topk_ids: np.ndarray  # int32 [n-1, k]
    topk_lp: np.ndarray  # float32 [n-1, k]
    actual_lp: np.ndarray  # float32 [n-1]


def _candidates(doc: DocTeacher, j: int) -> tuple[list[int], list[float]]:
    """Top-k + the actual token of teacher position j (the distribution predicting token j)."""
    ids = doc.topk_ids[j - 1].tolist()
    ps = np.exp(doc.topk_lp[j - 1].astype(np.float64)).tolist()
    act = int(doc.tokens[j])
    if act not in ids:
        ids.append(act)
        ps.append(math.exp(float(doc.actual_lp[j - 1])))
    return ids, ps


def project_document(student_ids: np.ndarray, doc: DocTeacher, teacher_bytes: list[bytes], sv: StudentVocab,
                     rows: range, k_s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Targets for student rows `rows` of one document.

    student_ids: the document's student tokens (BOS first); row i predicts student_ids[i+1]. The teacher
    tokens after doc.tokens[0] must spell exactly the bytes of student_ids[1:].
    Returns ids int64 [len(rows), k_s], probs float64 [len(rows), k_s], flags uint8 [len(rows)]
    (1 aligned, 2 inside a teacher token).
    """
    pieces = [sv.piece_bytes[int(t)] for t in student_ids[1:]]
    starts_s = np.concatenate([[0], np.cumsum([len(p) for p in pieces])]).astype(np.int64)
    tlens = [len(teacher_bytes[int(t)]) for t in doc.tokens[1:]]
    starts_t = np.concatenate([[0], np.cumsum(tlens)]).astype(np.int64)  # token j starts at starts_t[j-1]
    n_t = len(doc.tokens)
    text = b"".join(pieces)
    out_ids = np.zeros((len(rows), k_s), dtype=np.int64)
    out_p = np.zeros((len(rows), k_s), dtype=np.float64)
    flags = np.zeros(len(rows), dtype=np.uint8)
    for oi, i in enumerate(rows):
        b = int(starts_s[i])  # the target token student_ids[i+1] starts at byte b
        j = int(np.searchsorted(starts_t, b, side="right"))  # teacher token j spans b
        if j >= n_t:
            continue
        u = text[starts_t[j - 1]:b]
        mass: dict[int, float] = {}
        ids, ps = _candidates(doc, j)
        actual = int(doc.tokens[j])
        z = 0.0
        for c, p in zip(ids, ps):
            cb = teacher_bytes[c]
            if not cb.startswith(u):
                continue
            if len(cb) == len(u):
                if not RENORM_EQUAL:
                    z += p
                continue  # the continuation after u is unknown: residual
            z += p
            r = cb[len(u):]
            if c == actual:
                _chain(r, j + 1, p, doc, teacher_bytes, sv, mass, n_t, 1)
            else:
                pid = sv.first_piece(r)
                mass[pid] = mass.get(pid, 0.0) + p
        if not mass or z <= 0:
            continue
        scale = 1.0 / z if u else 1.0  # aligned rows keep the teacher's own tail as residual
        top = sorted(mass.items(), key=lambda kv: (-kv[1], kv[0]))[:k_s]
        for col, (pid, p) in enumerate(top):
            out_ids[oi, col] = pid
            out_p[oi, col] = min(p * scale, 1.0)
        used = {pid for pid, _ in top}
        pad = (x for x in range(sv.vocab_size) if x not in used)  # distinct ids with probability 0
        for col in range(len(top), k_s):
            out_ids[oi, col] = next(pad)
        flags[oi] = 2 if u else 1
    return out_ids, out_p, flags


def _chain(r: bytes, jn: int, m: float, doc: DocTeacher, teacher_bytes: list[bytes], sv: StudentVocab,
           mass: dict[int, float], n_t: int, depth: int) -> None:
    """Put mass m of remainder r (the rest of the actual teacher token) on student pieces, chaining over
    the next teacher distribution while the student's piece could run past the teacher boundary."""
    pid = sv.first_piece(r)
    if sv.piece_len[pid] < len(r) or jn >= n_t or depth > MAX_CHAIN or math.isnan(doc.actual_lp[jn - 1]):
        mass[pid] = mass.get(pid, 0.0) + m
        return
    ids, ps = _candidates(doc, jn)
    actual = int(doc.tokens[jn])
    tracked = 0.0
    for c, p in zip(ids, ps):
        tracked += p
        s = r + teacher_bytes[c]
        if c == actual:
            _chain(s, jn + 1, m * p, doc, teacher_bytes, sv, mass, n_t, depth + 1)
        else:
            q = sv.first_piece(s) if len(s) > len(r) else pid
            mass[q] = mass.get(q, 0.0) + m * p
    if CHAIN_TAIL_ISOLATED:
        mass[pid] = mass.get(pid, 0.0) + m * max(0.0, 1.0 - tracked)


def identity_rows(topk_ids: np.ndarray, topk_lp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Same tokenizer: teacher top-k is the student top-k."""
    return topk_ids.astype(np.int64), np.exp(topk_lp.astype(np.float64))

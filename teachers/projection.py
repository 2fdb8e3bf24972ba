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
     Consistent also means: segmented like the text (SEGMENT_CONSISTENT). The student row reads u as the
     pieces it already emitted inside this teacher token (e.g. "▁st"); a candidate whose own first student
     piece at one of those piece starts differs (" start" -> "▁start", not "▁st" "art") cannot be the
     continuation the student is in, so it is left out; the actual token always stays. Bytes alone kept
     such candidates: with a deeper teacher top-k they flattened these rows with continuations the student
     can no longer produce (k=128: projected bpb 1.168 -> 1.282 on the val head, KD gain at 2 passes
     -0.020 -> -0.016).
  3. A candidate's remainder r maps to the student piece the student tokenizer produces first for r
     (encoded as "0" + r + "0": the challenge's SentencePiece drops a leading space otherwise, and a
     trailing one; digits never merge).
  4. Chaining (step 5): when the remainder of the ACTUAL teacher token is one whole student piece, the
     student's piece may run past the teacher boundary ("st" | "anding" -> "standing"). Along the actual
     text we hold the next teacher distribution, so that mass is split over the next candidates c' and
     mapped to the first piece of r + bytes(c') (recursively, up to MAX_CHAIN teacher tokens). The next
     distribution's untracked tail keeps the isolated mapping of r (sending it to the residual instead
     gave a ratio of 1.107). Without chaining the ratio is 1.056; with it 1.043.

Implementation (kd-method step 2's table F): a `Projector`, built once per (teacher tokenizer, student
tokenizer) pair, holds for every teacher token t and byte offset o the id of the prefix t[:o] (a trie node,
so "starts with u" is an integer compare) and, filled on first use, the student piece the student tokenizer
produces first for t[o:]. Chain steps look up (student piece, next teacher token) in a fixed-size,
direct-mapped cache (CHAIN_CACHE_SLOTS entries; a collision overwrites). All rows of a document are then
projected with numpy; the masses are summed per (row, student id) in the same order as the row-by-row
definition (`project_rows_python`, kept as the reference and for the rare rows the tables cannot serve), so
the targets are bit-identical to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from distill.tokenizer import SPACE

PROJECTION_VERSION = 3  # 3: SEGMENT_CONSISTENT
RENORM_EQUAL = True  # see step 2 above
SEGMENT_CONSISTENT = True  # see step 2 above
CHAIN_TAIL_ISOLATED = True  # see step 4 above
MAX_CHAIN = 3  # teacher tokens a student piece may span beyond the first (pieces are short; 3 is ample)
MEMO_MAX = 1 << 18  # StudentVocab.first_piece memo: cleared when it reaches this many entries
CHAIN_CACHE_BITS = 20  # Projector chain cache: 2**20 slots (12 MiB: int64 key + int32 code per slot)
# a piece code packs (student id << 2) | status, status describing the text s the piece was looked up for
PART, WHOLE, ODD = 0, 1, 2  # piece shorter than s | piece bytes == s | as long as s but other bytes (NFKC)


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
        self._memo: dict[bytes, int] = {}  # bounded: cleared at MEMO_MAX entries
        self._projector: Projector | None = None

    def first_piece(self, s: bytes) -> int:
        """The student piece the student tokenizer produces first for the text `s` (non-empty bytes)."""
        hit = self._memo.get(s)
        if hit is not None:
            return hit
        pid = self.first_pieces([s])[0]
        if len(self._memo) >= MEMO_MAX:
            self._memo.clear()
        self._memo[s] = pid
        return pid

    def first_pieces(self, strs: list[bytes]) -> list[int]:
        """first_piece of each of `strs`, uncached, one batched encode call."""
        texts, pids = [], []
        for s in strs:
            try:
                text = s.decode("utf-8")
            except UnicodeDecodeError as e:
                text = s[: e.start].decode("utf-8") if e.start > 0 else ""
            texts.append(text)
            pids.append(self.byte_ids[s[0]])  # fallback: mid-character bytes are byte pieces for the student too
        # encoded as "0" + text + "0": SentencePiece drops a leading space otherwise (and a trailing one)
        todo = [i for i, t in enumerate(texts) if t]
        encoded = self.sp.encode(["0" + texts[i] + "0" for i in todo], out_type=int) if todo else []
        for i, ids in zip(todo, encoded):
            if len(ids) >= 3 and ids[0] == self.zero_id:
                pids[i] = ids[1]
        return pids

    def piece_codes(self, strs: list[bytes]) -> np.ndarray:
        """(first_piece(s) << 2) | status for each s (status: PART / WHOLE / ODD, see above)."""
        pids = self.first_pieces(strs)
        codes = np.empty(len(strs), dtype=np.int64)
        for i, (s, pid) in enumerate(zip(strs, pids)):
            pb = self.piece_bytes[pid]
            status = WHOLE if pb == s else (PART if len(pb) < len(s) else ODD)
            codes[i] = (pid << 2) | status
        return codes

    def projector(self, teacher_bytes: list[bytes]) -> Projector:
        """The lookup tables for this teacher byte table (built on first use, kept for the last table)."""
        if self._projector is None or self._projector.teacher_bytes is not teacher_bytes:
            self._projector = Projector(teacher_bytes, self)
        return self._projector


class Projector:
    """Tables for one (teacher tokenizer, student tokenizer) pair; see the module docstring.

    Flat index base[t] + o (0 <= o <= len(t)) addresses teacher token t at byte offset o:
      prefix_id[.]    int32  id of the bytes t[:o] (equal ids <=> equal prefixes)
      suffix_code[.]  int64  piece code of t[o:] (o < len(t)), -1 until first used
    """

    def __init__(self, teacher_bytes: list[bytes], sv: StudentVocab):
        self.teacher_bytes, self.sv = teacher_bytes, sv
        self.vocab_size = len(teacher_bytes)
        self.tlen = np.array([len(b) for b in teacher_bytes], dtype=np.int64)
        self.base = np.concatenate([[0], np.cumsum(self.tlen + 1)]).astype(np.int64)
        self.prefix_id = np.empty(int(self.base[-1]), dtype=np.int32)
        ids: dict[bytes, int] = {}
        pos = 0
        for b in teacher_bytes:
            for o in range(len(b) + 1):
                self.prefix_id[pos] = ids.setdefault(b[:o], len(ids))
                pos += 1
        self.suffix_code = np.full(int(self.base[-1]), -1, dtype=np.int64)
        self.chain_keys = np.full(1 << CHAIN_CACHE_BITS, -1, dtype=np.int64)
        self.chain_codes = np.zeros(1 << CHAIN_CACHE_BITS, dtype=np.int32)
        self.misses = 0  # piece lookups that ran the student tokenizer (for benchmarks)

    def suffix_codes(self, flat: np.ndarray) -> np.ndarray:
        """Piece codes of the teacher-token suffixes at flat indices `flat` (each with o < len(t))."""
        codes = self.suffix_code[flat]
        miss = codes < 0
        if miss.any():
            need = np.unique(flat[miss])
            tok = np.searchsorted(self.base, need, side="right") - 1
            strs = [self.teacher_bytes[t][o:] for t, o in zip(tok.tolist(), (need - self.base[tok]).tolist())]
            self.suffix_code[need] = self.sv.piece_codes(strs)
            self.misses += len(need)
            codes = self.suffix_code[flat]
        return codes

    def chain_lookup(self, pids: np.ndarray, toks: np.ndarray) -> np.ndarray:
        """Piece codes of piece_bytes[pid] + teacher_bytes[tok] (tokens with non-empty bytes)."""
        keys = pids.astype(np.int64) * self.vocab_size + toks
        slots = ((keys.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(64 - CHAIN_CACHE_BITS)).astype(np.int64)
        hit = self.chain_keys[slots] == keys
        out = np.where(hit, self.chain_codes[slots], 0).astype(np.int64)
        if not hit.all():
            need, inv = np.unique(keys[~hit], return_inverse=True)
            pb, tb = self.sv.piece_bytes, self.teacher_bytes
            vals = self.sv.piece_codes([pb[k // self.vocab_size] + tb[k % self.vocab_size] for k in need.tolist()])
            out[~hit] = vals[inv]
            s = ((need.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(64 - CHAIN_CACHE_BITS)).astype(np.int64)
            self.chain_keys[s], self.chain_codes[s] = need, vals
            self.misses += len(need)
        return out


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


def _candidate_matrix(doc: DocTeacher, j: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """_candidates for many positions: ids int64 [n, k+1] (-1 = no candidate), probs float64 [n, k+1]
    (0 where none), actual ids [n]. Same numbers as _candidates (the extra actual through math.exp)."""
    act = doc.tokens[j].astype(np.int64)
    top = doc.topk_ids[j - 1].astype(np.int64)
    p = np.exp(doc.topk_lp[j - 1].astype(np.float64))
    outside = ~(top == act[:, None]).any(axis=1)
    extra_p = np.zeros(len(j), dtype=np.float64)
    extra_p[outside] = [math.exp(x) for x in doc.actual_lp[j[outside] - 1].astype(np.float64).tolist()]
    ids = np.concatenate([top, np.where(outside, act, -1)[:, None]], axis=1)
    return ids, np.concatenate([p, extra_p[:, None]], axis=1), act


def _segmented_like_text(pj: Projector, student_ids: np.ndarray, starts_s: np.ndarray, rows: np.ndarray,
                         t0: np.ndarray, ids: np.ndarray, act: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[n, kc] bool: False where candidate ids[r, c] (under `mask`, not the actual token) has, at the start o of a
    student piece already emitted inside the teacher token (starts_s[m] >= t0[r] for m < rows[r]), a first
    student piece other than that piece. One pass per piece back; aligned rows have none."""
    ok = np.ones(mask.shape, dtype=bool)
    check = mask & (ids != act[:, None])
    live = np.arange(len(rows))
    m = rows.copy()
    while len(live):
        m = m - 1
        keep = m >= 0
        keep[keep] = starts_s[m[keep]] >= t0[live[keep]]
        live, m = live[keep], m[keep]
        rr, cc = np.nonzero(check[live])
        if len(rr):
            o = starts_s[m[rr]] - t0[live[rr]]
            codes = pj.suffix_codes(pj.base[ids[live[rr], cc]] + o) >> 2
            bad = codes != student_ids[m[rr] + 1]
            ok[live[rr[bad]], cc[bad]] = False
    return ok


def project_document(student_ids: np.ndarray, doc: DocTeacher, teacher_bytes: list[bytes], sv: StudentVocab,
                     rows: range, k_s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Targets for student rows `rows` of one document.

    student_ids: the document's student tokens (BOS first); row i predicts student_ids[i+1]. The teacher
    tokens after doc.tokens[0] must spell exactly the bytes of student_ids[1:].
    Returns ids int64 [len(rows), k_s], probs float64 [len(rows), k_s], flags uint8 [len(rows)]
    (1 aligned, 2 inside a teacher token). Bit-identical to project_rows_python (vectorised over rows).
    """
    pj = sv.projector(teacher_bytes)
    rows = np.asarray(rows, dtype=np.int64)
    out_ids = np.zeros((len(rows), k_s), dtype=np.int64)
    out_p = np.zeros((len(rows), k_s), dtype=np.float64)
    flags = np.zeros(len(rows), dtype=np.uint8)
    starts_s = np.concatenate([[0], np.cumsum(sv.piece_len[np.asarray(student_ids[1:], dtype=np.int64)])])
    starts_t = np.concatenate([[0], np.cumsum(pj.tlen[np.asarray(doc.tokens[1:], dtype=np.int64)])])
    n_t = len(doc.tokens)
    b = starts_s[rows]  # the target token student_ids[i+1] starts at byte b
    j_all = np.searchsorted(starts_t, b, side="right")  # teacher token j spans b
    rv = np.flatnonzero(j_all < n_t)  # rows with a teacher token (positions into `rows`)
    if len(rv) == 0:
        return out_ids, out_p, flags
    j = j_all[rv]
    ulen = b[rv] - starts_t[j - 1]  # len(u): bytes of teacher token j before b
    ids, ps, act = _candidate_matrix(doc, j)
    kc = ids.shape[1]
    radix = kc + 1  # order digits: candidate columns 0..kc-1, kc = the chain's isolated tail
    weight = radix ** MAX_CHAIN  # the top-level column's digit
    # candidates consistent with u: t[:len(u)] == u, compared as prefix ids
    have = ids >= 0
    safe = np.where(have, ids, 0)
    clen = pj.tlen[safe]
    reach = have & (clen >= ulen[:, None])
    pre_c = pj.prefix_id[np.where(reach, pj.base[safe] + ulen[:, None], 0)]
    pre_u = pj.prefix_id[pj.base[act] + ulen]
    cons = reach & (pre_c == pre_u[:, None])
    longer = cons & (clen > ulen[:, None])
    if SEGMENT_CONSISTENT:
        seg_ok = _segmented_like_text(pj, student_ids, starts_s, rows[rv], starts_t[j - 1], ids, act, longer)
        longer &= seg_ok
        cons &= seg_ok
    zmask = longer if RENORM_EQUAL else cons
    z = np.cumsum(np.where(zmask, ps, 0.0), axis=1)[:, -1]  # left-to-right, as the definition adds
    is_act = longer & (ids == act[:, None])
    other = longer & ~is_act
    # contributions (row, student id, mass, order) ; order = digits (column at each chain level)
    r_o, c_o = np.nonzero(other)
    em_row = [r_o]
    em_pid = [pj.suffix_codes(pj.base[ids[r_o, c_o]] + ulen[r_o]) >> 2]
    em_val = [ps[r_o, c_o]]
    em_ord = [c_o.astype(np.int64) * weight]
    r_a, c_a = np.nonzero(is_act)
    st_row, st_code = r_a, pj.suffix_codes(pj.base[act[r_a]] + ulen[r_a])
    st_m, st_jn, st_ord = ps[r_a, c_a], j[r_a] + 1, c_a.astype(np.int64) * weight
    slow = []
    for depth in range(1, MAX_CHAIN + 2):
        if len(st_row) == 0:
            break
        weight //= radix
        pid, status = st_code >> 2, st_code & 3
        nan_next = np.isnan(doc.actual_lp[np.minimum(st_jn, n_t - 1) - 1])
        stop = (status == PART) | (st_jn >= n_t) | (depth > MAX_CHAIN) | nan_next
        slow.append(st_row[~stop & (status == ODD)])  # the piece is not the text: the tables cannot key it
        em_row.append(st_row[stop]), em_pid.append(pid[stop]), em_val.append(st_m[stop]), em_ord.append(st_ord[stop])
        go = np.flatnonzero(~stop & (status == WHOLE))
        if len(go) == 0:
            break
        row_g, pid_g, m_g, jn_g, ord_g = st_row[go], pid[go], st_m[go], st_jn[go], st_ord[go]
        nids, nps, nact = _candidate_matrix(doc, jn_g)
        nhave = nids >= 0
        nsafe = np.where(nhave, nids, 0)
        empty = pj.tlen[nsafe] == 0
        code = np.repeat(((pid_g << 2) | WHOLE)[:, None], kc, axis=1)  # empty bytes: s == r, the piece of r
        look = nhave & ~empty
        code[look] = pj.chain_lookup(np.broadcast_to(pid_g[:, None], nids.shape)[look], nids[look])
        val = m_g[:, None] * nps
        nis_act = nhave & (nids == nact[:, None])
        r_n, c_n = np.nonzero(nhave & ~nis_act)
        em_row.append(row_g[r_n]), em_pid.append(code[r_n, c_n] >> 2), em_val.append(val[r_n, c_n])
        em_ord.append(ord_g[r_n] + c_n * weight)
        if CHAIN_TAIL_ISOLATED:
            tracked = np.cumsum(nps, axis=1)[:, -1]
            em_row.append(row_g), em_pid.append(pid_g), em_val.append(m_g * np.maximum(0.0, 1.0 - tracked))
            em_ord.append(ord_g + kc * weight)
        r_a, c_a = np.nonzero(nis_act)
        st_row, st_code, st_m = row_g[r_a], code[r_a, c_a], val[r_a, c_a]
        st_jn, st_ord = jn_g[r_a] + 1, ord_g[r_a] + c_a * weight
    # sum the masses per (row, student id) in definition order, then rank by (-mass, id)
    e_row, e_pid = np.concatenate(em_row), np.concatenate(em_pid)
    e_val, e_ord = np.concatenate(em_val), np.concatenate(em_ord)
    srt = np.lexsort((e_ord, e_row))
    keys, inv = np.unique(e_row[srt] * sv.vocab_size + e_pid[srt], return_inverse=True)
    mass = np.bincount(inv.ravel(), weights=e_val[srt], minlength=len(keys))  # bincount adds in array order
    u_row, u_pid = keys // sv.vocab_size, keys % sv.vocab_size
    srt = np.lexsort((u_pid, -mass, u_row))
    u_row, u_pid, mass = u_row[srt], u_pid[srt], mass[srt]
    first = np.searchsorted(u_row, np.arange(len(rv)))
    rank = np.arange(len(u_row)) - first[u_row]
    keep = rank < k_s
    ok = ~(z <= 0)  # rows with a positive normaliser (every such row has a mass entry)
    scale = np.where(ulen > 0, 1.0 / np.where(ok, z, 1.0), 1.0)  # aligned rows keep the teacher's tail
    sel = keep & ok[u_row]
    out_ids[rv[u_row[sel]], rank[sel]] = u_pid[sel]
    out_p[rv[u_row[sel]], rank[sel]] = np.minimum(mass[sel] * scale[u_row[sel]], 1.0)
    # padding: the smallest ids not used, ascending (distinct ids with probability 0)
    cnt = np.minimum(np.bincount(u_row, minlength=len(rv)), k_s)
    width = min(sv.vocab_size, 2 * k_s)
    used = np.zeros((len(rv), width), dtype=bool)
    small = sel & (u_pid < width)
    used[u_row[small], u_pid[small]] = True
    free = np.argsort(used, axis=1, kind="stable")[:, :k_s]
    col = np.arange(k_s)[None, :]
    pad = ok[:, None] & (col >= cnt[:, None])
    src = np.where(pad, col - cnt[:, None], 0)
    rr, cc = np.nonzero(pad)
    out_ids[rv[rr], cc] = free[rr, src[rr, cc]]
    flags[rv[ok]] = np.where(ulen[ok] > 0, 2, 1)
    if slow:
        redo = np.unique(np.concatenate(slow))
        if len(redo):
            i_s, p_s, f_s = project_rows_python(student_ids, doc, teacher_bytes, sv, rows[rv[redo]].tolist(), k_s)
            out_ids[rv[redo]], out_p[rv[redo]], flags[rv[redo]] = i_s, p_s, f_s
    return out_ids, out_p, flags


def project_rows_python(student_ids: np.ndarray, doc: DocTeacher, teacher_bytes: list[bytes], sv: StudentVocab,
                        rows, k_s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Targets for student rows `rows` of one document.

    student_ids: the document's student tokens (BOS first); row i predicts student_ids[i+1]. The teacher
    tokens after doc.tokens[0] must spell exactly the bytes of student_ids[1:].
    Returns ids int64 [len(rows), k_s], probs float64 [len(rows), k_s], flags uint8 [len(rows)]
    (1 aligned, 2 inside a teacher token). The row-by-row definition: the reference that project_document
    reproduces, and its fallback for rows whose pieces are not their text (NFKC-normalised characters).
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
        t0 = int(starts_t[j - 1])
        u = text[t0:b]
        # the student pieces already emitted inside this teacher token: (offset in the token, piece id)
        seen, m = [], i - 1
        while SEGMENT_CONSISTENT and m >= 0 and starts_s[m] >= t0:
            seen.append((int(starts_s[m]) - t0, int(student_ids[m + 1])))
            m -= 1
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
            if c != actual and any(sv.first_piece(cb[o:]) != pid for o, pid in seen):
                continue  # segmented unlike the text: not a continuation the student can be in
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

"""CaseOps: the top records' lossless case transform, and the original-byte count of every token.

Why: a tokenizer spends much of its vocabulary on case variants ("The", "the", "THE"). CaseOps lowercases
ASCII letters and writes the case as private-use operator characters, so one lowercase subword serves all
variants; the transform is exactly invertible, so nothing is lost and bpb can still be counted on the
ORIGINAL text's bytes. This is our implementation of `lossless_caps_caseops_v1` (openai/parameter-golf,
records/.../lossless_caps.py, its "v2" rules), producing what the record's tokenizer
fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model was trained on (its ids 4..7 are the operators).

Rules, applied to maximal runs of ASCII letters [A-Za-z] ("words"); everything else (digits, punctuation,
non-ASCII letters such as 'É', 'ß', 'İ', 'ǅ') passes through unchanged:
  lowercase word            -> unchanged                       "the"   -> "the"
  two or more letters, all upper -> ALLCAPS + lowercase        "NASA"  -> ALLCAPS "nasa"
  upper first, rest lower (or a single upper letter) -> TITLE + lowercase   "The" -> TITLE "the"
  any other mix             -> TITLE if the first letter is upper, then each later upper letter is
                               preceded by CAPNEXT             "McDo"  -> TITLE "mc" CAPNEXT "do"
A literal operator character in the input is escaped as ESC + itself, so every input has one encoding
and decode(encode(t)) == t for every string t.

Original bytes (the per-token sidecar, see distill.shards): each character of the transformed text carries
the number of ORIGINAL UTF-8 bytes it stands for — 0 for an operator (and for ESC), 1 for an ASCII letter,
the character's own UTF-8 length otherwise (an escaped literal operator: 3). A token counts the characters
its surface covers (SentencePiece's begin/end span in the input). Byte-fallback pieces of one character
have empty surfaces except the last, which carries the whole character — as the record's exporter. Text the
tokenizer's normaliser drops (whitespace at a document's start and end) is covered by no token and
counted nowhere: no token predicts it, as in the challenge's own byte count.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from distill.errors import DistillError

TRANSFORM_NAME = "lossless_caps_caseops_v1"
TITLE = "\ue001"  # next word: first letter upper
ALLCAPS = "\ue002"  # next word: every letter upper
CAPNEXT = "\ue003"  # next letter upper (inside a mixed-case word)
ESC = "\ue004"  # next character is a literal operator character
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)
_OPS = frozenset(OPERATORS)


class CaseOpsError(DistillError):
    """Transformed text that no input encodes to (a dangling or misplaced operator)."""


def _ascii_letter(ch: str) -> bool:
    return ("a" <= ch <= "z") or ("A" <= ch <= "Z")


def _ascii_upper(ch: str) -> bool:
    return "A" <= ch <= "Z"


def _encode_word(word: str) -> str:
    """One maximal run of ASCII letters that holds an upper-case letter."""
    lower = word.lower()
    if len(word) >= 2 and word == word.upper():
        return ALLCAPS + lower
    if word[1:] == lower[1:]:  # only the first letter is upper (or a single upper letter)
        return TITLE + lower
    out = [TITLE] if _ascii_upper(word[0]) else []
    out.append(lower[0])
    for ch, lo in zip(word[1:], lower[1:]):
        if ch != lo:
            out.append(CAPNEXT)
        out.append(lo)
    return "".join(out)


# a maximal ASCII-letter run with at least one upper-case letter (lowercase runs stay as they are)
_CASED_WORD = re.compile(r"(?<![A-Za-z])[a-z]*[A-Z][A-Za-z]*")
_ESCAPE = str.maketrans({op: ESC + op for op in OPERATORS})


def encode(text: str) -> str:
    """Original text -> CaseOps text."""
    # operators are not letters, so escaping them first leaves every word run intact
    return _CASED_WORD.sub(lambda m: _encode_word(m.group()), text.translate(_ESCAPE))


def decode(text: str) -> str:
    """CaseOps text -> original text. Refuses (CaseOpsError) text that `encode` cannot produce the
    operators of: an operator not followed by a letter it can apply to, or a dangling ESC."""
    out: list[str] = []
    word_mode = ""  # "title" / "allcaps": armed by an operator before a word, applied at its first letter
    capnext = False
    in_word = False  # the previous output character was an ASCII letter
    allcaps_word = False  # inside a word opened by ALLCAPS
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        i += 1
        if ch == ESC:
            if i >= n:
                raise CaseOpsError("CaseOps text ends with a dangling ESC operator")
            if text[i] not in _OPS:
                raise CaseOpsError(f"ESC operator before a non-operator character at offset {i - 1}")
            if word_mode or capnext:
                raise CaseOpsError(f"case operator before an escaped character at offset {i - 1}")
            out.append(text[i])  # a literal operator: never a letter, so it ends any word
            i += 1
            in_word = allcaps_word = False
            continue
        if ch in (TITLE, ALLCAPS):
            if word_mode or capnext or in_word:
                raise CaseOpsError(f"misplaced word-case operator at offset {i - 1}")
            word_mode = "title" if ch == TITLE else "allcaps"
            continue
        if ch == CAPNEXT:
            if capnext:
                raise CaseOpsError(f"repeated CAPNEXT operator at offset {i - 1}")
            capnext = True
            continue
        if _ascii_letter(ch):
            if not in_word:  # first letter of a word
                allcaps_word = word_mode == "allcaps"
                upper = bool(word_mode) or capnext
                word_mode, in_word = "", True
            else:
                upper = allcaps_word or capnext
            capnext = False
            out.append(ch.upper() if upper else ch)
            continue
        if word_mode or capnext:
            raise CaseOpsError(f"case operator not followed by an ASCII letter at offset {i - 1}")
        out.append(ch)
        in_word = allcaps_word = False
    if word_mode or capnext:
        raise CaseOpsError("CaseOps text ends with a dangling case operator")
    return "".join(out)


def _utf8_lengths(text: str) -> np.ndarray:
    """UTF-8 length of every character (int64), vectorised over the code points."""
    cp = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    return 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)


def char_original_bytes(transformed: str) -> np.ndarray:
    """For each character of a CaseOps text, the original UTF-8 bytes it stands for (int64, one per char):
    0 for an operator, the character's UTF-8 length otherwise — including a literal operator after ESC."""
    w = _utf8_lengths(transformed)
    cp = np.frombuffer(transformed.encode("utf-32-le"), dtype="<u4")
    w[(cp >= ord(TITLE)) & (cp <= ord(ESC))] = 0
    skip = -1
    for k in np.flatnonzero(cp == ord(ESC)).tolist():  # ESC is rare: walk its occurrences only
        if k == skip:  # this ESC is itself the escaped literal
            continue
        if k + 1 < len(w):
            w[k + 1] = len(transformed[k + 1].encode("utf-8"))
            skip = k + 1
    return w


# ------------------------------------------------------------------------------ SentencePiece spans


def _parse_pieces(proto: bytes) -> tuple[list[int], list[int], list[int]]:
    """ids, begins, ends of a serialized SentencePieceText (pieces = field 2; in each: id = 2, begin = 4,
    end = 5; the strings piece = 1 and surface = 3 are skipped). A plain protobuf wire-format walk, so that
    `protobuf` is not a dependency; written flat because it runs once per token."""
    ids: list[int] = []
    begins: list[int] = []
    ends: list[int] = []
    i, n = 0, len(proto)

    def varint(i: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            b = proto[i]
            i += 1
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value, i
            shift += 7

    while i < n:
        key, i = varint(i)
        wire = key & 7
        if wire == 5:  # float (the score)
            i += 4
            continue
        if wire == 0:
            _, i = varint(i)
            continue
        if wire != 2:
            raise DistillError(f"SentencePiece returned an unreadable proto (wire type {wire})")
        size, i = varint(i)
        if key >> 3 != 2:  # the normalised text
            i += size
            continue
        stop = i + size
        pid = begin = end = 0
        while i < stop:
            tag = proto[i]
            i += 1
            if tag & 7 == 2:
                length, i = varint(i)
                i += length
                continue
            if tag & 7 != 0:
                raise DistillError(f"SentencePiece returned an unreadable proto (tag {tag})")
            value = proto[i]
            if value < 0x80:  # one-byte varint: the common case
                i += 1
            else:
                value, i = varint(i)
            if tag == 0x10:
                pid = value
            elif tag == 0x20:
                begin = value
            elif tag == 0x28:
                end = value
        ids.append(pid)
        begins.append(begin)
        ends.append(end)
    return ids, begins, ends


def encode_with_spans(sp, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """SentencePiece encode that also returns where each piece lies in the input:
    per text, (ids, begin, end) int64 arrays; begin/end are UTF-8 byte offsets into the text."""
    out = []
    for proto in sp.encode(list(texts), out_type="serialized_proto"):
        ids, begins, ends = _parse_pieces(proto)
        out.append((np.asarray(ids, dtype=np.int64), np.asarray(begins, dtype=np.int64),
                    np.asarray(ends, dtype=np.int64)))
    return out


def token_original_bytes(transformed: str, begin: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Original UTF-8 bytes of each token of `transformed` given its pieces' byte spans (uint16)."""
    per_char = char_original_bytes(transformed)
    lengths = _utf8_lengths(transformed)
    # weight of each character on its first UTF-8 byte, so a byte span sums the characters it covers
    starts = np.cumsum(lengths) - lengths
    per_byte = np.zeros(int(lengths.sum()) + 1, dtype=np.int64)
    per_byte[starts + 1] = per_char
    cum = np.cumsum(per_byte)
    counts = cum[end] - cum[begin]
    if counts.size and counts.max() > np.iinfo(np.uint16).max:
        raise DistillError(f"a token stands for {int(counts.max())} original bytes, more than a uint16 holds")
    return counts.astype(np.uint16)


def check_tokenizer(sp, path: str) -> None:
    """Refuse a tokenizer without the four operator pieces: CaseOps text would fall back to byte tokens."""
    for op in OPERATORS:
        i = int(sp.piece_to_id(op))
        if sp.id_to_piece(i) != op or sp.is_unknown(i) or sp.is_control(i):
            raise DistillError(f"{path}: tokenizer has no piece for the CaseOps operator U+{ord(op):04X}; "
                               "use one trained on CaseOps text (distill data tokenizer --caseops)")

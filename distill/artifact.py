"""One self-contained artifact file: the code that runs the model + its quantized weights.

Layout (all integers little-endian):

    header  magic b"DSTLGOLF" | u16 format version | u8 codec(code) | u8 codec(meta) | u8 codec(weights)
            | u8 layout | u32 code_len | u32 meta_len | u32 weights_len | 32-byte sha256
    body    code (compressed student/model.py source) | meta (compressed JSON: model config, per-tensor
            quant metadata, sha256 of the uncompressed code) | weights (compressed payload)

The sha256 covers the header fields before it and the whole body, so a flipped byte anywhere is refused.
It is an INTEGRITY check, not authenticity: anyone can write a file with a matching checksum, so a file
from elsewhere is as trustworthy as its source.
Weights payload: every tensor's int codes (laid out by `layout`, tensors grouped by bit width), then all
per-row fp16 scales, then all fp16 tensors — the fp16 parts byte-plane shuffled. Every section is
compressed with the smallest of zstd-22 / lzma / brotli (when importable), and the header records which.

Reading treats the file as hostile until proven otherwise, so that a malformed file costs at most about
its own size in memory and is refused with one line (DistillError) before anything big is allocated:
code and meta decompress under hard caps (MAX_CODE_BYTES, MAX_META_BYTES); the meta is validated (tensor
names, shapes, bit widths; parameters <= MAX_PARAMS_PER_BYTE x file size; model config types and
CONFIG_LIMITS); the model is built under an allocation budget of the file's own parameter count and its
state_dict shapes must equal the stored ones; only then the weights decompress, to exactly the byte count
the shapes x bit widths imply. No decompressor is ever allowed to produce more than the bytes expected (a
zstd frame's declared size is checked first; lzma/brotli are streamed with an output limit).

`load_artifact` verifies, decompresses, dequantizes with `distill.quant.dequantize` (the quantizer's own
function, so values are bit-exact) and builds the model from the INSTALLED student.model, refusing a file
whose embedded code differs from it; with trust_code=True it executes the embedded source instead (what an
evaluator without this package does) — that runs arbitrary code from the file.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import math
import os
import struct
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from distill import quant
from distill.errors import DistillError

MAGIC = b"DSTLGOLF"
FORMAT_VERSION = 1
_HEAD = struct.Struct("<8sHBBBBIII")
HEADER_BYTES = _HEAD.size + 32
CODECS = {1: "zstd", 2: "lzma", 3: "brotli"}
CODEC_IDS = {v: k for k, v in CODECS.items()}
LAYOUT_IDS = {name: i for i, name in enumerate(quant.LAYOUTS)}
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]

# Reader limits. Legit files sit far inside them; a file outside is refused before any large allocation.
MAX_CODE_BYTES = 1 << 20  # uncompressed embedded source (student/model.py is ~7 KB)
MAX_META_BYTES = 1 << 20  # uncompressed meta JSON (~80 bytes per tensor: a 9-layer model's is ~8 KB)
MAX_TENSORS = 8192
# Declared parameters per artifact byte. Real packs store 2-8 params per byte (0.125-0.5 bytes/param);
# all-zero tensors compress further, hence the slack. Bounds the float32 state a small file can make us
# allocate (64 x 4 bytes per file byte, x2 with the model).
MAX_PARAMS_PER_BYTE = 64
ZSTD_MAX_WINDOW_BYTES = 1 << 27  # zstd level 22 writes windows up to 2^27; a frame asking more is refused
# Model config: these keys, when present, must be ints in [1, limit] (num_layers also bounds the time a
# build takes before the shapes are checked).
CONFIG_LIMITS = {"vocab_size": 1 << 20, "model_dim": 1 << 16, "num_layers": 256, "num_heads": 1024,
                 "num_kv_heads": 1024}
QUANT_BITS = range(2, 9)  # int code widths the reader accepts (16 = fp16)


# -------------------------------------------------------------------------------------------- codecs


def available_codecs() -> list[str]:
    names = ["zstd", "lzma"]
    try:
        import brotli  # noqa: F401

        names.append("brotli")
    except ImportError:
        pass
    return names


def compress(data: bytes, codec: str) -> bytes:
    if codec == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=22).compress(data)
    if codec == "lzma":
        return lzma.compress(data, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    if codec == "brotli":
        import brotli

        return brotli.compress(data, quality=11, lgwin=24)
    raise DistillError(f"--codec: unknown codec {codec!r} (expected one of {sorted(CODEC_IDS)})")


def decompress(data: bytes, codec: str, max_bytes: int, where: str = "artifact") -> bytes:
    """Decompress one section, producing AT MOST `max_bytes` (DistillError naming `where` beyond that,
    for a truncated stream or for an undecodable one). Never allocates much more than `max_bytes`:
    zstd's declared content size is checked before decoding, lzma and brotli decode with an output limit."""
    try:
        if codec == "zstd":
            out = _zstd_bounded(data, max_bytes, where)
        elif codec == "lzma":
            out = _lzma_bounded(data, max_bytes, where)
        elif codec == "brotli":
            out = _brotli_bounded(data, max_bytes, where)
        else:
            raise DistillError(f"{where}: unknown codec {codec!r}")
    except DistillError:
        raise
    except Exception as e:  # noqa: BLE001 — each codec raises its own error types for corrupt input
        raise DistillError(f"{where}: corrupt {codec} stream ({type(e).__name__}: {str(e)[:100]})") from None
    if len(out) > max_bytes:
        raise DistillError(f"{where}: decompresses to more than the {max_bytes} bytes expected")
    return out


def _too_big(where: str, max_bytes: int, codec: str) -> DistillError:
    return DistillError(f"{where}: {codec} stream decompresses to more than the {max_bytes} bytes expected")


def _zstd_bounded(data: bytes, max_bytes: int, where: str) -> bytes:
    import zstandard

    declared = zstandard.frame_content_size(data)  # -1: not declared; ZstdError: not a frame
    if declared > max_bytes:  # decompress() would allocate the declared size whatever max_output_size says
        raise DistillError(f"{where}: zstd frame declares {declared} bytes, more than the {max_bytes} expected")
    dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW_BYTES)
    parts, n = [], 0
    if declared >= 0:  # what our writer produces: stream exactly the declared size
        with dctx.stream_reader(data, read_across_frames=False) as r:
            while n < declared and (chunk := r.read(min(declared - n, 1 << 22))):
                parts.append(chunk)
                n += len(chunk)
        if n != declared:
            raise DistillError(f"{where}: truncated zstd frame ({n} of {declared} declared bytes)")
        return b"".join(parts)
    # no declared size: feed the input in small pieces (a 256-byte piece holds at most ~64 RLE blocks of
    # 128 KiB), so the output never runs more than ~8 MiB past the cap before it is refused
    obj = dctx.decompressobj()
    for i in range(0, len(data), 256):
        chunk = obj.decompress(data[i:i + 256])
        parts.append(chunk)
        n += len(chunk)
        if n > max_bytes:
            raise _too_big(where, max_bytes, "zstd")
        if obj.eof:
            break
    if not obj.eof:
        raise DistillError(f"{where}: truncated zstd frame")
    return b"".join(parts)


def _lzma_bounded(data: bytes, max_bytes: int, where: str) -> bytes:
    d = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    out = d.decompress(data, max_length=max_bytes + 1)
    if len(out) > max_bytes:
        raise _too_big(where, max_bytes, "lzma")
    if not d.eof:
        raise DistillError(f"{where}: truncated lzma stream")
    return out


def _brotli_bounded(data: bytes, max_bytes: int, where: str) -> bytes:
    import brotli

    d = brotli.Decompressor()
    parts, n = [], 0
    try:  # brotli >= 1.2: an output limit; the rest of the output comes from further calls on empty input
        chunk, pieces = d.process(data, output_buffer_limit=max_bytes + 1), iter(())
    except TypeError:  # older brotli: no output limit, so feed the input in small pieces and check as we go
        chunk, pieces = b"", (data[i:i + 256] for i in range(0, len(data), 256))
    while True:
        parts.append(chunk)
        n += len(chunk)
        if n > max_bytes:
            raise _too_big(where, max_bytes, "brotli")
        if d.is_finished():
            break
        piece = next(pieces, None)
        if piece is not None:
            chunk = d.process(piece)
        elif hasattr(d, "can_accept_more_data") and not d.can_accept_more_data():
            chunk = d.process(b"", output_buffer_limit=max_bytes + 1 - n)
        else:
            raise DistillError(f"{where}: truncated brotli stream")
    return b"".join(parts)


def compress_best(data: bytes, codecs: list[str]) -> tuple[str, bytes]:
    """The smallest encoding among `codecs` (ties -> the earlier codec)."""
    best = None
    for c in codecs:
        out = compress(data, c)
        if best is None or len(out) < len(best[1]):
            best = (c, out)
    assert best is not None
    return best


# ------------------------------------------------------------------------------------- tensor entries


@dataclass
class Entry:
    """One tensor as stored: int codes + fp16 row scales (bits < 16), or an fp16 tensor (bits == 16)."""

    name: str
    shape: list[int]
    bits: int
    codes: torch.Tensor | None = None  # int8 [R, C]
    scales: torch.Tensor | None = None  # fp16 [R]
    values: torch.Tensor | None = None  # fp16, original shape
    clip: str = ""
    method: str = "fp16"
    extra: dict = field(default_factory=dict)

    def meta(self) -> dict:
        d = {"n": self.name, "s": self.shape, "b": self.bits}
        if self.bits < 16:
            d["c"] = self.clip
            d["m"] = self.method
        return d

    def dequantized(self) -> torch.Tensor:
        """The float32 tensor the model gets (pack -> unpack returns exactly this)."""
        if self.bits >= 16:
            return self.values.to(torch.float32).reshape(self.shape)
        return quant.dequantize(self.codes, self.scales).reshape(self.shape)

    def raw_bytes(self, layout: str) -> int:
        if self.bits >= 16:
            return 2 * int(np.prod(self.shape))
        return quant.packed_size(self.codes.numel(), self.bits, layout) + 2 * self.scales.numel()


def _storage_order(entries: list[Entry]) -> list[Entry]:
    """Quantized tensors grouped by bit width (similar symbol statistics sit together), then fp16 ones;
    stable within a group so the order is a pure function of the metadata."""
    return sorted(entries, key=lambda e: (-e.bits if e.bits < 16 else 99))


def encode_weights(entries: list[Entry], layout: str) -> bytes:
    codes, scales, fp16 = [], [], []
    for e in entries:
        if e.bits < 16:
            codes.append(quant.pack_ints(e.codes, e.bits, layout))
            scales.append(e.scales.contiguous().numpy().astype("<f2").tobytes())
        else:
            fp16.append(e.values.contiguous().numpy().astype("<f2").tobytes())
    return b"".join(codes) + quant.shuffle_bytes(b"".join(scales), 2) + quant.shuffle_bytes(b"".join(fp16), 2)


def decode_weights(payload: bytes, metas: list[dict], layout: str) -> dict[str, torch.Tensor]:
    """Inverse of `encode_weights` given the stored metadata (in storage order)."""
    pos, codes = 0, {}
    for m in metas:
        if m["b"] < 16:
            n = int(np.prod(m["s"]))
            size = quant.packed_size(n, m["b"], layout)
            q = quant.unpack_ints(payload[pos : pos + size], m["b"], n, layout)
            codes[m["n"]] = torch.from_numpy(q.copy()).reshape(m["s"][0], -1)
            pos += size
    n_scales = sum(m["s"][0] for m in metas if m["b"] < 16)
    n_fp16 = sum(int(np.prod(m["s"])) for m in metas if m["b"] >= 16)
    if len(payload) != pos + 2 * (n_scales + n_fp16):
        raise ValueError(f"weights payload is {len(payload)} bytes, metadata implies {pos + 2 * (n_scales + n_fp16)}")
    sc = np.frombuffer(quant.unshuffle_bytes(payload[pos : pos + 2 * n_scales], 2), dtype="<f2")
    fp = np.frombuffer(quant.unshuffle_bytes(payload[pos + 2 * n_scales :], 2), dtype="<f2")
    out, si, fi = {}, 0, 0
    for m in metas:
        if m["b"] < 16:
            r = m["s"][0]
            s16 = torch.from_numpy(sc[si : si + r].astype(np.float16))
            out[m["n"]] = quant.dequantize(codes[m["n"]], s16).reshape(m["s"])
            si += r
        else:
            n = int(np.prod(m["s"]))
            out[m["n"]] = torch.from_numpy(fp[fi : fi + n].astype(np.float16)).to(torch.float32).reshape(m["s"])
            fi += n
    return out


# ------------------------------------------------------------------------------------------ writing


def model_source() -> bytes:
    """The bytes of the installed student/model.py: the code shipped in (and counted by) every artifact."""
    import student.model as sm

    return Path(sm.__file__).read_bytes()


def encode_artifact(
    entries: list[Entry], config: dict, codecs: list[str], layouts: list[str], code: bytes | None = None
) -> tuple[bytes, dict]:
    """Serialize -> (file bytes, info about the choices made). Tries every layout x codec for the weights."""
    code = model_source() if code is None else code
    order = _storage_order(entries)
    best = None
    for layout in layouts:
        raw = encode_weights(order, layout)
        codec, blob = compress_best(raw, codecs)
        if best is None or len(blob) < len(best[2]):
            best = (layout, codec, blob, len(raw))
    layout, w_codec, w_blob, w_raw = best
    meta = {"format": "distill-artifact", "config": config, "layout": layout,
            "tensors": [e.meta() for e in order], "code_sha256": hashlib.sha256(code).hexdigest()}
    meta_raw = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()
    m_codec, m_blob = compress_best(meta_raw, codecs)
    c_codec, c_blob = compress_best(code, codecs)
    fields = (MAGIC, FORMAT_VERSION, CODEC_IDS[c_codec], CODEC_IDS[m_codec], CODEC_IDS[w_codec],
              LAYOUT_IDS[layout], len(c_blob), len(m_blob), len(w_blob))
    head = _HEAD.pack(*fields)
    body = c_blob + m_blob + w_blob
    digest = hashlib.sha256(head + body).digest()
    data = head + digest + body
    info = {"codec": w_codec, "code_codec": c_codec, "meta_codec": m_codec, "layout": layout,
            "code_bytes": len(c_blob), "meta_bytes": len(m_blob), "weights_bytes": len(w_blob),
            "weights_raw_bytes": w_raw, "header_bytes": HEADER_BYTES, "artifact_bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}
    return data, info


# ------------------------------------------------------------------------------------------ reading


@dataclass
class _Sections:
    """A parsed file: validated header + still-compressed sections, and the validated meta."""

    path: Path
    header: dict
    code_blob: bytes
    weights_blob: bytes
    meta: dict


def _parse(path: str | os.PathLike) -> tuple[dict, bytes, bytes, bytes]:
    """Validate the file (magic, version, lengths, checksum) -> (header dict, code, meta, weights blobs).
    The header's lengths are checked against the file size before the body is read."""
    p = Path(path)
    if not p.is_file():
        raise DistillError(f"{p}: artifact not found")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES or head[:8] != MAGIC:
            raise DistillError(f"{p}: not a distill artifact (bad magic or truncated header)")
        magic, version, cc, mc, wc, lay, clen, mlen, wlen = _HEAD.unpack_from(head)
        if HEADER_BYTES + clen + mlen + wlen != size:
            raise DistillError(f"{p}: section lengths do not add up to the file size {size} (truncated or "
                               "corrupt)")
        data = head + f.read(size - HEADER_BYTES)
    digest = data[_HEAD.size:HEADER_BYTES]
    if len(data) != size or hashlib.sha256(data[:_HEAD.size] + data[HEADER_BYTES:]).digest() != digest:
        raise DistillError(f"{p}: checksum mismatch (file corrupt or tampered)")
    if version != FORMAT_VERSION:
        raise DistillError(f"{p}: unsupported artifact format version {version} (expected {FORMAT_VERSION})")
    if any(c not in CODECS for c in (cc, mc, wc)) or lay >= len(quant.LAYOUTS):
        raise DistillError(f"{p}: unknown codec or layout id in header")
    header = {"magic": magic.decode(), "format_version": version, "code_codec": CODECS[cc],
              "meta_codec": CODECS[mc], "codec": CODECS[wc], "layout": quant.LAYOUTS[lay],
              "code_bytes": clen, "meta_bytes": mlen, "weights_bytes": wlen, "header_bytes": HEADER_BYTES,
              "artifact_bytes": len(data), "checksum_sha256": digest.hex()}
    o = HEADER_BYTES
    return header, data[o : o + clen], data[o + clen : o + clen + mlen], data[o + clen + mlen :]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_tensors(p: Path, tensors, artifact_bytes: int) -> int:
    """Per-tensor metadata sanity -> total parameter count (bounded by the file size)."""
    if not isinstance(tensors, list) or not 0 < len(tensors) <= MAX_TENSORS:
        raise DistillError(f"{p}: meta 'tensors' must be a list of 1..{MAX_TENSORS} entries")
    names, params = set(), 0
    for m in tensors:
        if not isinstance(m, dict) or not isinstance(m.get("n"), str) or not isinstance(m.get("s"), list):
            raise DistillError(f"{p}: malformed tensor entry in meta ({str(m)[:80]})")
        n, shape, b = m["n"], m["s"], m.get("b")
        if n in names or not 0 < len(n) <= 256:
            raise DistillError(f"{p}: tensor name {n[:80]!r} is empty, too long or repeated")
        names.add(n)
        if not 1 <= len(shape) <= 4 or not all(_is_int(d) and 1 <= d <= 1 << 31 for d in shape):
            raise DistillError(f"{p}: tensor {n}: bad shape {shape[:8]}")
        if not _is_int(b) or (b != 16 and b not in QUANT_BITS):
            raise DistillError(f"{p}: tensor {n}: bad bit width {b!r} (expected 2..8 or 16)")
        params += math.prod(shape)
    if params > MAX_PARAMS_PER_BYTE * artifact_bytes:
        raise DistillError(f"{p}: meta declares {params} parameters in a {artifact_bytes}-byte file (more than "
                           f"{MAX_PARAMS_PER_BYTE} per byte): refused as corrupt or a decompression bomb")
    return params


def check_config(config, where: str | os.PathLike) -> None:
    """A stored model config must be a JSON object whose sizes are ints within CONFIG_LIMITS (when present),
    whose bools are bools and whose other numbers are finite — checked before any model is built."""
    if not isinstance(config, dict):
        raise DistillError(f"{where}: model config is not a JSON object")
    for k, hi in CONFIG_LIMITS.items():
        if k in config and not (_is_int(config[k]) and 1 <= config[k] <= hi):
            raise DistillError(f"{where}: model config {k}={str(config[k])[:40]} is not an int in [1, {hi}]")
    for k, v in config.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise DistillError(f"{where}: model config {k}={v} is not finite")
        if isinstance(v, (dict, list)) or (isinstance(v, str) and len(v) > 256):
            raise DistillError(f"{where}: model config {k} has an unexpected value {str(v)[:40]}")
    mult = config.get("mlp_mult", 1.0)
    if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not 0 < mult <= 64:
        raise DistillError(f"{where}: model config mlp_mult={mult!r} is not a number in (0, 64]")


def _read(path: str | os.PathLike) -> _Sections:
    """Parse + decompress (capped) + validate the meta: everything but the code and weights sections."""
    p = Path(path)
    header, code_blob, meta_blob, w_blob = _parse(p)
    raw = decompress(meta_blob, header["meta_codec"], MAX_META_BYTES, f"{p}: meta section")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, an int of > 4300 digits
        raise DistillError(f"{p}: meta section is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != "distill-artifact":
        raise DistillError(f"{p}: meta section is not a distill-artifact object")
    if meta.get("layout") != header["layout"]:
        raise DistillError(f"{p}: meta layout {str(meta.get('layout'))[:20]!r} != header layout {header['layout']}")
    sha = meta.get("code_sha256")
    if sha is not None and not (isinstance(sha, str) and len(sha) == 64):
        raise DistillError(f"{p}: meta code_sha256 is not a sha256 hex digest")
    meta["params"] = _check_tensors(p, meta.get("tensors"), header["artifact_bytes"])
    check_config(meta.get("config"), p)
    return _Sections(p, header, code_blob, w_blob, meta)


def weights_raw_bytes(metas: list[dict], layout: str) -> int:
    """Uncompressed size of the weights payload the (validated) metadata implies."""
    codes = sum(quant.packed_size(math.prod(m["s"]), m["b"], layout) for m in metas if m["b"] < 16)
    scales = sum(m["s"][0] for m in metas if m["b"] < 16)
    fp16 = sum(math.prod(m["s"]) for m in metas if m["b"] >= 16)
    return codes + 2 * (scales + fp16)


def _code(sec: _Sections) -> bytes:
    """The embedded source, checked against the sha256 the meta records (files from before it: unchecked)."""
    code = decompress(sec.code_blob, sec.header["code_codec"], MAX_CODE_BYTES, f"{sec.path}: code section")
    sha = sec.meta.get("code_sha256")
    if sha is not None and hashlib.sha256(code).hexdigest() != sha:
        raise DistillError(f"{sec.path}: embedded code does not match its recorded sha256")
    return code


def _weights(sec: _Sections) -> dict[str, torch.Tensor]:
    metas, layout = sec.meta["tensors"], sec.header["layout"]
    expected = weights_raw_bytes(metas, layout)
    payload = decompress(sec.weights_blob, sec.header["codec"], expected, f"{sec.path}: weights section")
    if len(payload) != expected:
        raise DistillError(f"{sec.path}: weights section decompresses to {len(payload)} bytes, the tensor shapes "
                           f"imply {expected}")
    try:
        return decode_weights(payload, metas, layout)
    except Exception as e:  # noqa: BLE001 — consistent sizes but undecodable content: a broken writer
        raise DistillError(f"{sec.path}: cannot decode weights ({type(e).__name__}: {str(e)[:100]})") from None


def read_artifact_info(path: str | os.PathLike) -> dict:
    """Header, section sizes, codec/layout choices, model config and per-tensor bits — no model built."""
    sec = _read(path)
    meta = sec.meta
    tensors = [{"name": m["n"], "shape": m["s"], "bits": m["b"] if m["b"] < 16 else "fp16",
                "clip": m.get("c"), "method": m.get("m", "fp16")} for m in meta["tensors"]]
    return {**sec.header, "config": meta["config"], "tensors": tensors, "params": meta["params"],
            "bytes_per_param": sec.header["artifact_bytes"] / max(meta["params"], 1),
            "code_sha256": meta.get("code_sha256")}


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict, bytes]:
    """-> (dequantized float32 state_dict, model config, embedded model source). Validated and bounded as
    the module docstring says, except that the shapes are not checked against a model (none is built)."""
    sec = _read(path)
    return _weights(sec), sec.meta["config"], _code(sec)


def exec_model_source(code: bytes, name: str = "distill_artifact_model") -> types.ModuleType:
    """Execute embedded model source in a fresh module (registered while it runs: dataclasses look their
    module up in sys.modules). This RUNS the code: only for files you trust."""
    mod = types.ModuleType(name)
    mod.__file__ = f"<artifact:{name}>"
    sys.modules[name] = mod
    try:
        exec(compile(code, mod.__file__, "exec"), mod.__dict__)  # noqa: S102 — trust_code only
    finally:
        sys.modules.pop(name, None)
    return mod


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0][:160]


class _AllocationBudget(TorchFunctionMode):
    """While a model is built: count the elements every tensor factory asks for and refuse (ValueError)
    past `limit` BEFORE the call allocates — a config saying vocab 1e6 x dim 4096 is refused, not
    allocated. (A meta-device build would also do, but its ops import torch._dynamo: +2.5 s a process.)"""

    _SIZED: ClassVar = {torch.empty, torch.zeros, torch.ones, torch.rand, torch.randn}

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.used = limit, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        n = self._requested(func, args, kwargs)
        if n is not None:
            self.used += n
            if self.used > self.limit:
                raise ValueError(f"building the model asks for more than {self.limit} elements")
        return func(*args, **kwargs)

    def _requested(self, func, args, kwargs) -> int | None:
        if func in self._SIZED:
            size = kwargs.get("size", args[0] if len(args) == 1 and not isinstance(args[0], int) else args)
        elif func is torch.full:
            size = kwargs.get("size", args[0] if args else ())
        elif func is torch.randint:
            size = kwargs.get("size", args[-1] if args else ())
        elif func is torch.eye:
            size = [args[0], args[1] if len(args) > 1 and isinstance(args[1], int) else args[0]]
        elif func is torch.arange:  # arange(end) | arange(start, end[, step])
            nums = [float(a) for a in args if isinstance(a, (int, float)) and not isinstance(a, bool)]
            if not 1 <= len(nums) <= 3 or len(nums) != len(args):
                return None
            start, end, step = ([0.0] + nums + [1.0])[:3] if len(nums) == 1 else (nums + [1.0])[:3]
            return max(0, math.ceil((end - start) / step)) if step else None
        elif func in (torch.linspace, torch.logspace):
            return int(kwargs.get("steps", args[2] if len(args) > 2 else 0))
        elif getattr(func, "__name__", "").endswith("_like") and args and isinstance(args[0], torch.Tensor):
            return args[0].numel()
        else:
            return None
        return math.prod(int(d) for d in size)


def _build(sec: _Sections, build) -> torch.nn.Module:
    """Build the model on the CPU under an allocation budget of the file's own parameter count (+ slack for
    buffers and temporaries): a config that would build a bigger model than the file holds is refused first."""
    budget = _AllocationBudget(2 * sec.meta["params"] + (1 << 20))
    try:
        with budget:
            return build(sec.meta["config"])
    except Exception as e:  # noqa: BLE001 — a config the model code rejects (asserts, bad ratios, budget)
        raise DistillError(f"{sec.path}: the model config does not build a model matching the file "
                           f"({type(e).__name__}: {_first_line(e)})") from None


def _check_shapes(sec: _Sections, model: torch.nn.Module) -> None:
    """The model's state_dict must be exactly the stored tensors, name by name and shape by shape (a
    transposed matrix included) — checked before the weights are decompressed."""
    want = {k: list(v.shape) for k, v in model.state_dict().items()}
    have = {m["n"]: m["s"] for m in sec.meta["tensors"]}
    missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or unexpected:
        raise DistillError(f"{sec.path}: weights do not match the model (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]})")
    for k, s in want.items():
        if have[k] != s:
            raise DistillError(f"{sec.path}: tensor {k} is stored as {have[k]}, the model config implies {s}")


def load_artifact(path: str | os.PathLike, trust_code: bool = False, device: str = "cpu") -> torch.nn.Module:
    """Verify and load an artifact -> model in eval mode: model(ids LongTensor[B,T]) -> logits [B,T,V].

    Default: the INSTALLED student.model builds the model, and a file whose embedded code differs from it
    is refused (stored code is never executed). trust_code=True: the embedded source is executed and its
    build_model(config) is used — arbitrary code from the file runs. Any malformed file -> one-line
    DistillError, refused before large allocations (see the module docstring).
    """
    sec = _read(path)
    code = _code(sec)
    if trust_code:
        try:
            build = exec_model_source(code).build_model
        except Exception as e:  # noqa: BLE001 — the user asked to run it; its failure is still one line
            raise DistillError(f"{sec.path}: embedded model code failed ({type(e).__name__}: "
                               f"{_first_line(e)})") from None
    else:
        installed = model_source()
        if code != installed:
            raise DistillError(
                f"{sec.path}: its embedded model code (sha256 {hashlib.sha256(code).hexdigest()[:12]}) differs "
                f"from the installed student/model.py (sha256 {hashlib.sha256(installed).hexdigest()[:12]}); "
                "repack with this version, or pass --trust-code to run the file's own code")
        from student.model import build_model as build
    model = _build(sec, build)
    _check_shapes(sec, model)
    missing, unexpected = model.load_state_dict(_weights(sec), strict=False)
    if missing or unexpected:
        raise DistillError(f"{path}: weights do not match the model (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]})")
    return model.to(device).eval()

"""One self-contained artifact file: the code that runs the model + its quantized weights.

Layout (all integers little-endian):

    header  magic b"DSTLGOLF" | u16 format version | u8 codec(code) | u8 codec(meta) | u8 codec(weights)
            | u8 layout | u32 code_len | u32 meta_len | u32 weights_len | 32-byte sha256
    body    code (compressed student/model.py source) | meta (compressed JSON: model config + per-tensor
            quant metadata) | weights (compressed payload)

The sha256 covers the header fields before it and the whole body, so a flipped byte anywhere is refused.
Weights payload: every tensor's int codes (laid out by `layout`, tensors grouped by bit width), then all
per-row fp16 scales, then all fp16 tensors — the fp16 parts byte-plane shuffled. Every section is
compressed with the smallest of zstd-22 / lzma / brotli (when importable), and the header records which.

`load_artifact` verifies, decompresses, dequantizes with `distill.quant.dequantize` (the quantizer's own
function, so values are bit-exact) and builds the model from the INSTALLED student.model; with
trust_code=True it executes the embedded source instead (what an evaluator without this package does).
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import struct
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

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


def decompress(data: bytes, codec: str) -> bytes:
    if codec == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().decompress(data)
    if codec == "lzma":
        return lzma.decompress(data, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    if codec == "brotli":
        import brotli

        return brotli.decompress(data)
    raise ValueError(f"unknown codec {codec!r}")


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
            "tensors": [e.meta() for e in order]}
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


def _parse(path: str | os.PathLike) -> tuple[dict, bytes, bytes, bytes]:
    """Validate the file (magic, version, lengths, checksum) -> (header dict, code, meta, weights blobs)."""
    p = Path(path)
    if not p.is_file():
        raise DistillError(f"{p}: artifact not found")
    data = p.read_bytes()
    if len(data) < HEADER_BYTES or data[:8] != MAGIC:
        raise DistillError(f"{p}: not a distill artifact (bad magic or truncated header)")
    magic, version, cc, mc, wc, lay, clen, mlen, wlen = _HEAD.unpack_from(data)
    digest = data[_HEAD.size:HEADER_BYTES]
    if hashlib.sha256(data[:_HEAD.size] + data[HEADER_BYTES:]).digest() != digest:
        raise DistillError(f"{p}: checksum mismatch (file corrupt or tampered)")
    if version != FORMAT_VERSION:
        raise DistillError(f"{p}: unsupported artifact format version {version} (expected {FORMAT_VERSION})")
    if HEADER_BYTES + clen + mlen + wlen != len(data):
        raise DistillError(f"{p}: section lengths do not add up to the file size {len(data)}")
    if any(c not in CODECS for c in (cc, mc, wc)) or lay >= len(quant.LAYOUTS):
        raise DistillError(f"{p}: unknown codec or layout id in header")
    header = {"magic": magic.decode(), "format_version": version, "code_codec": CODECS[cc],
              "meta_codec": CODECS[mc], "codec": CODECS[wc], "layout": quant.LAYOUTS[lay],
              "code_bytes": clen, "meta_bytes": mlen, "weights_bytes": wlen, "header_bytes": HEADER_BYTES,
              "artifact_bytes": len(data), "checksum_sha256": digest.hex()}
    o = HEADER_BYTES
    return header, data[o : o + clen], data[o + clen : o + clen + mlen], data[o + clen + mlen :]


def read_artifact_info(path: str | os.PathLike) -> dict:
    """Header, section sizes, codec/layout choices, model config and per-tensor bits — no model built."""
    header, _code, meta_blob, _w = _parse(path)
    meta = json.loads(decompress(meta_blob, header["meta_codec"]))
    tensors = [{"name": m["n"], "shape": m["s"], "bits": m["b"] if m["b"] < 16 else "fp16",
                "clip": m.get("c"), "method": m.get("m", "fp16")} for m in meta["tensors"]]
    params = sum(int(np.prod(m["s"])) for m in meta["tensors"])
    return {**header, "config": meta["config"], "tensors": tensors, "params": params,
            "bytes_per_param": header["artifact_bytes"] / max(params, 1)}


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict, bytes]:
    """-> (dequantized float32 state_dict, model config, embedded model source)."""
    header, code_blob, meta_blob, w_blob = _parse(path)
    try:
        meta = json.loads(decompress(meta_blob, header["meta_codec"]))
        state = decode_weights(decompress(w_blob, header["codec"]), meta["tensors"], header["layout"])
        code = decompress(code_blob, header["code_codec"])
    except DistillError:
        raise
    except Exception as e:  # a consistent checksum but undecodable content: written by a broken writer
        raise DistillError(f"{path}: cannot decode artifact ({type(e).__name__}: {e})") from None
    return state, meta["config"], code


def exec_model_source(code: bytes, name: str = "distill_artifact_model") -> types.ModuleType:
    """Execute embedded model source in a fresh module (registered while it runs: dataclasses look their
    module up in sys.modules)."""
    mod = types.ModuleType(name)
    mod.__file__ = f"<artifact:{name}>"
    sys.modules[name] = mod
    try:
        exec(compile(code, mod.__file__, "exec"), mod.__dict__)
    finally:
        sys.modules.pop(name, None)
    return mod


def load_artifact(path: str | os.PathLike, trust_code: bool = False, device: str = "cpu") -> torch.nn.Module:
    """Verify and load an artifact -> model in eval mode: model(ids LongTensor[B,T]) -> logits [B,T,V].

    Default: the INSTALLED student.model builds the model (stored code is never executed).
    trust_code=True: the embedded source is executed and its build_model(config) is used.
    """
    state, config, code = read_state_dict(path)
    if trust_code:
        build = exec_model_source(code).build_model
    else:
        from student.model import build_model as build
    model = build(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DistillError(f"{path}: weights do not match the model (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]})")
    return model.to(device).eval()


# ------------------------------------------------------------------------------------------ packing


def pack_checkpoint(ckpt_dir: str | os.PathLike, out_path: str | os.PathLike, **kw) -> dict:
    """Quantize a float checkpoint into one artifact; see `distill.pack.pack_checkpoint` (the packer lives
    with its CLI so that this module stays the file format)."""
    from distill.pack import pack_checkpoint as _pack

    return _pack(ckpt_dir, out_path, **kw)

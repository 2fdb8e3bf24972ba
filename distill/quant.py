"""Pure tensor quantizers for packed artifacts: per-row symmetric int-k (k in 8/6/5/4) with fp16 scales.

- `quantize_rtn(w, bits, clip)` round-to-nearest with per-row scales; `dequantize(q, scale)` is THE
  dequantizer (the artifact loader calls it too, so pack -> unpack is bit-exact by construction).
- `search_clip(w, bits, H=None)` picks, per tensor, the clip (a fraction of each row's absmax, or a
  multiple of each row's std) minimizing reconstruction MSE, or the Hessian-weighted error when H is given.
- `rd_options(w, bits, H)` / `rd_choose(options, lam)` the rate-aware choice: per tensor the clip or step
  minimizing normalized distortion + lam * estimated bits (entropy of the codes), so one lam trades size
  for error consistently across tensors of different sizes and magnitudes.
- `gptq(w, H, bits, clip)` Frantar et al. 2022: quantize column by column, pushing each column's error onto
  the not-yet-quantized columns through the inverse Hessian of the layer input (H = X^T X).
- `fake_quantize(w, bits, clip)` the same RTN grid with a straight-through gradient (late QAT).
- `pack_ints` / `unpack_ints` lay int codes out as bytes: one code per byte, dense bit-packing, or
  zigzag bit-planes (which one compresses smallest depends on the entropy coder; the artifact tries them).

Imports only torch, numpy and the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SUPPORTED_BITS = (8, 7, 6, 5, 4, 3, 2)
LAYOUTS = ("byte", "dense", "bitplanes")

# Candidate clips searched per tensor. ("absmax", r): clip each row at r * max|w_row|;
# ("std", k): clip each row at min(max|w_row|, k * std(w_row)) — the golf records' std-based clip.
ABSMAX_RATIOS = (1.0, 0.97, 0.94, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5)
STD_MULTIPLES = (2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0)
# Rate control only: a grid wider than the row absmax (coarser steps, fewer codes in use, fewer bits after
# the entropy coder). Never chosen for accuracy; `rd_options` offers them to the rate-aware choice.
COARSE_RATIOS = (1.15, 1.3, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 12.0, 16.0)
# ("step", s): each row's step is s * rms(w_row), whatever its absmax. Rows then share one step-to-spread
# ratio (a homogeneous code distribution the entropy coder models well) and the grid's outer levels are
# spare: values past qmax * step saturate, levels past the absmax cost nothing after entropy coding.
# Geometric, 2^(-1/4) apart: from ~2 bits/value (s = 1) to the 8-bit grid's resolution (s = 1/64).
STEP_MULTIPLES = tuple(round(2.0 ** (-e / 4), 5) for e in range(25))


def qmax(bits: int) -> int:
    """Largest code of a symmetric signed int-k grid: codes lie in [-qmax, qmax] (2*qmax+1 levels)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits} (supported: {SUPPORTED_BITS})")
    return (1 << (bits - 1)) - 1


@dataclass(frozen=True)
class Clip:
    kind: str = "absmax"  # "absmax" | "std"
    value: float = 1.0

    def __str__(self) -> str:
        return f"{self.kind}*{self.value:g}"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "value": self.value}

    @classmethod
    def parse(cls, clip: Clip | float | dict | None) -> Clip:
        if clip is None:
            return cls()
        if isinstance(clip, Clip):
            return clip
        if isinstance(clip, dict):
            return cls(str(clip["kind"]), float(clip["value"]))
        return cls("absmax", float(clip))

    def row_limits(self, w: torch.Tensor, bits: int | None = None) -> torch.Tensor:
        """Per-row clip threshold (float32 [R]) for a 2-D w (a "step" clip needs the grid's `bits`)."""
        absmax = w.abs().amax(dim=1)
        if self.kind == "step":
            if bits is None:
                raise ValueError("a step clip needs the bit width")
            return self.value * w.float().pow(2).mean(dim=1).sqrt() * qmax(bits)
        if self.kind == "absmax":
            return absmax * self.value
        if self.kind == "std":
            return torch.minimum(absmax, self.value * w.float().pow(2).mean(dim=1).sqrt())
        raise ValueError(f"unknown clip kind {self.kind!r}")


def _fp16_scale_ceil(scale: torch.Tensor) -> torch.Tensor:
    """Round float32 scales UP to fp16 so every in-clip value still maps inside [-qmax, qmax] with error
    <= scale/2 (rounding down would push the row's extreme one step past the grid)."""
    s = scale.clamp(min=2.0**-24, max=65504.0)
    s16 = s.to(torch.float16)
    low = s16.float() < s
    if low.any():
        bumped = (s16.view(torch.int16) + 1).view(torch.float16)  # next fp16 up (positive values)
        s16 = torch.where(low, bumped, s16)
    return s16


def row_scales(w: torch.Tensor, bits: int, clip: Clip | float | None = None) -> torch.Tensor:
    """fp16 per-row scales [R] for a 2-D w: clip_row / qmax (1.0 for all-zero rows)."""
    lim = Clip.parse(clip).row_limits(w.float(), bits)
    lim = torch.where(lim > 0, lim, torch.ones_like(lim) * qmax(bits))
    return _fp16_scale_ceil(lim / qmax(bits))


def quantize_with_scales(w: torch.Tensor, scale16: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 codes [R, C] = clamp(round(w / scale), -qmax, qmax)."""
    m = qmax(bits)
    return torch.clamp(torch.round(w.float() / scale16.float()[:, None]), -m, m).to(torch.int8)


def quantize_rtn(w: torch.Tensor, bits: int, clip: Clip | float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest per-row quantization of a 2-D w -> (int8 codes [R, C], fp16 scales [R])."""
    if w.dim() != 2:
        raise ValueError(f"quantize_rtn expects a 2-D tensor, got shape {tuple(w.shape)}")
    scale16 = row_scales(w, bits, clip)
    return quantize_with_scales(w, scale16, bits), scale16


def dequantize(q: torch.Tensor, scale16: torch.Tensor) -> torch.Tensor:
    """THE dequantizer: float32 [R, C] = codes * fp16 scale (exactly what the artifact loader computes)."""
    return q.to(torch.float32) * scale16.to(torch.float32)[:, None]


def weighted_error(w: torch.Tensor, wq: torch.Tensor, H: torch.Tensor | None = None) -> float:
    """Sum of squared error, or the Hessian-weighted tr((W - Wq) H (W - Wq)^T) (= output-space error on the
    calibration inputs) when H = X^T X of the layer input is given."""
    d = (w.float() - wq.float())
    if H is None:
        return float(d.pow(2).sum())
    return float(((d @ H.float()) * d).sum())


def clip_candidates() -> list[Clip]:
    return [Clip("absmax", r) for r in ABSMAX_RATIOS] + [Clip("std", k) for k in STD_MULTIPLES]


def clip_table(
    w: torch.Tensor, bits: int, H: torch.Tensor | None = None, candidates: list[Clip] | None = None
) -> list[tuple[Clip, float]]:
    """[(clip, RTN error)] for every candidate; error Hessian-weighted when H is given."""
    w = w.detach().float()
    Hf = None if H is None else H.detach().float()
    out = []
    for c in candidates or clip_candidates():
        q, s = quantize_rtn(w, bits, c)
        out.append((c, weighted_error(w, dequantize(q, s), Hf)))
    return out


def code_entropy_bits(q: torch.Tensor, bits: int) -> float:
    """Order-0 entropy of the codes, in bits for the whole tensor: what an ideal entropy coder would need
    (zstd-22 / brotli-11 land within ~1-2% of it on these streams)."""
    counts = torch.bincount((q.reshape(-1).long() + qmax(bits)), minlength=2 * qmax(bits) + 1).double()
    p = counts[counts > 0] / q.numel()
    return float(-(p * p.log2()).sum()) * q.numel()


def search_clip(
    w: torch.Tensor, bits: int, H: torch.Tensor | None = None, candidates: list[Clip] | None = None
) -> tuple[Clip, float]:
    """The per-tensor clip minimizing RTN reconstruction error (Hessian-weighted when H is given)."""
    return min(clip_table(w, bits, H, candidates), key=lambda t: t[1])


# ---------------------------------------------------------------------------------- rate-distortion


@dataclass(frozen=True)
class RDOption:
    """One way to quantize a tensor: its clip, normalized distortion and estimated size.

    dist: numel * (error / energy), i.e. the tensor's noise-to-signal ratio counted once per element, with
    error and energy both Hessian-weighted when H is given (output-space noise-to-signal). Summing it over
    tensors weighs every element's relative error alike, whatever the tensor's magnitude: the errors of
    different tensors are comparable, which raw squared errors are not.
    rate_bits: order-0 entropy of the codes + 16 bits per fp16 row scale.
    """

    clip: Clip
    dist: float
    rate_bits: float
    accuracy: bool  # one of the error-only search's candidates (`clip_candidates`)


def tensor_energy(w: torch.Tensor, H: torch.Tensor | None = None) -> float:
    """||W||^2, or tr(W H W^T) (the layer's output energy on the calibration inputs) when H is given."""
    return weighted_error(w, torch.zeros_like(w), H)


def rd_candidates() -> list[Clip]:
    return clip_candidates() + [Clip("absmax", r) for r in COARSE_RATIOS] + [Clip("step", s) for s in STEP_MULTIPLES]


def rd_options(
    w: torch.Tensor, bits: int, H: torch.Tensor | None = None, fisher: torch.Tensor | None = None
) -> list[RDOption]:
    """Every RD candidate of a 2-D w at `bits`, RTN-quantized: [RDOption] (see RDOption for the units).

    With `fisher` (the diagonal empirical Fisher of the loss w.r.t. w, same shape), dist is instead
    sum(fisher * (w - wq)^2): the second-order estimate of the loss increase, in loss units, comparable
    across all tensors of a model without any normalization (H is then not used)."""
    w = w.detach().float()
    Hf = None if H is None else H.detach().float()
    Ff = None if fisher is None else fisher.detach().float().reshape(w.shape)
    norm = w.numel() / max(tensor_energy(w, Hf), 1e-30)
    acc = set(clip_candidates())
    out = []
    for c in rd_candidates():
        q, s = quantize_rtn(w, bits, c)
        wq = dequantize(q, s)
        dist = float((Ff * (w - wq).pow(2)).sum()) if Ff is not None else weighted_error(w, wq, Hf) * norm
        out.append(RDOption(c, dist, code_entropy_bits(q, bits) + 16.0 * s.numel(), c in acc))
    return out


def rd_choose(options: list[RDOption], lam: float, cap_rate: bool = True) -> RDOption:
    """The option minimizing dist + lam * rate_bits. lam <= 0: the error-only choice (what `search_clip`
    picks). With `cap_rate`, only options no larger than the error-only choice compete, so a rate-aware
    choice never costs more (estimated) bits than the error-only one."""
    best_acc = min((o for o in options if o.accuracy), key=lambda o: o.dist)
    if lam <= 0:
        return best_acc
    pool = [o for o in options if o.rate_bits <= best_acc.rate_bits] if cap_rate else options
    return min(pool, key=lambda o: (o.dist + lam * o.rate_bits, o.rate_bits))


# ---------------------------------------------------------------------------------------------- GPTQ


def gptq(
    w: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    clip: Clip | float | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ with fixed per-row scales (from `clip`) -> (int8 codes [R, C], fp16 scales [R]).

    w: [R, C] (out, in) as in nn.Linear; H: [C, C] = sum of x x^T over calibration inputs x (dimension C).
    Dampening adds damp * mean(diag H) to the diagonal so the Cholesky factor exists; act_order quantizes
    the columns with the largest input energy first (their errors get compensated by the most columns).
    """
    W = w.detach().to(torch.float32).clone()
    R, C = W.shape
    H = H.detach().to(torch.float64).clone()  # float64 for the factorization, float32 for the sweep
    if H.shape != (C, C):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match weight columns {C}")
    scale16 = row_scales(w.float(), bits, clip)
    scale = scale16.to(torch.float32)
    m = qmax(bits)

    dead = torch.diag(H) == 0  # inputs that never fire: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(C)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(C, dtype=H.dtype)
    # upper Cholesky factor of H^-1: row i holds the update direction for the remaining columns
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).to(torch.float32)

    Q = torch.zeros(R, C, dtype=torch.float32)
    for i1 in range(0, C, block_size):
        i2 = min(i1 + block_size, C)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = W1[:, i]
            q = torch.clamp(torch.round(col / scale), -m, m)
            Q[:, i1 + i] = q
            err = (col - q * scale) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    inv = torch.argsort(perm)
    return Q[:, inv].to(torch.int8), scale16


def gptq_search(
    w: torch.Tensor, H: torch.Tensor, bits: int, top: int = 2, **gptq_kw
) -> tuple[torch.Tensor, torch.Tensor, Clip, float]:
    """GPTQ at the `top` clips that are best for RTN under the Hessian-weighted error; keep the best result.
    Returns (codes, scales, clip, hessian_weighted_error)."""
    scored = sorted(clip_table(w, bits, H), key=lambda t: t[1])
    Hf = H.float()
    best = None
    for c, _ in scored[:top]:
        q, s = gptq(w, H, bits, c, **gptq_kw)
        err = weighted_error(w, dequantize(q, s), Hf)
        if best is None or err < best[3]:
            best = (q, s, c, err)
    assert best is not None
    return best


# ----------------------------------------------------------------------------------------------- QAT


def fake_quantize(w: torch.Tensor, bits: int, clip: Clip | float | None = None) -> torch.Tensor:
    """RTN quantize-dequantize on the artifact's grid (rows = dim 0) with a straight-through gradient:
    forward returns the dequantized weights, backward passes the gradient to w unchanged.

    `clip` as in `Clip.parse`: None (row absmax), a float r (r * row absmax) or a Clip. Scales follow the
    artifact exactly (fp16, rounded up), so a QAT-trained model sees the weights it will be packed with.
    """
    w2 = w.reshape(w.shape[0], -1) if w.dim() != 2 else w
    with torch.no_grad():
        q, s = quantize_rtn(w2.detach(), bits, clip)
        wq = dequantize(q, s).to(w.dtype).reshape(w.shape)
    return w + (wq - w).detach()


# ------------------------------------------------------------------------------------------- packing


def _to_unsigned(q: np.ndarray, bits: int, zigzag: bool) -> np.ndarray:
    q = q.astype(np.int16)
    if zigzag:  # 0, -1, 1, -2, 2, ... -> 0, 1, 2, 3, 4: small magnitudes get small codes (high bits zero)
        return np.where(q >= 0, 2 * q, -2 * q - 1).astype(np.uint8)
    return (q + qmax(bits)).astype(np.uint8)


def _from_unsigned(u: np.ndarray, bits: int, zigzag: bool) -> np.ndarray:
    u = u.astype(np.int16)
    if zigzag:
        return np.where(u % 2 == 0, u // 2, -(u + 1) // 2).astype(np.int8)
    return (u - qmax(bits)).astype(np.int8)


def pack_ints(q: np.ndarray | torch.Tensor, bits: int, layout: str = "byte") -> bytes:
    """Lay out int codes in [-qmax, qmax] as bytes.

    byte      one code per byte (offset by qmax): byte-aligned symbols the entropy coder models directly.
    dense     `bits` bits per code, bit-packed (little-endian bit order): smallest raw, but symbols straddle
              bytes, which LZ/context coders see as noise.
    bitplanes zigzag codes split into `bits` planes, each bit-packed: the high planes are nearly all zero
              and compress to almost nothing.
    """
    if isinstance(q, torch.Tensor):
        q = q.cpu().numpy()
    q = np.asarray(q).reshape(-1)
    if layout == "byte":
        return _to_unsigned(q, bits, zigzag=False).tobytes()
    if layout == "dense":
        u = _to_unsigned(q, bits, zigzag=False)
        bitmat = ((u[:, None] >> np.arange(bits, dtype=np.uint8)) & 1).astype(np.uint8)  # [N, bits]
        return np.packbits(bitmat.reshape(-1), bitorder="little").tobytes()
    if layout == "bitplanes":
        u = _to_unsigned(q, bits, zigzag=True)
        planes = [np.packbits(((u >> b) & 1).astype(np.uint8), bitorder="little") for b in range(bits)]
        return b"".join(p.tobytes() for p in planes)
    raise ValueError(f"unknown layout {layout!r} (expected one of {LAYOUTS})")


def packed_size(n: int, bits: int, layout: str) -> int:
    """Bytes `pack_ints` produces for n codes."""
    if layout == "byte":
        return n
    if layout == "dense":
        return (n * bits + 7) // 8
    if layout == "bitplanes":
        return bits * ((n + 7) // 8)
    raise ValueError(f"unknown layout {layout!r}")


def unpack_ints(data: bytes, bits: int, n: int, layout: str = "byte") -> np.ndarray:
    """Inverse of `pack_ints`: int8 array of n codes."""
    buf = np.frombuffer(data, dtype=np.uint8)
    if buf.size != packed_size(n, bits, layout):
        raise ValueError(f"packed data is {buf.size} bytes, expected {packed_size(n, bits, layout)}")
    if layout == "byte":
        return _from_unsigned(buf, bits, zigzag=False)
    if layout == "dense":
        bitmat = np.unpackbits(buf, bitorder="little")[: n * bits].reshape(n, bits)
        u = (bitmat.astype(np.uint16) << np.arange(bits, dtype=np.uint16)).sum(axis=1)
        return _from_unsigned(u.astype(np.uint8), bits, zigzag=False)
    if layout == "bitplanes":
        plane_bytes = (n + 7) // 8
        u = np.zeros(n, dtype=np.uint8)
        for b in range(bits):
            plane = np.unpackbits(buf[b * plane_bytes : (b + 1) * plane_bytes], bitorder="little")[:n]
            u |= plane.astype(np.uint8) << b
        return _from_unsigned(u, bits, zigzag=True)
    raise ValueError(f"unknown layout {layout!r}")


def shuffle_bytes(data: bytes, itemsize: int) -> bytes:
    """Byte-plane shuffle: all first bytes of each item, then all second bytes, ... (fp16 exponents then
    cluster together, which entropy coders like)."""
    if itemsize <= 1 or not data:
        return data
    a = np.frombuffer(data, dtype=np.uint8).reshape(-1, itemsize)
    return a.T.copy().tobytes()


def unshuffle_bytes(data: bytes, itemsize: int) -> bytes:
    if itemsize <= 1 or not data:
        return data
    a = np.frombuffer(data, dtype=np.uint8).reshape(itemsize, -1)
    return a.T.copy().tobytes()


# --------------------------------------------------------------------------------------- calibration


@torch.no_grad()
def collect_hessians(
    model: torch.nn.Module,
    batches,
    head_name: str | None = None,
    hidden_fn=None,
    deadline_s: float | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """H = sum_x x x^T (float64) of the input of every nn.Linear, keyed by its weight's name.

    `batches` yields LongTensor [B, T] of calibration ids (TRAINING tokens). If `hidden_fn(ids)` returns the
    input of an output head that is not an nn.Linear (a tied embedding), its Hessian goes under `head_name`.
    Stops after the batch during which time.monotonic() passes `deadline_s`. Returns (hessians, tokens seen).
    """
    import time

    hess: dict[str, torch.Tensor] = {}
    hooks = []

    def make_hook(key: str):
        def hook(_mod, inputs, _out):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            h = (x.T @ x).to(torch.float64)
            hess[key] = hess[key] + h if key in hess else h

        return hook

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            hooks.append(mod.register_forward_hook(make_hook(f"{name}.weight")))
    seen = 0
    try:
        for ids in batches:
            if hidden_fn is not None:
                h = hidden_fn(ids)
                x = h.reshape(-1, h.shape[-1]).float()
                if head_name is not None:
                    hh = (x.T @ x).to(torch.float64)
                    hess[head_name] = hess[head_name] + hh if head_name in hess else hh
            else:
                model(ids)
            seen += ids.numel()
            if deadline_s is not None and time.monotonic() > deadline_s:
                break
    finally:
        for h in hooks:
            h.remove()
    return hess, seen

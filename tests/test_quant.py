"""Quantizer unit tests: RTN error bounds, clip search, GPTQ vs RTN, fake-quant STE, sub-byte packing.

Run: python -m pytest -q tests/test_quant.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill import quant


@pytest.mark.parametrize("bits", [8, 6, 5, 4])
def test_rtn_per_row_error_within_half_step(bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(48, 96, generator=g) * torch.rand(48, 1, generator=g)  # rows of different magnitude
    w[3] = 0.0  # an all-zero row must not divide by zero
    q, s = quant.quantize_rtn(w, bits)
    assert q.dtype == torch.int8 and s.dtype == torch.float16 and s.shape == (48,)
    m = quant.qmax(bits)
    assert int(q.abs().max()) <= m
    err = (w - quant.dequantize(q, s)).abs()
    assert (err <= s.float()[:, None] / 2 + 1e-7).all()
    assert int(q[3].abs().max()) == 0
    # the row absmax lands on (or next to) the top code: the grid is actually used
    assert int(q.abs().amax(dim=1)[torch.arange(48) != 3].min()) >= m - 1


@pytest.mark.parametrize("clip", [quant.Clip("absmax", 0.7), quant.Clip("std", 2.5)])
def test_clipped_values_saturate_and_in_range_error_is_bounded(clip):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 200, generator=g)
    q, s = quant.quantize_rtn(w, 6, clip)
    deq = quant.dequantize(q, s)
    lim = (s.float() * quant.qmax(6))[:, None]
    inside = w.abs() <= lim
    assert (~inside).any()  # this clip does cut the tails
    assert ((w - deq).abs()[inside] <= (s.float()[:, None] / 2).expand_as(w)[inside] + 1e-7).all()
    assert (q[~inside].abs() == quant.qmax(6)).all()  # tails saturate at the extreme code


def test_clip_search_is_no_worse_than_absmax():
    torch.manual_seed(1)
    w = torch.distributions.StudentT(3.0).sample((64, 256))  # heavy tails: clipping should pay off at 4 bits
    clip, err = quant.search_clip(w, 4)
    q, s = quant.quantize_rtn(w, 4)
    err_absmax = quant.weighted_error(w, quant.dequantize(q, s))
    assert err <= err_absmax
    assert clip != quant.Clip("absmax", 1.0) and err < 0.9 * err_absmax


def _correlated_layer(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4096, 24, generator=g) @ torch.randn(24, 128, generator=g)  # rank-24 inputs ...
    x = x + 0.05 * torch.randn(4096, 128, generator=g)  # ... plus a little noise: strongly correlated columns
    w = torch.randn(64, 128, generator=g) / 128**0.5
    return w, x.T @ x


@pytest.mark.parametrize("bits", [6, 4])
def test_gptq_beats_rtn_on_hessian_weighted_error(bits):
    w, H = _correlated_layer()
    clip, err_rtn = quant.search_clip(w, bits, H)  # best RTN under the same metric
    q, s = quant.gptq(w, H, bits, clip)
    err_gptq = quant.weighted_error(w, quant.dequantize(q, s), H)
    assert err_gptq < 0.5 * err_rtn
    assert int(q.abs().max()) <= quant.qmax(bits)
    _q2, _s2, _, err2 = quant.gptq_search(w, H, bits)
    assert err2 <= err_gptq * 1.0001
    # act_order off still helps
    q3, s3 = quant.gptq(w, H, bits, clip, act_order=False, block_size=32)
    assert quant.weighted_error(w, quant.dequantize(q3, s3), H) < err_rtn


def test_gptq_handles_dead_inputs():
    w, H = _correlated_layer(2)
    H[:, 5] = 0.0
    H[5, :] = 0.0
    q, _s = quant.gptq(w, H, 6)
    assert q.shape == w.shape and int(q[:, 5].abs().max()) == 0  # a never-active input gets weight 0


def test_fake_quantize_matches_grid_and_passes_gradient():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 40, generator=g, requires_grad=True)
    y = quant.fake_quantize(w, 5, 0.9)
    q, s = quant.quantize_rtn(w.detach(), 5, 0.9)
    assert torch.equal(y.detach(), quant.dequantize(q, s))
    (y * torch.arange(40.0)).sum().backward()
    assert torch.equal(w.grad, torch.arange(40.0).expand(16, 40))  # straight-through: d y / d w = 1
    w3 = torch.randn(4, 3, 5, generator=g)  # >2-D tensors quantize per leading row
    assert quant.fake_quantize(w3, 8).shape == (4, 3, 5)


@pytest.mark.parametrize("layout", quant.LAYOUTS)
@pytest.mark.parametrize("bits", [8, 6, 5, 4])
def test_pack_ints_roundtrip(bits, layout):
    m = quant.qmax(bits)
    rng = np.random.default_rng(bits)
    q = rng.integers(-m, m + 1, size=1001).astype(np.int8)  # odd length: partial final byte
    q[:2] = [-m, m]
    data = quant.pack_ints(q, bits, layout)
    assert len(data) == quant.packed_size(q.size, bits, layout)
    assert np.array_equal(quant.unpack_ints(data, bits, q.size, layout), q)
    if layout == "dense":
        assert len(data) == (1001 * bits + 7) // 8


def test_byte_shuffle_roundtrip():
    data = np.random.default_rng(0).standard_normal(999).astype("<f2").tobytes()
    sh = quant.shuffle_bytes(data, 2)
    assert sh != data and quant.unshuffle_bytes(sh, 2) == data


def test_collect_hessians_equals_xtx():
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 4, bias=False))
    ids = torch.randint(0, 50, (3, 7))
    hess, seen = quant.collect_hessians(lin, [ids, ids])
    x = lin[0](ids).reshape(-1, 8).double()
    assert seen == 42
    assert torch.allclose(hess["1.weight"], 2 * x.T @ x, rtol=1e-5, atol=1e-6)


def test_step_clip_sets_step_from_row_rms():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(16, 300, generator=g) * torch.linspace(0.1, 3.0, 16)[:, None]
    q, s = quant.quantize_rtn(w, 6, quant.Clip("step", 0.25))
    rms = w.pow(2).mean(dim=1).sqrt()
    assert torch.allclose(s.float(), 0.25 * rms, rtol=1e-3)  # fp16, rounded up
    inside = w.abs() <= s.float()[:, None] * quant.qmax(6)
    assert inside.float().mean() > 0.99  # 31 steps of rms/4 cover ~7.75 sigma
    assert ((w - quant.dequantize(q, s)).abs()[inside] <= (s.float()[:, None] / 2).expand_as(w)[inside] + 1e-7).all()


@pytest.mark.parametrize("bits", [6, 4])
def test_rd_choose_never_costs_more_bits_than_error_only(bits):
    torch.manual_seed(5)
    w = torch.distributions.StudentT(4.0).sample((64, 192)) * 0.02
    opts = quant.rd_options(w, bits)
    err_only = quant.rd_choose(opts, 0.0)
    clip, _ = quant.search_clip(w, bits)
    assert err_only.clip == clip  # lambda 0 = the old error-only search
    rates = []
    for lam in (1e-4, 1e-3, 1e-2, 0.1, 1.0):
        o = quant.rd_choose(opts, lam)
        assert o.rate_bits <= err_only.rate_bits + 1e-9
        rates.append(o.rate_bits)
    assert rates == sorted(rates, reverse=True) and rates[-1] < 0.7 * err_only.rate_bits
    # the estimate is the codes' real order-0 entropy + 16 bits per row scale
    q, _s = quant.quantize_rtn(w, bits, quant.rd_choose(opts, 0.01).clip)
    assert quant.rd_choose(opts, 0.01).rate_bits == pytest.approx(quant.code_entropy_bits(q, bits) + 16 * 64)


def test_rd_options_distortions_are_comparable_across_scales():
    torch.manual_seed(6)
    w = torch.randn(32, 128)
    a, b = quant.rd_options(w, 6), quant.rd_options(w * 1000.0, 6)
    # the normalized distortion (noise-to-signal x numel) ignores the tensor's magnitude
    for x, y in zip(a, b):
        assert x.clip == y.clip and x.dist == pytest.approx(y.dist, rel=1e-3)
    # Fisher-weighted: sum F (w - wq)^2 exactly; zero sensitivity -> the cheapest option wins
    F = torch.rand(32, 128)
    fo = quant.rd_options(w, 6, fisher=F)
    q, s = quant.quantize_rtn(w, 6, fo[3].clip)
    assert fo[3].dist == pytest.approx(float((F * (w - quant.dequantize(q, s)).pow(2)).sum()), rel=1e-5)
    zero = quant.rd_options(w, 6, fisher=torch.zeros(32, 128))
    assert quant.rd_choose(zero, 1e-9, cap_rate=False).rate_bits == min(o.rate_bits for o in zero)

"""The transformers backend's CPU fast path on a real (random-init) LlamaForCausalLM saved with
save_pretrained: bf16 body + fp32 output head stays close to fp32; pad-free length-sorted batching gives
the same rows as scoring each sequence alone; log-probs are normalised.

Run: pytest -q tests/test_backend_hf.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from teachers.backend import TeacherSpec
from teachers.backend_hf import HFBackend, resolve_dtype

VOCAB = 512


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # peaked distributions, like a trained model's (scaled embeddings -> large logits)
        model.model.embed_tokens.weight.mul_(40.0)
    out = tmp_path_factory.mktemp("llama")
    model.save_pretrained(out)
    return str(out)


def _backend(path: str, dtype: str, batch_tokens: int = 4096) -> HFBackend:
    spec = TeacherSpec(kind="hf", path=path, model_id=path, revision="")
    return HFBackend(spec, max_model_len=None, batch_tokens=batch_tokens, max_k=16, device="cpu", dtype=dtype)


def _seqs() -> list[list[int]]:
    g = np.random.default_rng(1)
    return [g.integers(0, VOCAB, n).tolist() for n in (50, 17, 50, 120, 3)]


def test_bf16_body_with_fp32_head_is_close_to_fp32(llama_dir):
    b32, b16 = _backend(llama_dir, "float32"), _backend(llama_dir, "bfloat16")
    assert b32._head32 is None and b16._head32 is not None  # the fp32 output head is in use
    assert b16._head32[1].dtype == torch.float32
    assert "bfloat16" in b16.version and "float32" in b32.version  # recorded in the cache manifest
    seqs = _seqs()
    r32, r16 = b32.score(seqs, 8), b16.score(seqs, 8)
    for a, b in zip(r32, r16):
        # bf16 body: ~0.4% relative error per activation, so a log-prob's error scales with its size
        tol = lambda x: 0.01 * np.abs(x) + 0.02
        assert (np.abs(a.actual_logprob - b.actual_logprob) <= tol(a.actual_logprob)).all()
        assert (np.abs(a.topk_logprobs[:, 0] - b.topk_logprobs[:, 0]) <= tol(a.topk_logprobs[:, 0])).all()
        assert (a.topk_ids[:, 0] == b.topk_ids[:, 0]).mean() > 0.9


def test_pad_free_batches_equal_single_sequences(llama_dir):
    be = _backend(llama_dir, "float32")
    seqs = _seqs()
    batches = be._batches(seqs)
    assert sorted(i for b in batches for i in b) == list(range(len(seqs)))
    assert all(len({len(seqs[i]) for i in b}) == 1 for b in batches)  # one length per batch on CPU
    assert any(len(b) == 2 for b in batches)  # the two 50-token sequences share a batch
    together = be.score(seqs, 8)
    for s, t in zip(seqs, together):
        alone = be.score([s], 8)[0]
        assert t.topk_ids.shape == (len(s) - 1, 8)
        np.testing.assert_allclose(t.topk_logprobs, alone.topk_logprobs, atol=1e-5)
        np.testing.assert_allclose(t.actual_logprob, alone.actual_logprob, atol=1e-5)
        # log-sum-exp normalisation: top-k probabilities sum to at most 1, sorted descending
        assert (np.exp(t.topk_logprobs).sum(1) <= 1 + 1e-5).all()
        assert (np.diff(t.topk_logprobs, axis=1) <= 1e-6).all()


def test_auto_dtype_rules():
    assert resolve_dtype(None, on_gpu=False, inhouse=True) == torch.float32
    assert resolve_dtype("float16", on_gpu=False, inhouse=False) == torch.float16
    assert resolve_dtype(None, on_gpu=False, inhouse=False) in (torch.float32, torch.bfloat16)

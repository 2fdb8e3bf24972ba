"""Defaults of `distill pack` (shared by the packer, distill/pack.py, and its light CLI, distill/pack_cli.py)."""

DEFAULT_BUDGET_BYTES = 16_000_000
DEFAULT_MIN_QUANT_NUMEL = 4096  # smaller 2-D tensors (control/skip weights) stay fp16: scales would dominate
EMBED_NAMES = ("tok_emb.weight", "lm_head.weight")
AUTO_BITS = (8, 6, 5, 4)
# Rate-aware packing below 8 bits: per tensor, the clip/step minimizing distortion + lambda * estimated bits.
# Distortion "fisher" (training tokens available: --calib, else the checkpoint's data.train_shards):
# sum(F * dW^2) with F the per-window empirical Fisher diagonal, in loss units; lambda = loss paid per bit.
# Measured on an uncontended demo KD student (592k params, seq_len 256, 2026-12-01), --bits 6: 2.5e-10 -> 0.550
# B/param at +0.005 bpb (RTN); 6e-10 -> 0.466 at +0.009 (RTN), 0.476 at +0.006 (GPTQ, the auto method).
DEFAULT_RD_LAMBDA_FISHER = 6e-10
# Distortion "nsr" (no training tokens): numel * noise-to-signal ratio per tensor, the tied embedding/head
# weighted EMBED_SENSITIVITY x (measured on the demo KD student: 30 best among 1/10/30/100/300; at
# lambda 0.02 -> 0.497 bytes/param at +0.010 bpb). At the optimum each tensor's NSR ~ lambda / (2 ln 2).
DEFAULT_RD_LAMBDA_NSR = 0.02
EMBED_SENSITIVITY = 30.0
SENS_MAX_TOKENS = 32_768  # Fisher windows: ~128 x 256 tokens, a few seconds on one CPU thread
RD_DISTORTIONS = ("auto", "fisher", "nsr")

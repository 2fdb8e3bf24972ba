"""The challenge's tokenizer-agnostic bits-per-byte, for any model that maps ids (B,T) -> logits (B,T,V).

val_bpb = Σ nll_nats / (ln 2 · Σ bytes), sums in float64 over every scored target.
Bytes of a target: the tokenizer's LUTs (the challenge), or, given `byte_counts` (the CaseOps records' per-token
original-byte sidecar, distill.shards), byte_counts[position of the target] — the original text's bytes.

Windows (openai/parameter-golf `eval_val`): the val stream is truncated to ((N−1)//L)·L + 1 tokens.
- default: non-overlapping windows of L inputs, each predicting the next L tokens;
- stride s: windows of L inputs starting every s tokens; the first window scores all of its L targets,
  every later one only the targets not scored before (its last s, or fewer for the final clamped window),
  so each target is scored exactly once with >= L−s tokens of context. stride == L equals the default.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from distill.errors import DistillError
from distill.tokenizer import ByteLUTs


def window_plan(n_tokens: int, seq_len: int, stride: int | None = None) -> list[tuple[int, int]]:
    """[(window_start, first_scored_offset)]: window w feeds tokens[ws:ws+L] and scores its targets
    (tokens[ws+1:ws+L+1]) from offset `first_scored_offset` on. Pure function, tested for coverage."""
    L = seq_len
    if L <= 0:
        raise DistillError(f"--seq-len: must be positive, got {L}")
    usable = ((n_tokens - 1) // L) * L + 1 if n_tokens > 0 else 0
    n_targets = usable - 1
    if n_targets <= 0:
        raise DistillError(f"validation stream has {n_tokens} tokens, fewer than seq_len + 1 = {L + 1}")
    s = L if stride is None else stride
    if not 0 < s <= L:
        raise DistillError(f"--stride: must be in [1, seq_len={L}], got {s}")
    plan, scored_until = [], 0  # targets [0, scored_until) are done (target t = token t+1)
    ws = 0
    while scored_until < n_targets:
        ws = min(ws, n_targets - L)  # clamp the final window inside the stream
        first = scored_until - ws
        plan.append((ws, first))
        scored_until = ws + L
        ws += s
    return plan


def _batches(plan, batch_size: int) -> Iterator[list[tuple[int, int]]]:
    for i in range(0, len(plan), batch_size):
        yield plan[i : i + batch_size]


@torch.no_grad()
def evaluate_bpb(model: torch.nn.Module, tokens: np.ndarray, luts: ByteLUTs, seq_len: int,
                 stride: int | None = None, batch_size: int = 8, device: str | torch.device = "cpu",
                 max_windows: int | None = None, autocast_dtype: torch.dtype | None = None,
                 progress: bool = False, byte_counts: np.ndarray | None = None) -> dict:
    """Score `tokens` (the concatenated val stream) -> {val_loss, val_bpb, tokens, bytes, windows}.
    `byte_counts` (one per token of `tokens`) replaces the LUT byte count when given."""
    tokens = np.asarray(tokens)
    if byte_counts is not None:
        byte_counts = np.asarray(byte_counts)
        if len(byte_counts) != len(tokens):
            raise DistillError(f"byte sidecar has {len(byte_counts)} entries for {len(tokens)} val tokens")
    plan = window_plan(len(tokens), seq_len, stride)
    if max_windows is not None:
        plan = plan[:max_windows]
    L = seq_len
    nll_sum, n_tok, n_bytes = 0.0, 0, 0
    was_training = model.training
    model.eval()
    pbar = None
    if progress:
        from tqdm import tqdm

        pbar = tqdm(total=len(plan), desc="score", unit="win", leave=False)
    device = torch.device(device)
    for batch in _batches(plan, batch_size):
        idx = np.stack([tokens[ws : ws + L + 1].astype(np.int64) for ws, _ in batch])  # (B, L+1)
        x = torch.from_numpy(idx[:, :-1]).to(device)
        y = torch.from_numpy(idx[:, 1:]).to(device)
        if autocast_dtype is not None and device.type == "cuda":
            with torch.autocast("cuda", dtype=autocast_dtype):
                logits = model(x)
        else:
            logits = model(x)
        nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
        nll = nll.view(len(batch), L).double().cpu().numpy()
        for row, (ws, first) in enumerate(batch):
            nll_sum += float(nll[row, first:].sum(dtype=np.float64))
            if byte_counts is not None:  # target t of window ws sits at stream position ws + 1 + t
                n_bytes += int(byte_counts[ws + 1 + first : ws + L + 1].sum(dtype=np.int64))
            else:
                prev, tgt = idx[row, first:-1], idx[row, first + 1 :]
                n_bytes += int(luts.target_bytes(prev, tgt).sum())
            n_tok += L - first
        if pbar is not None:
            pbar.update(len(batch))
    if pbar is not None:
        pbar.close()
    model.train(was_training)
    val_loss = nll_sum / n_tok
    return {
        "val_loss": val_loss,
        "val_bpb": nll_sum / (math.log(2) * n_bytes),
        "tokens": n_tok,
        "bytes": n_bytes,
        "windows": len(plan),
    }

"""A tiny Llama teacher with its own byte-level BPE tokenizer, for tests and CI.

`build_tiny_llama(out_dir, texts)` trains a byte-level BPE (the `tokenizers` library) on `texts`, then a
2-layer LlamaForCausalLM for a few hundred CPU steps on the same texts, and saves both with
`save_pretrained` (safetensors + tokenizer.json), so transformers and vLLM load the directory as is.

Why these shapes: head_dim 64 because vLLM's CPU attention refuses head_dim 16; float32 weights so the
transformers and vLLM backends can be compared to ~1e-4; a few hundred steps so the next-token
distributions are peaked (a near-uniform teacher would make any backend comparison meaningless).
Deterministic given `seed` (same machine, same library versions).

    python -m teachers.tiny_teacher OUT_DIR --texts docs.jsonl [--vocab-size 2048] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from distill.errors import DistillError
from distill.fsutil import write_json_atomic

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"

# The model family: small enough to train in well under a minute on 2 CPU cores.
DEFAULT_ARCH = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=1024,
)


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int):
    """A GPT-2-style byte-level BPE whose encoder prepends BOS (ids 0/1/2 = bos/eos/pad)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS_TOKEN, EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknowns
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    bos_id = tok.token_to_id(BOS_TOKEN)
    # trim_offsets=False keeps byte offsets exact (the cross-tokenizer projection relies on them)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
                                      special_tokens=[(BOS_TOKEN, bos_id)]),
    ])
    return tok


def _token_stream(tok, texts: Sequence[str]):
    """All texts encoded (BOS before each) and concatenated into one int64 tensor."""
    import torch

    ids: list[int] = []
    for enc in tok.encode_batch(list(texts)):
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.long)


def _train(model, stream, steps: int, seq_len: int, batch: int, lr: float, seed: int,
           max_seconds: float | None) -> list[float]:
    """AdamW with cosine decay on random windows of the stream; stops early at `max_seconds`."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    n_windows = stream.numel() - seq_len - 1
    if n_windows < 1:
        raise DistillError(f"texts: only {stream.numel()} tokens, need more than {seq_len + 1} to train")
    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        for g in opt.param_groups:  # short warm-up, then cosine to 10%
            warm = min(1.0, (step + 1) / 20)
            g["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        starts = torch.randint(0, n_windows, (batch,), generator=gen)
        x = torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()])
        out = model(input_ids=x[:, :-1], labels=x[:, :-1].clone())  # HF shifts labels itself
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(out.loss.detach()))
        if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
            break
    model.eval()
    return losses


def build_tiny_llama(out_dir: str | os.PathLike, texts: Sequence[str], vocab_size: int = 2048, seed: int = 0,
                     train_steps: int = 400, seq_len: int = 64, batch: int = 8, lr: float = 5e-3,
                     max_train_seconds: float | None = None) -> Path:
    """Build, train and save the tiny teacher into `out_dir`; return `out_dir`.

    Writes config.json + model.safetensors + generation_config.json (model) and tokenizer.json +
    tokenizer_config.json (tokenizer), plus tiny_teacher.json (how it was built, final train loss).
    `max_train_seconds` optionally caps wall-clock (training then stops early, and the result depends on
    the machine's speed: leave it None where determinism matters).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise DistillError(f"{out_dir}: no text to build the tiny teacher from")
    torch.manual_seed(seed)

    tok = train_bpe_tokenizer(texts, vocab_size)
    real_vocab = tok.get_vocab_size()
    stream = _token_stream(tok, texts)

    cfg = LlamaConfig(
        vocab_size=real_vocab,
        bos_token_id=tok.token_to_id(BOS_TOKEN),
        eos_token_id=tok.token_to_id(EOS_TOKEN),
        pad_token_id=tok.token_to_id(PAD_TOKEN),
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        **DEFAULT_ARCH,
    )
    cfg.dtype = "float32"  # vLLM's dtype="auto" reads this; fp32 keeps backends comparable
    model = LlamaForCausalLM(cfg)
    # one thread: on a shared 2-core machine two threads made each step ~8x slower, and a fixed thread
    # count keeps the float reductions (so the weights) identical from run to run
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        losses = _train(model, stream, train_steps, seq_len, batch, lr, seed, max_train_seconds)
    finally:
        torch.set_num_threads(threads)

    # save_pretrained writes several files: build them in a temporary sibling directory and rename it
    # into place, so a killed build never leaves a half-written teacher under `out_dir`
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp_dir, safe_serialization=True)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
                                       pad_token=PAD_TOKEN,
                                       model_max_length=DEFAULT_ARCH["max_position_embeddings"])
        fast.save_pretrained(tmp_dir)
        write_json_atomic(tmp_dir / "tiny_teacher.json", {
            "seed": seed, "vocab_size": real_vocab, "train_steps_done": len(losses),
            "train_tokens": int(stream.numel()),
            "final_train_loss": sum(losses[-10:]) / max(1, len(losses[-10:])), "arch": DEFAULT_ARCH,
        })
        tmp_dir.chmod(0o755)  # mkdtemp makes it private; a model directory should be readable
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m teachers.tiny_teacher", description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--texts", required=True, help="a .jsonl with {'text': ...} per line, or a .txt file")
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    p = Path(args.texts)
    if not p.is_file():
        print(f"distill: error: {p}: not found", file=sys.stderr)
        return 2
    if p.suffix == ".jsonl":
        texts = [json.loads(line)["text"] for line in p.read_text().splitlines() if line.strip()]
    else:
        texts = [t for t in p.read_text().split("\n\n") if t.strip()]
    try:
        out = build_tiny_llama(args.out_dir, texts, vocab_size=args.vocab_size, seed=args.seed,
                               train_steps=args.steps)
    except DistillError as e:
        print(f"distill: error: {e}", file=sys.stderr)
        return 2
    print(json.loads((out / "tiny_teacher.json").read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

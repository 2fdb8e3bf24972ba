"""Write tests/data/official_baseline.json: what the challenge's OWN baseline model (openai/parameter-golf
train_gpt.py, passed by path — never copied here) computes on a fixed, seeded state and batch, so that
tests/test_student.py can check our baseline config against it without the official code at test time.

    python scripts/golden_official_baseline.py --official /path/to/parameter-golf/train_gpt.py \
        --out tests/data/official_baseline.json

Stored: the full-size baseline's parameter names/shapes/count, and for a small config (3 x 64, vocab 97) the
loss and per-parameter gradient statistics (float64 sum, sum of squares, 4 sampled entries) of the official
model loaded with a seeded state_dict, on a seeded batch."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import zlib
from pathlib import Path

import torch

SMALL = dict(vocab_size=97, num_layers=3, model_dim=64, num_heads=4, num_kv_heads=2)
FULL = dict(vocab_size=1024, num_layers=9, model_dim=512, num_heads=8, num_kv_heads=4)


def seeded_state(names_shapes: list[tuple[str, list[int]]]) -> dict[str, torch.Tensor]:
    """A deterministic state_dict: N(0, 0.02²) per tensor, each from its own generator seeded by its name."""
    out = {}
    for name, shape in names_shapes:
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        out[name] = torch.randn(shape, generator=g, dtype=torch.float32) * 0.02
    return out


def seeded_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab, (2, 64), generator=g), torch.randint(0, vocab, (2, 64), generator=g)


def grad_stats(grads: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    out = {}
    for n, gr in grads.items():
        flat = gr.detach().double().reshape(-1)
        picks = [flat[i * (flat.numel() - 1) // 3].item() for i in range(4)]
        out[n] = [flat.sum().item(), flat.square().sum().item(), *picks]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", required=True, type=Path, help="the challenge's train_gpt.py")
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args()
    spec = importlib.util.spec_from_file_location("official_train_gpt", a.official)
    off = importlib.util.module_from_spec(spec)
    sys.modules["official_train_gpt"] = off
    spec.loader.exec_module(off)

    def build(c):  # the official constructor's positional arguments (baseline defaults)
        return off.GPT(c["vocab_size"], c["num_layers"], c["model_dim"], c["num_heads"], c["num_kv_heads"], 2, True,
                       0.005, 30.0, 1e4, 1.5)

    full = build(FULL)
    small = build(SMALL)
    names_shapes = [(n, list(t.shape)) for n, t in small.state_dict().items()]
    small.load_state_dict(seeded_state(names_shapes))
    ids, tg = seeded_batch(SMALL["vocab_size"])
    loss = small(ids, tg)
    loss.backward()
    golden = {"source": "openai/parameter-golf train_gpt.py (official baseline GPT)", "torch": torch.__version__,
              "full": {"config": FULL, "params": sum(p.numel() for p in full.parameters()),
                       "names_shapes": [(n, list(t.shape)) for n, t in full.state_dict().items()]},
              "small": {"config": SMALL, "names_shapes": names_shapes, "loss": loss.item(),
                        "grads": grad_stats({n: p.grad for n, p in small.named_parameters()})}}
    a.out.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {a.out}: loss {loss.item():.8f}, full params {golden['full']['params']:,}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

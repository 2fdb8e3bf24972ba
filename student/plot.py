"""train.png: training loss (and its CE / KD parts) and validation bpb against the step (matplotlib Agg)."""

from __future__ import annotations

import os
from pathlib import Path

from distill.fsutil import atomic_path


def plot_metrics(rows: list[dict], out_path: str | os.PathLike, title: str = "") -> Path | None:
    """Write the plot atomically; returns None when there is nothing to plot."""
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_bpb" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_bpb) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in train]
    ax_loss.plot(steps, [r["loss"] for r in train], lw=1, label="loss")
    for key in ("ce", "kd"):
        if any(key in r for r in train):
            ax_loss.plot([r["step"] for r in train if key in r], [r[key] for r in train if key in r], lw=0.8,
                         alpha=0.7, label=key)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("nats / token")
    ax_loss.set_title("training loss")
    ax_loss.legend()
    if evals:
        ax_bpb.plot([r["step"] for r in evals], [r["val_bpb"] for r in evals], "o-", label="val_bpb")
        ax_bpb.annotate(f"{evals[-1]['val_bpb']:.4f}", (evals[-1]["step"], evals[-1]["val_bpb"]))
        ax_bpb.legend()
    ax_bpb.set_xlabel("step")
    ax_bpb.set_ylabel("bits / byte")
    ax_bpb.set_title("validation bpb")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return out_path

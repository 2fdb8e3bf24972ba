"""Plot KD − CE bpb against passes over the training tokens from docs/kd_gain_vs_passes.json.

    python scripts/plot_kd_passes.py [docs/kd_gain_vs_passes.json] [docs/kd_gain_vs_passes.png]

The JSON holds what `distill bench kd --passes P` (and the 12-minute wall-clock command) measured, one entry
per (recipe, budget): {"recipe", "passes", "ce": [bpb per seed], "kd": [bpb per seed], "note"} (or "delta":
[KD − CE per seed] where only the differences were kept). "passes" is what
the runs saw (for a wall-clock run: its steps x batch tokens / train tokens, as bench kd reports it).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    src = Path(argv[0]) if argv else Path(__file__).resolve().parents[1] / "docs" / "kd_gain_vs_passes.json"
    dst = Path(argv[1]) if len(argv) > 1 else src.with_suffix(".png")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = json.loads(src.read_text())["entries"]
    fig, ax = plt.subplots(figsize=(8, 6.4))
    colours = {}
    for recipe in dict.fromkeys(e["recipe"] for e in entries):
        rows = sorted((e for e in entries if e["recipe"] == recipe), key=lambda e: e["passes"])
        colour = colours.setdefault(recipe, f"C{len(colours)}")
        xs, means = [], []
        for e in rows:
            deltas = e.get("delta") or [k - c for c, k in zip(e["ce"], e["kd"])]
            ax.scatter([e["passes"]] * len(deltas), deltas, color=colour, alpha=0.35, s=14)
            xs.append(e["passes"])
            means.append(statistics.fmean(deltas))
            ax.annotate(f"{means[-1]:+.4f} (n={len(deltas)})", (e["passes"], means[-1]), textcoords="offset points",
                        xytext=(6, 4 - 8 * ((len(colours) - 1) % 4)), fontsize=7, color=colour)
        ax.plot(xs, means, "o-", color=colour, label=recipe)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("passes over the training tokens (log scale)")
    ax.set_ylabel("KD − CE val bpb (lower = KD better)")
    ax.set_title("teacher → 4×128 sp1024 student, FineWeb sample200 (2-core CPU, side by side)", fontsize=9)
    # below the axes: the curves sit where a legend inside would go
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=1)
    fig.tight_layout()
    fig.savefig(dst, dpi=120)
    print(dst)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

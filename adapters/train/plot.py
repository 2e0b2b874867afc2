"""The PNG of a run: loss, routing entropy / broadcast rate, and per-expert load against the step."""

from __future__ import annotations

import sys
from pathlib import Path


def plot_curves(history: list[dict], path: Path, title: str = "") -> bool:
    """Write the curves; False (with a note on stderr) when matplotlib is not installed."""
    if not history:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; no curves.png", file=sys.stderr)
        return False
    steps = [h["step"] for h in history]
    style = {"marker": "." if len(steps) < 30 else None}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(steps, [h["loss"] for h in history], label="total", **style)
    axes[0].plot(steps, [h["lm"] for h in history], label="LM", **style)
    axes[0].set_title("loss")
    axes[1].plot(steps, [h["entropy"] for h in history], label="router entropy (normalised)", **style)
    axes[1].plot(steps, [h["broadcast"] for h in history], label="broadcast rate", **style)
    axes[1].set_title("routing")
    loads = [h["load"] for h in history]
    for e in range(len(loads[0]) if loads else 0):
        axes[2].plot(steps, [row[e] for row in loads], label=f"expert {e}", **style)
    axes[2].set_title("per-expert load (fraction of router-token pairs)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True

"""PNG of a replay: running satisfaction vs alpha and cumulative energy, one row per benchmark."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from edged.replay.runner import BenchmarkResult

SHOWN = ("messplus", "edged", "random", "random_constrained", "static_mix", "oracle")


def plot(results: Sequence[BenchmarkResult], path: str | Path) -> None:
    """Draw with matplotlib (the `plot` extra), imported here so replay runs without it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(11, 3.0 * len(results)), squeeze=False)
    for row, result in zip(axes, results, strict=True):
        s = result.summary
        for name in SHOWN:
            if name not in result.curves:
                continue
            curve = result.curves[name]
            row[0].plot(curve["satisfaction"], label=name, lw=1)
            row[1].plot(curve["energy_j"] / 1000.0, label=name, lw=1)
        row[0].axhline(s["alpha"], color="k", ls="--", lw=0.8)
        row[0].set_ylim(max(0.0, s["alpha"] - 0.25), min(1.0, s["alpha"] + 0.25))
        row[0].set_title(f"{s['benchmark']}: running satisfaction (alpha {s['alpha']})")
        row[1].set_title(f"{s['benchmark']}: cumulative energy (kJ)")
        row[1].set_yscale("log")
        for ax in row:
            ax.set_xlabel("request")
    axes[0][1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)

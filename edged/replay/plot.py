"""PNG of a replay: running satisfaction vs alpha and running joules per request, one row per
benchmark (or mixed stream) and alpha, one legend for the figure."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edged.replay.runner import BenchmarkResult

SHOWN = ("random", "random_constrained", "messplus", "static_mix", "task_mix", "oracle", "edged")

#: tab10 colours and distinct dashes, so curves that coincide (random and random_constrained
#: when uniform routing already meets alpha; static_mix and task_mix on one benchmark) both show;
#: edged thick and on top, since it is the one the figure is about.
STYLE: dict[str, dict[str, Any]] = {
    "random": {"color": "tab:gray", "ls": (0, (6, 3)), "lw": 1.3, "zorder": 2},
    "random_constrained": {"color": "tab:brown", "ls": (3, (2, 4)), "lw": 1.6, "zorder": 3},
    "messplus": {"color": "tab:blue", "ls": "-", "lw": 1.4, "zorder": 4},
    "static_mix": {"color": "tab:green", "ls": (0, (8, 2, 2, 2)), "lw": 1.5, "zorder": 5},
    "task_mix": {"color": "tab:purple", "ls": (0, (3, 3)), "lw": 1.5, "zorder": 6},
    "oracle": {"color": "tab:orange", "ls": (0, (1, 1.5)), "lw": 1.8, "zorder": 7},
    "edged": {"color": "tab:red", "ls": "-", "lw": 2.8, "zorder": 10},
}


def _limits(curves: list[np.ndarray], extra: Sequence[float] = (), pad: float = 0.08,
            floor: float | None = None) -> tuple[float, float]:
    """Y range of the curves after their first 5% (the first requests' running means swing
    wildly and would flatten everything else)."""
    values = [c[max(1, c.size // 20):] for c in curves if c.size]
    low = min([float(v.min()) for v in values if v.size] + list(extra))
    high = max([float(v.max()) for v in values if v.size] + list(extra))
    span = max(high - low, 1e-3)
    low, high = low - pad * span, high + pad * span
    return (max(low, floor) if floor is not None else low), high


def plot(results: Sequence[BenchmarkResult], path: str | Path) -> None:
    """Draw with matplotlib (the `plot` extra), imported here so replay runs without it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(results)
    fig, axes = plt.subplots(rows, 2, figsize=(12, 3.1 * rows + 0.7), squeeze=False)
    handles: dict[str, Any] = {}
    for r, (row, result) in enumerate(zip(axes, results, strict=True)):
        s = result.summary
        alpha = s["alpha"]
        shown = [name for name in SHOWN if name in result.curves]
        for name in shown:
            curve = result.curves[name]
            x = np.arange(1, curve["satisfaction"].size + 1)
            (line,) = row[0].plot(x, curve["satisfaction"], label=name, **STYLE[name])
            row[1].plot(x, curve["energy_j"], label=name, **STYLE[name])
            handles.setdefault(name, line)
        sat_low, sat_high = _limits([result.curves[n]["satisfaction"] for n in shown], [alpha],
                                    floor=0.0)
        row[0].set_ylim(sat_low, min(sat_high, 1.0 + 1e-3))
        target = row[0].axhline(alpha, color="black", ls="--", lw=1.0, zorder=1)
        handles.setdefault("alpha (SLA target)", target)
        row[0].annotate(f"alpha {alpha:g}", xy=(0.0, alpha), xycoords=("axes fraction", "data"),
                        xytext=(4, -3), textcoords="offset points", ha="left", va="top",
                        fontsize=8, zorder=20,
                        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none"})
        row[1].set_ylim(*_limits([result.curves[n]["energy_j"] for n in shown], [0.0],
                                 floor=0.0))
        kinds = s.get("benchmarks", {})
        what = s["benchmark"] + (f" ({len(kinds)} benchmarks interleaved)" if len(kinds) > 1
                                 else "")
        row[0].set_title(f"{what}, alpha {alpha:g}: satisfaction", fontsize=10)
        row[1].set_title(f"{what}, alpha {alpha:g}: energy", fontsize=10)
        row[0].set_ylabel("satisfaction\n(running mean)")
        row[1].set_ylabel("energy (J per request,\nrunning mean)")
        for ax in row:
            ax.set_xlim(1, s["requests"])
            ax.grid(alpha=0.3, lw=0.5)
        for ax in row if r == rows - 1 else ():
            ax.set_xlabel("requests served")
    legend_in = 0.4
    fig.legend(list(handles.values()), list(handles), loc="upper center", ncol=len(handles),
               frameon=False, fontsize=9, handlelength=3.5, columnspacing=1.2)
    fig.tight_layout(rect=(0, 0, 1, 1 - legend_in / fig.get_figheight()))
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""The report's scatter figure (EMID against its bound), drawn with matplotlib's Agg canvas in this process.

matplotlib is imported on the first figure only (no pyplot, no global backend). A helper process that imported
matplotlib in parallel used to draw it: on the warm full-size ``benchmarks/bench_score.py`` (2 CPUs under
load, 2026-12-06, alternating runs) it shortened the reports step by 0.44-0.53 s but its own start-up slowed
the rest by ~0.25 s, a net 0.2-0.3 s of a ~5.4 s warm run (4-6 %, under the 10 % that would keep it), so it
was removed. The PNG is byte-identical either way (same code, same matplotlib)."""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["KIND_COLOURS", "MATPLOTLIB_MODULES", "ScatterFigure", "draw"]

MATPLOTLIB_MODULES = ("matplotlib.figure", "matplotlib.backends.backend_agg")  # what :func:`draw` imports

KIND_COLOURS = {"visual": "tab:blue", "text": "tab:orange", "joint": "tab:red", "ood": "tab:grey"}


@dataclass(frozen=True)
class ScatterFigure:
    """What the figure shows: one point per shifted task (bound, EMID, shift kind), coloured by kind, with a
    least-squares line when the bounds differ; the title and axis labels as given."""

    bounds: tuple[float, ...]
    emids: tuple[float, ...]
    kinds: tuple[str, ...]
    title: str
    xlabel: str
    ylabel: str
    empty_text: str = "no OOD task with EMID and bound"


def draw(figure: ScatterFigure, path: str | os.PathLike[str]) -> None:
    """Write ``figure`` as a PNG to ``path`` (an Agg canvas, no pyplot: no global backend, thread-safe)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for kind, colour in KIND_COLOURS.items():
        pts = [(x, y) for x, y, k in zip(figure.bounds, figure.emids, figure.kinds, strict=True) if k == kind]
        if pts:
            ax.scatter([x for x, _ in pts], [y for _, y in pts], c=colour, label=kind, s=28, alpha=0.85)
    if len(figure.bounds) >= 2 and len(set(figure.bounds)) >= 2:
        x, y = np.array(figure.bounds), np.array(figure.emids)
        slope, intercept = np.polyfit(x, y, 1)
        xs = np.linspace(x.min(), x.max(), 50)
        ax.plot(xs, slope * xs + intercept, color="black", lw=1.2, label=f"least squares (slope {slope:.3g})")
    ax.set_title(figure.title, fontsize=10)
    ax.set_xlabel(figure.xlabel)
    ax.set_ylabel(figure.ylabel, fontsize=9)
    ax.axhline(0.0, color="grey", lw=0.6, ls=":")
    ax.grid(alpha=0.3)
    if figure.bounds:
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, figure.empty_text, ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    # tight_layout leaves a placeholder layout engine, which makes savefig lay out (draw) the figure once more
    # before drawing it; the layout is final, so drop the engine: same PNG, one draw fewer (~30 ms)
    fig.set_layout_engine(None)
    fig.savefig(path, format="png")

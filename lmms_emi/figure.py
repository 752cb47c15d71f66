"""The report's scatter figure (EMID against its bound), drawn here or by a helper process.

Importing matplotlib takes about a third of a second, a tenth of a warm ``lmms-emi score`` of the whole
synthetic benchmark. A command that will write figures starts a :class:`FigureWorker` first: a child process
(``python -m lmms_emi.figure``) that imports matplotlib on the other core while the run reads, embeds and
analyses, then draws each figure it is sent. Where there is no second core, the child cannot start, fails or
dies, the figure is drawn in this process instead: the file is the same either way (same code, same
matplotlib), and the run never depends on the helper.

Nothing here imports torch or the rest of lmms-emi: the helper starts light.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["KIND_COLOURS", "FigureWorker", "ScatterFigure", "draw"]

KIND_COLOURS = {"visual": "tab:blue", "text": "tab:orange", "joint": "tab:red", "ood": "tab:grey"}
REPLY_TIMEOUT_S = 120.0  # a figure takes a tenth of a second; past this the helper is taken for stuck


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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ScatterFigure:
        tuples = {k: tuple(data[k]) for k in ("bounds", "emids", "kinds")}
        return cls(**{**data, **tuples})


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
    fig.savefig(path, format="png")


def _second_core() -> bool:
    try:
        return len(os.sched_getaffinity(0)) > 1
    except AttributeError:  # not Linux
        return (os.cpu_count() or 1) > 1


class FigureWorker:
    """A helper process that draws figures (see the module docstring); use as a context manager around a
    run. :meth:`draw` returns once the file is written, by the helper or, failing that, here. ``start``:
    None starts the helper where it can overlap this process's work (POSIX, a second core), True wherever
    it can run (POSIX), False never."""

    def __init__(self, *, start: bool | None = None) -> None:
        self._proc: subprocess.Popen[str] | None = None
        self.drawn_by_helper = 0  # figures the helper drew (the rest were drawn in this process)
        if os.name == "posix" and (start or (start is None and _second_core())):
            try:
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "lmms_emi.figure"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                )
            except OSError:
                self._proc = None

    def draw(self, figure: ScatterFigure, path: str | os.PathLike[str]) -> None:
        if self._proc is not None and self._ask(figure, Path(path)):
            self.drawn_by_helper += 1
            return
        draw(figure, path)

    def _ask(self, figure: ScatterFigure, path: Path) -> bool:
        """Send one figure; True when the helper says it wrote it. Any trouble ends the helper."""
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps({"path": str(path), "figure": figure.to_json()}) + "\n")
            proc.stdin.flush()
            ready, _, _ = select.select([proc.stdout], [], [], REPLY_TIMEOUT_S)
            reply = proc.stdout.readline() if ready else ""
        except (OSError, ValueError):
            reply = ""
        if reply.strip() == "ok":
            return True
        self.close()
        return False

    def close(self) -> None:
        """End the helper at once: every figure it answered for is written and closed, and one that is
        still importing matplotlib (a run that failed early) has nothing left to do."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for stream in (proc.stdin, proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        proc.kill()
        proc.wait()

    def __enter__(self) -> FigureWorker:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _serve() -> None:
    """The helper's loop: import matplotlib at once, then draw each figure of a JSON line on stdin, answering
    ``ok`` or ``error: ...`` on stdout (only once the file is written and closed); exit when stdin closes."""
    import matplotlib.figure  # noqa: F401 - the import is the point: it overlaps the parent's work
    from matplotlib.backends import backend_agg  # noqa: F401

    for line in sys.stdin:
        try:
            job = json.loads(line)
            draw(ScatterFigure.from_json(job["figure"]), job["path"])
            reply = "ok"
        except Exception as exc:  # reported to the parent, which then draws the figure itself
            reply = f"error: {type(exc).__name__}: {exc}".replace("\n", " ")
        sys.stdout.write(reply + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve()

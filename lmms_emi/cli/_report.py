"""The common end of ``score`` and ``analyze``: the one pipeline, the reports, the printed headlines."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lmms_emi._io import ensure_writable_dir
from lmms_emi.embed import Embedder
from lmms_emi.errors import EXIT_OK, UsageError
from lmms_emi.figure import FigureWorker
from lmms_emi.pipeline.agreement import JudgeRun
from lmms_emi.pipeline.estimator import EstimatorPolicy
from lmms_emi.pipeline.records import Sample
from lmms_emi.pipeline.run import analyze_run, check_sizes
from lmms_emi.pipeline.shift import AnalysisSettings
from lmms_emi.report import format_headlines, write_run_reports

__all__ = ["check_output_dir", "check_sizes", "finish"]


def check_output_dir(path: str | Path, option: str = "--output-path") -> Path:
    """Create the report folder and prove it writable, before any data is loaded or embedded."""
    try:
        return ensure_writable_dir(Path(path).expanduser())
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UsageError(
            f"{option} {path}: cannot write reports there ({reason}); choose another folder"
        ) from None


def finish(
    ns: argparse.Namespace,
    samples: Mapping[str, Sequence[Sample]],
    embedder: Embedder,
    policy: EstimatorPolicy,
    settings: AnalysisSettings,
    metadata: Mapping[str, Any],
    out_dir: Path,
    judge: JudgeRun | None = None,
    figures: FigureWorker | None = None,
) -> int:
    """Run the pipeline on ``samples`` (with the judge step when ``judge`` is given), write the run's reports
    into ``out_dir`` (figures by ``figures``, the command's figure helper, when given) and print the
    headlines."""
    check_output_dir(out_dir)  # before the embedding, not after it
    run = analyze_run(
        samples, embedder=embedder, policy=policy, settings=settings, metadata=metadata, judge=judge
    )
    written = write_run_reports(run, out_dir, figures=figures)
    for line in format_headlines(run):
        print(line)
    for name, paths in written.items():
        if name != "run":
            print(f"reports: {', '.join(str(p) for p in paths.values())}")
    for message in run.warnings:
        print(f"lmms-emi: warning: {message}", file=sys.stderr)
    if run.estimator.comparability == "run":
        print(f"lmms-emi: note: {run.estimator.note}", file=sys.stderr)
    return EXIT_OK

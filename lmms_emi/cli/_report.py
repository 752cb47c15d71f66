"""The common end of ``score`` and ``analyze``: the one pipeline, the reports, the printed headlines."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lmms_emi.errors import EXIT_OK
from lmms_emi.pipeline.agreement import JudgeRun
from lmms_emi.pipeline.preflight import Ready
from lmms_emi.pipeline.records import Sample
from lmms_emi.pipeline.run import analyze_run, check_sizes
from lmms_emi.report import format_headlines, write_run_reports

__all__ = ["check_sizes", "finish"]


def finish(
    ready: Ready,
    samples: Mapping[str, Sequence[Sample]],
    metadata: Mapping[str, Any],
    out_dir: Path,
    judge: JudgeRun | None = None,
    shift_kinds: Mapping[str, str] | None = None,
) -> int:
    """Run the pipeline on ``samples`` with what the preflight built (and the judge step when ``judge`` is
    given), write the run's reports into ``out_dir`` (checked by the preflight) and print the headlines."""
    run = analyze_run(
        samples,
        embedder=ready.embedder,
        policy=ready.policy,
        settings=ready.settings,
        metadata=metadata,
        estimator=ready.estimator,
        judge=judge,
        shift_kinds=shift_kinds,
    )
    written = write_run_reports(run, out_dir)
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

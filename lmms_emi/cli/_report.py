"""The common end of ``score`` and ``analyze``: the one pipeline, the reports, the printed headlines."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lmms_emi.embed import Embedder
from lmms_emi.errors import EXIT_OK
from lmms_emi.pipeline.estimator import EstimatorPolicy
from lmms_emi.pipeline.records import Sample
from lmms_emi.pipeline.run import analyze_run, check_sizes
from lmms_emi.pipeline.shift import AnalysisSettings
from lmms_emi.report import format_headlines, write_run_reports

__all__ = ["check_sizes", "finish"]


def finish(
    ns: argparse.Namespace,
    samples: Mapping[str, Sequence[Sample]],
    embedder: Embedder,
    policy: EstimatorPolicy,
    settings: AnalysisSettings,
    metadata: Mapping[str, Any],
    out_dir: Path,
) -> int:
    """Run the pipeline on ``samples``, write the run's reports into ``out_dir`` and print the headlines."""
    run = analyze_run(samples, embedder=embedder, policy=policy, settings=settings, metadata=metadata)
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

"""``lmms-emi analyze``: the report of a finished lmms-eval run, from its ``--log_samples`` output."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lmms_emi.cli._commands import subcommand_parser
from lmms_emi.cli._options import add_emi_options, add_output_options, config_from
from lmms_emi.metrics import RECORD_METRIC

if TYPE_CHECKING:  # imported where used: `analyze --help` starts without torch
    from lmms_emi.pipeline.preflight import Ready

NAME = "analyze"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subcommand_parser(
        sub,
        NAME,
        ". Post-hoc report of an lmms-eval run: the per-sample records stored under the metric key "
        "of *_samples_<task>.jsonl plus the images read back from each task's dataset (as configured in the "
        "results JSON, or --dataset). Judge scores of lmms-eval's llava-bench style metrics in the same logs "
        "(gpt_eval_llava_*) give win rates and their agreement with EMI; --judge scores the rest.",
    )
    p.add_argument("run_dir", help="lmms-eval --output_path folder (holding *_samples_<task>.jsonl)")
    p.add_argument("--metric", default=RECORD_METRIC, help="metric key holding the per-sample records")
    p.add_argument("--model", help="model name for the report")
    p.add_argument("--dataset", help="local copy of the data the run used (default: the run's task configs)")
    add_output_options(p, required=False, help="report folder (default: RUN_DIR/emi_report)")
    add_emi_options(p, ("encoders", "estimator", "analysis", "judge", "display"))
    return p


def run(ns: argparse.Namespace) -> int:
    from lmms_emi.config import OPTIONS_VAR, EMIConfig
    from lmms_emi.pipeline.preflight import preflight
    from lmms_emi.sources.run_folder import recorded_options

    recorded = recorded_options(ns.run_dir)  # the run's own analysis options: the defaults here
    base = None if recorded is None else EMIConfig.from_sources(environ={OPTIONS_VAR: json.dumps(recorded)})
    config = config_from(ns, base=base)
    out = Path(ns.output_path) if ns.output_path else Path(ns.run_dir) / "emi_report"
    ready = preflight(
        config, outputs={"--output-path": out}, inputs={"RUN_DIR": ns.run_dir}, token_logprobs=False
    )
    return _run(ns, ready, out)


def _run(ns: argparse.Namespace, ready: Ready, out: Path) -> int:
    from lmms_emi.cli._report import check_sizes, finish
    from lmms_emi.pipeline.agreement import JudgeRun
    from lmms_emi.scenarios import shift_kinds_of
    from lmms_emi.sources.run_folder import read_run

    progress = ready.config.progress
    records = read_run(ns.run_dir, metric=ns.metric)
    check_sizes({task: len(rows) for task, rows in records.records.items()})
    judge: JudgeRun | None = None
    if ready.judge is not None or records.judgments:
        # verdicts in the run's own log (lmms-eval's llava-bench judge) first; --judge scores the rest
        judge = JudgeRun(ready.judge, dict(records.judgments), progress=progress)
    for note in records.warnings:
        print(f"lmms-emi: warning: {note}", file=sys.stderr)
    samples = records.samples(dataset=ns.dataset, progress=progress)
    metadata = {
        "model": ns.model or records.model,
        "run_dir": str(ns.run_dir),
        "results_file": records.results_file,
    }
    kinds = shift_kinds_of(records.configs)  # the user's own shift family: its YAMLs say each task's kind
    return finish(ready, samples, metadata, out, judge=judge, shift_kinds=kinds)

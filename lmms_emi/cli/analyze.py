"""``lmms-emi analyze``: the report of a finished lmms-eval run, from its ``--log_samples`` output."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmms_emi.cli._commands import COMMANDS
from lmms_emi.cli._options import (
    HelpFormatter,
    add_analysis_options,
    add_encoder_options,
    add_estimator_options,
    add_judge_options,
    add_output_options,
    build_embedder,
    judge_config_from,
    policy_from,
    settings_from,
)
from lmms_emi.cli._report import check_sizes, finish
from lmms_emi.figure import FigureWorker
from lmms_emi.judge import Judge
from lmms_emi.metrics import RECORD_METRIC
from lmms_emi.pipeline.agreement import JudgeRun
from lmms_emi.sources.run_folder import read_run

NAME = "analyze"
HELP = COMMANDS[NAME].help


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        NAME,
        formatter_class=HelpFormatter,
        help=HELP,
        description="Post-hoc report of an lmms-eval run: the per-sample records stored under the metric key "
        "of *_samples_<task>.jsonl plus the images read back from each task's dataset (as configured in the "
        "results JSON, or --dataset). Judge scores of lmms-eval's llava-bench style metrics in the same logs "
        "(gpt_eval_llava_*) give win rates and their agreement with EMI; --judge scores the rest.",
    )
    p.add_argument("run_dir", help="lmms-eval --output_path folder (holding *_samples_<task>.jsonl)")
    p.add_argument("--metric", default=RECORD_METRIC, help="metric key holding the per-sample records")
    p.add_argument("--model", help="model name for the report")
    p.add_argument("--dataset", help="local copy of the data the run used (default: the run's task configs)")
    add_encoder_options(p)
    add_estimator_options(p)
    add_analysis_options(p)
    add_judge_options(p)
    add_output_options(p, required=False, help="report folder (default: RUN_DIR/emi_report)")
    return p


def run(ns: argparse.Namespace) -> int:
    with FigureWorker() as figures:  # matplotlib loads in a helper process while the run works
        return _run(ns, figures)


def _run(ns: argparse.Namespace, figures: FigureWorker) -> int:
    records = read_run(ns.run_dir, metric=ns.metric)
    check_sizes({task: len(rows) for task, rows in records.records.items()})
    policy, settings = policy_from(ns), settings_from(ns)
    policy.check(None)  # an unreadable checkpoint fails before the images load
    judge_config = judge_config_from(ns)
    judge: JudgeRun | None = None
    if judge_config is not None or records.judgments:
        # verdicts in the run's own log (lmms-eval's llava-bench judge) first; --judge scores the rest
        client = None if judge_config is None else Judge(judge_config)
        if client is not None:
            client.check()  # one line now, before the images load and the encoders run
        judge = JudgeRun(client, dict(records.judgments), progress=not ns.quiet)
    for note in records.warnings:
        print(f"lmms-emi: warning: {note}", file=sys.stderr)
    samples = records.samples(dataset=ns.dataset, progress=not ns.quiet)
    embedder = build_embedder(ns)  # reads the encoders' configs only: no weights yet
    policy.check(embedder.encoder_spec())  # a checkpoint for other encoders fails before any embedding
    metadata = {
        "model": ns.model or records.model,
        "run_dir": str(ns.run_dir),
        "results_file": records.results_file,
    }
    out = Path(ns.output_path) if ns.output_path else Path(ns.run_dir) / "emi_report"
    return finish(ns, samples, embedder, policy, settings, metadata, out, judge=judge, figures=figures)

"""``lmms-emi score``: EMI / EMID / bounds from saved response files against a dataset."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmms_emi import scenarios as sc
from lmms_emi.cli._commands import COMMANDS
from lmms_emi.cli._options import (
    HelpFormatter,
    add_analysis_options,
    add_encoder_options,
    add_estimator_options,
    add_judge_options,
    add_option,
    add_output_options,
    build_embedder,
    judge_config_from,
    policy_from,
    settings_from,
)
from lmms_emi.cli._report import check_output_dir, check_sizes, finish
from lmms_emi.errors import UsageError
from lmms_emi.figure import FigureWorker
from lmms_emi.judge import Judge
from lmms_emi.pipeline.agreement import JudgeRun
from lmms_emi.sources.datasets import ColumnNames, load_splits, local_dataset
from lmms_emi.sources.response_files import collect_samples, only_model

NAME = "score"
HELP = COMMANDS[NAME].help


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, formatter_class=HelpFormatter, help=HELP, description=HELP)
    p.add_argument(
        "--dataset",
        help="hub id or local path (save_to_disk folder or parquet files); default: the benchmark's hub "
        "dataset",
    )
    p.add_argument("--responses", required=True, help="folder of <scenario>_<model>.jsonl files")
    p.add_argument("--model", help="model name in the file names (default: the only one present)")
    p.add_argument("--benchmark", choices=sc.BENCHMARKS, default="synthetic")
    p.add_argument("--scenarios", nargs="+", help="subset of scenarios (split or task names; commas allowed)")
    add_option(p, "--question-column", help="dataset column of the text query")
    add_option(p, "--reference-column", help="dataset column of the reference answer")
    add_option(p, "--image-column", help="dataset column of the image")
    add_encoder_options(p)
    add_estimator_options(p)
    add_analysis_options(p)
    add_output_options(p, required=True, help="report folder")
    add_judge_options(p)
    return p


def _scenarios(ns: argparse.Namespace) -> list[sc.Scenario]:
    """The scenarios to score: those named (plus the ID scenario EMID is measured against), else every
    scenario a local dataset copy holds, else all."""
    chosen = sc.select_scenarios(ns.benchmark, ns.scenarios)
    id_scen = sc.id_scenario(ns.benchmark)
    if ns.scenarios and id_scen not in chosen:
        print(
            f"lmms-emi: adding the ID scenario {id_scen.split} (EMID is measured against it)", file=sys.stderr
        )
        chosen.insert(0, id_scen)
    if not ns.scenarios and ns.dataset and Path(ns.dataset).expanduser().exists():
        available = set(local_dataset(ns.dataset, option="--dataset").splits)
        present = [s for s in chosen if s.split in available]
        if id_scen not in present:
            raise UsageError(
                f"dataset {ns.dataset} has no split {id_scen.split!r} (the ID scenario EMID needs)"
            )
        if len(present) < len(chosen):
            print(
                f"lmms-emi: {ns.dataset} holds {len(present)} of the {len(chosen)} {ns.benchmark} scenarios; "
                "scoring those",
                file=sys.stderr,
            )
        chosen = present
    return chosen


def run(ns: argparse.Namespace) -> int:
    with FigureWorker() as figures:  # matplotlib loads in a helper process while the run works
        return _run(ns, figures)


def _run(ns: argparse.Namespace, figures: FigureWorker) -> int:
    check_output_dir(ns.output_path)  # an unusable report folder fails before any data loads
    scenarios = _scenarios(ns)
    if not Path(ns.responses).is_dir():
        raise UsageError(f"--responses {ns.responses}: no such folder")
    policy, settings = policy_from(ns), settings_from(ns)
    policy.check(None)  # an unreadable checkpoint fails before any data loads
    judge_config = judge_config_from(ns)
    judge = None
    if judge_config is not None:
        client = Judge(judge_config)
        client.check()  # an unreachable or misconfigured judge: one line, before any data loads
        judge = JudgeRun(client, {}, progress=not ns.quiet)
    splits = load_splits(ns.dataset, ns.benchmark, [s.split for s in scenarios])
    model = ns.model or only_model(ns.responses, [s.split for s in scenarios])
    columns = ColumnNames(ns.question_column, ns.reference_column, ns.image_column)
    samples = collect_samples(splits, scenarios, ns.responses, model, columns, progress=not ns.quiet)
    check_sizes({task: len(rows) for task, rows in samples.items()})
    embedder = build_embedder(ns)  # reads the encoders' configs only: no weights yet
    policy.check(embedder.encoder_spec())  # a checkpoint for other encoders fails before any embedding
    metadata = {
        "model": model,
        "benchmark": ns.benchmark,
        "dataset": ns.dataset or scenarios[0].dataset,
        "responses": str(ns.responses),
        "encoders": ns.encoders,
    }
    out = Path(ns.output_path)
    return finish(ns, samples, embedder, policy, settings, metadata, out, judge=judge, figures=figures)

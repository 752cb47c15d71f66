"""``lmms-emi score``: EMI / EMID / bounds from saved response files against a dataset."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lmms_emi import scenarios as sc
from lmms_emi.cli._commands import subcommand_parser
from lmms_emi.cli._options import add_emi_options, add_output_options, config_from
from lmms_emi.errors import UsageError

if TYPE_CHECKING:  # imported where used: `score --help` starts without torch
    from lmms_emi.pipeline.preflight import Ready

NAME = "score"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subcommand_parser(sub, NAME)
    p.add_argument(
        "--dataset",
        help="hub id or local path (save_to_disk folder or parquet files); default: the benchmark's hub "
        "dataset",
    )
    p.add_argument("--responses", required=True, help="folder of <scenario>_<model>.jsonl files")
    p.add_argument("--model", help="model name in the file names (default: the only one present)")
    p.add_argument("--benchmark", choices=sc.BENCHMARKS, default="synthetic")
    p.add_argument("--scenarios", nargs="+", help="subset of scenarios (split or task names; commas allowed)")
    for column, what in (
        ("question", "the text query"),
        ("reference", "the reference answer"),
        ("image", "the image"),
    ):
        p.add_argument(f"--{column}-column", f"--{column}_column", help=f"dataset column of {what}")
    add_output_options(p, required=True, help="report folder")
    add_emi_options(p, ("encoders", "estimator", "analysis", "judge", "display"))
    return p


def _named_scenarios(ns: argparse.Namespace) -> list[sc.Scenario]:
    """The scenarios named (plus the ID scenario EMID is measured against), else all: names only, checked
    before anything is read."""
    chosen = sc.select_scenarios(ns.benchmark, ns.scenarios)
    id_scen = sc.id_scenario(ns.benchmark)
    if ns.scenarios and id_scen not in chosen:
        print(
            f"lmms-emi: adding the ID scenario {id_scen.split} (EMID is measured against it)", file=sys.stderr
        )
        chosen.insert(0, id_scen)
    return chosen


def _present(ns: argparse.Namespace, chosen: list[sc.Scenario]) -> list[sc.Scenario]:
    """With no scenario named and a local dataset copy: the scenarios that copy holds."""
    if ns.scenarios or not ns.dataset or not Path(ns.dataset).expanduser().exists():
        return chosen
    from lmms_emi.sources.datasets import local_dataset

    id_scen = sc.id_scenario(ns.benchmark)
    available = set(local_dataset(ns.dataset, option="--dataset").splits)
    present = [s for s in chosen if s.split in available]
    if id_scen not in present:
        raise UsageError(f"dataset {ns.dataset} has no split {id_scen.split!r} (the ID scenario EMID needs)")
    if len(present) < len(chosen):
        print(
            f"lmms-emi: {ns.dataset} holds {len(present)} of the {len(chosen)} {ns.benchmark} scenarios; "
            "scoring those",
            file=sys.stderr,
        )
    return present


def run(ns: argparse.Namespace) -> int:
    from lmms_emi.pipeline.preflight import preflight

    config = config_from(ns)
    out = Path(ns.output_path)
    scenarios = _named_scenarios(ns)
    ready = preflight(config, outputs={"--output-path": out}, inputs={"--responses": ns.responses})
    return _run(ns, ready, _present(ns, scenarios), out)


def _run(ns: argparse.Namespace, ready: Ready, scenarios: list[sc.Scenario], out: Path) -> int:
    from lmms_emi.cli._report import check_sizes, finish
    from lmms_emi.pipeline.agreement import JudgeRun
    from lmms_emi.sources.datasets import ColumnNames, load_splits
    from lmms_emi.sources.response_files import collect_samples, only_model

    if not Path(ns.responses).is_dir():
        raise UsageError(f"--responses {ns.responses}: not a folder")
    progress = ready.config.progress
    judge = None if ready.judge is None else JudgeRun(ready.judge, {}, progress=progress)
    splits = load_splits(ns.dataset, ns.benchmark, [s.split for s in scenarios])
    model = ns.model or only_model(ns.responses, [s.split for s in scenarios])
    columns = ColumnNames(ns.question_column, ns.reference_column, ns.image_column)
    samples = collect_samples(splits, scenarios, ns.responses, model, columns, progress=progress)
    check_sizes({task: len(rows) for task, rows in samples.items()})
    metadata = {
        "model": model,
        "benchmark": ns.benchmark,
        "dataset": ns.dataset or scenarios[0].dataset,
        "responses": str(ns.responses),
        "encoders": ready.config.encoders,
    }
    if any((ns.question_column, ns.reference_column, ns.image_column)):  # so ablate can gather them again
        metadata["columns"] = {"question": ns.question_column, "reference": ns.reference_column}
        metadata["columns"]["image"] = ns.image_column
    return finish(ready, samples, metadata, out, judge=judge)

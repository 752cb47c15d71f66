"""The subcommands of ``lmms-emi``: name, module and one-line help, in the order ``lmms-emi --help`` lists
them. The top-level parser lists them from here; a subcommand's module, and what it imports (torch, scipy,
lmms-eval), is imported only when that subcommand runs or shows its own help."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from lmms_emi.figure import MATPLOTLIB_MODULES

__all__ = ["COMMANDS", "Command", "subcommand_parser"]


@dataclass(frozen=True)
class Command:
    """A subcommand: its module, its one-line help and the libraries its run loads (modules that
    ``lmms_emi.cli.load_libraries`` imports before the run: torch, scipy, matplotlib, ...)."""

    module: str
    help: str
    libraries: tuple[str, ...] = ()


# what score and analyze run on: the pipeline (torch, scipy), the report step and the report's figure
_PIPELINE_LIBRARIES = ("lmms_emi.pipeline.preflight", "lmms_emi.cli._report", *MATPLOTLIB_MODULES)


COMMANDS: dict[str, Command] = {
    "eval": Command(
        "lmms_emi.cli.eval",
        "run lmms-eval with the plugin's tasks (arguments go to lmms-eval; see `lmms-emi eval --help`)",
    ),
    "analyze": Command(
        "lmms_emi.cli.analyze",
        "report from an lmms-eval output folder written with --log_samples",
        _PIPELINE_LIBRARIES,
    ),
    "score": Command(
        "lmms_emi.cli.score",
        "EMI / EMID / bound from saved response files against a dataset",
        _PIPELINE_LIBRARIES,
    ),
    "train-estimator": Command(
        "lmms_emi.cli.train_estimator",
        "fit and freeze one CLUB estimator from the embeddings saved by score/analyze/eval runs",
    ),
    "make-shifts": Command(
        "lmms_emi.cli.make_shifts",
        "write the paper's shift family (imagecorruptions x nlpaug) of any benchmark",
    ),
    "demo-data": Command(
        "lmms_emi.cli.demo_data", "build the offline demo dataset and a demo model's responses"
    ),
    "leaderboard": Command(
        "lmms_emi.cli.leaderboard", "merge several models' / runs' results into one EMI leaderboard"
    ),
    "compare": Command(
        "lmms_emi.cli.compare",
        "is one run's EMI really higher than another's? a paired bootstrap over questions",
    ),
    "ablate": Command(
        "lmms_emi.cli.ablate", "EMI vs the judge per MI estimator x embedding space (paper Tables 4-5)"
    ),
    "tasks-path": Command(
        "lmms_emi.cli.tasks_path", "print the plugin's lmms-eval task folder (for lmms-eval --include_path)"
    ),
    "estimators": Command(
        "lmms_emi.cli.estimators",
        "list the registered pre-trained estimators (--estimator NAME) and where they are on this machine",
    ),
}


def subcommand_parser(
    sub: argparse._SubParsersAction, name: str, details: str = ""
) -> argparse.ArgumentParser:
    """The parser of subcommand ``name``: its one-line help from :data:`COMMANDS`, which its description
    repeats before ``details`` (e.g. ``". Each run is ..."``)."""
    help_line = COMMANDS[name].help
    return sub.add_parser(name, help=help_line, description=help_line + details)

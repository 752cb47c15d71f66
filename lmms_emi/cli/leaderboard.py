"""``lmms-emi leaderboard RUN_OR_RESULTS...``: merge several runs' results JSON into one table (Markdown on
stdout; Markdown, CSV, JSON and a PNG in ``--output-path``). Columns: ``docs/LEADERBOARD.md``."""

from __future__ import annotations

import argparse
import sys

from lmms_emi.cli._commands import COMMANDS
from lmms_emi.cli._options import HelpFormatter, add_option
from lmms_emi.errors import EXIT_OK
from lmms_emi.leaderboard import DEFAULT_SORT, build_leaderboard, write_leaderboard

NAME = "leaderboard"
HELP = COMMANDS[NAME].help


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        NAME,
        formatter_class=HelpFormatter,
        help=HELP,
        description=HELP
        + ": lmms-eval results JSON files (*_results.json) or folders holding them (searched recursively).",
    )
    p.add_argument("inputs", nargs="*", metavar="RUN_OR_RESULTS", help="results JSON files or run folders")
    add_option(p, "--output-path", default=None, help="write leaderboard.{md,csv,json,png} into this folder")
    p.add_argument(
        "--format",
        choices=["markdown", "csv", "json"],
        default="markdown",
        help="what is printed on stdout (default markdown)",
    )
    p.add_argument(
        "--sort",
        default=DEFAULT_SORT,
        help=f"column ranked on within each benchmark (default {DEFAULT_SORT}, lower is better)",
    )
    p.add_argument(
        "--force", action="store_true", help="show runs of different estimators / encoders anyway, flagged"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing files in --output-path")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def run(ns: argparse.Namespace) -> int:
    board = build_leaderboard(ns.inputs, force=ns.force, sort=ns.sort)
    if ns.output_path is not None:
        paths = write_leaderboard(board, ns.output_path, overwrite=ns.overwrite)
        print(f"lmms-emi leaderboard: wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    if not board.comparable:
        print("lmms-emi leaderboard: warning: runs are NOT comparable (shown with --force)", file=sys.stderr)
    sys.stdout.write(board.render(ns.format))
    return EXIT_OK

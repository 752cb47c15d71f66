"""``lmms-emi tasks-path``: print the folder of the plugin's lmms-eval task YAMLs, for ``--include_path``.

Plain ``lmms-eval`` finds the tasks without it once lmms-emi is installed (:mod:`lmms_emi.harness.hook`); this
serves ``--include_path`` users (the hook off, or another launcher). With ``--data``, a copy of the task tree
whose datasets point at local copies is written to ``--dest`` and that folder is printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmms_emi.cli._commands import subcommand_parser
from lmms_emi.errors import EXIT_OK, UsageError
from lmms_emi.harness.overrides import build_include_dir, parse_data_args
from lmms_emi.paths import tasks_dir

NAME = "tasks-path"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subcommand_parser(sub, NAME)
    p.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="[BENCHMARK=]PATH",
        help="local copy of a benchmark: write a task tree reading it to --dest and print that folder",
    )
    p.add_argument("--dest", help="where the task tree for --data goes (a new or reused folder)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def run(ns: argparse.Namespace) -> int:
    if not ns.data:
        print(tasks_dir())
        return EXIT_OK
    if not ns.dest:
        raise UsageError("--data needs --dest DIR (where the task tree reading the local copy goes)")
    dest = Path(ns.dest)
    dest.mkdir(parents=True, exist_ok=True)
    print(build_include_dir(dest, parse_data_args(ns.data), tasks_dir()))
    return EXIT_OK

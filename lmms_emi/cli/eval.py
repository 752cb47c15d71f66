"""``lmms-emi eval``: lmms-eval with the plugin's tasks and the EMI metric, end to end.

Every argument not listed here goes to lmms-eval unchanged (``--model``, ``--tasks``, ``--output_path``, ...).
"""

from __future__ import annotations

import argparse

from lmms_emi.cli._options import add_emi_options, config_from
from lmms_emi.config import EMIConfig
from lmms_emi.errors import EXIT_OK

NAME = "eval"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmms-emi eval",
        add_help=False,
        allow_abbrev=False,
        description="Run lmms-eval with the LLaVA-Bench shift tasks and the EMI metric. Arguments not listed "
        "here go to lmms-eval (see `lmms-eval eval --help`).",
    )
    # lmms-eval owns --device, --batch_size and --seed: no old spellings here
    add_emi_options(p, EMIConfig.GROUPS, old_flags=False, debug=False)  # --debug: read by lmms-emi itself
    p.add_argument(
        "--metrics", help="'emi': attach the EMI metric to the other (non-plugin) tasks of --tasks"
    )
    p.add_argument("-h", "--help", action="store_true", help="show this help")
    return p


def run(argv: list[str]) -> int:
    ns, lmms_args = build_parser().parse_known_args(argv)
    if ns.help:
        build_parser().print_help()
        print("\nEverything else is passed to lmms-eval; see `lmms-eval eval --help`.")
        return EXIT_OK
    config = config_from(ns)  # --judge-api-key goes to the run's processes through the environment
    from lmms_emi.harness.launch import run_eval  # lmms-eval and torch: only when a run starts

    return run_eval(config, lmms_args, metrics=ns.metrics)

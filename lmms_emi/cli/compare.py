"""``lmms-emi compare RUN_A RUN_B``: a paired bootstrap of two runs' EMI over the questions both answered
(:mod:`lmms_emi.leaderboard.paired`): the difference, its interval and whether it is significant."""

from __future__ import annotations

import argparse
import sys

from lmms_emi.cli._commands import subcommand_parser
from lmms_emi.cli._options import add_emi_options, config_from, require_club
from lmms_emi.errors import EXIT_OK

NAME = "compare"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subcommand_parser(
        sub,
        NAME,
        ". Each run is an lmms-eval results JSON (*_results.json) with its saved embeddings beside it. "
        "Both are scored with one estimator: the runs' own when it is the same by content, else the one "
        "given with --estimator (e.g. the leaderboard_club.safetensors that `lmms-emi leaderboard "
        "--common-estimator` saves).",
    )
    p.add_argument("run_a", metavar="RUN_A", help="results JSON of model A")
    p.add_argument("run_b", metavar="RUN_B", help="results JSON of model B")
    p.add_argument(
        "--format",
        choices=["markdown", "json"],
        default="markdown",
        help="what is printed (default markdown)",
    )
    p.add_argument(
        "--estimator",
        default=None,
        help="score both runs with this estimator (a checkpoint file or a registered name); default: the "
        "runs' own, when it is the same by content",
    )
    add_emi_options(
        p,
        ("estimator", "analysis", "display"),
        skip=("estimator", "estimator_steps", "estimator_patience", "entropy_scale"),
    )
    return p


def run(ns: argparse.Namespace) -> int:
    from lmms_emi.leaderboard.paired import compare_runs

    config = config_from(ns)
    require_club(config, "compare")
    result = compare_runs(
        ns.run_a,
        ns.run_b,
        estimator=ns.estimator,
        n_resamples=config.bootstrap,
        confidence_level=config.confidence,
        seed=config.seed,
    )
    sys.stdout.write(result.to_json() if ns.format == "json" else result.to_markdown())
    return EXIT_OK

"""``lmms-emi leaderboard RUN_OR_RESULTS...``: merge several runs' results JSON into one table (Markdown on
stdout; Markdown, CSV, JSON and a PNG in ``--output-path``); ``--common-estimator`` re-scores the runs with
one estimator fitted on all their saved embeddings first. Columns: ``docs/LEADERBOARD.md``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmms_emi._io import ensure_writable_dir
from lmms_emi.cli._commands import subcommand_parser
from lmms_emi.cli._options import add_emi_options, config_from, require_club
from lmms_emi.errors import EXIT_OK, UsageError
from lmms_emi.leaderboard import DEFAULT_SORT, build_leaderboard, write_leaderboard
from lmms_emi.leaderboard.render import check_targets

NAME = "leaderboard"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subcommand_parser(
        sub,
        NAME,
        ": lmms-eval results JSON files (*_results.json) or folders holding them (searched recursively; a "
        "results file there without EMI, e.g. of a killed run, is skipped with a note).",
    )
    p.add_argument("inputs", nargs="*", metavar="RUN_OR_RESULTS", help="results JSON files or run folders")
    p.add_argument(
        "--output-path",
        "--output_path",
        default=None,
        help="write leaderboard.{md,csv,json,png} into this folder",
    )
    p.add_argument(
        "--format",
        choices=["markdown", "csv", "json"],
        default="markdown",
        help="what is printed on stdout (default markdown)",
    )
    p.add_argument(
        "--sort",
        default=DEFAULT_SORT,
        help=f"column ranked on within each benchmark (default {DEFAULT_SORT}: EMI under shift, the "
        "headline; higher is better)",
    )
    p.add_argument(
        "--force", action="store_true", help="show runs of different estimators / encoders anyway, flagged"
    )
    p.add_argument(
        "--common-estimator",
        "--common_estimator",
        action="store_true",
        help="re-score every run with one estimator fitted on the pooled embeddings the runs saved (no "
        "encoder is loaded); the estimator is saved in --output-path (leaderboard_club.safetensors)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing files in --output-path")
    add_emi_options(p, ("estimator", "display"), skip=("estimator",))
    return p


def run(ns: argparse.Namespace) -> int:
    created: list[Path] = []  # folders this command made for --output-path: removed again if it fails
    if ns.output_path is not None:  # before any input is read (as the preflight's check_outputs; no torch)
        out = Path(ns.output_path).expanduser()
        created = [f for f in (out, *out.parents) if not f.exists()]
        try:
            ensure_writable_dir(out)
        except OSError as exc:
            _remove_empty(created)
            reason = exc.strerror or type(exc).__name__
            raise UsageError(f"--output-path {ns.output_path}: cannot write there ({reason})") from None
    try:
        return _run(ns)
    except BaseException:
        _remove_empty(created)  # a refusal writes nothing, not even the folder
        raise


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _run(ns: argparse.Namespace) -> int:
    common = None
    if ns.common_estimator:
        from lmms_emi.leaderboard.rescore import COMMON_ESTIMATOR_FILE, CommonEstimator

        if ns.output_path is None:
            raise UsageError(
                "--common-estimator needs --output-path (the estimator is saved beside the board)"
            )
        check_targets(Path(ns.output_path), [COMMON_ESTIMATOR_FILE], overwrite=ns.overwrite)  # before the fit
        config = config_from(ns)
        require_club(config, "--common-estimator")
        common = CommonEstimator(
            Path(ns.output_path),
            steps=config.estimator_steps,
            patience=config.estimator_patience or None,
            seed=config.seed,
            progress=config.progress,
        )
    board = build_leaderboard(ns.inputs, force=ns.force, sort=ns.sort, common_estimator=common)
    if ns.output_path is not None:
        extra = {common.path.name: common.file_bytes} if common is not None and common.file_bytes else None
        paths = write_leaderboard(board, ns.output_path, overwrite=ns.overwrite, extra=extra)
        print(f"lmms-emi leaderboard: wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    for note in board.notes:
        print(f"lmms-emi leaderboard: note: {note}", file=sys.stderr)
    if not board.comparable:
        print("lmms-emi leaderboard: warning: runs are NOT comparable (shown with --force)", file=sys.stderr)
    sys.stdout.write(board.render(ns.format))
    return EXIT_OK

"""``lmms-emi eval``: lmms-eval with the plugin's tasks and the EMI metric, end to end.

Every argument not listed here goes to lmms-eval unchanged (``--model``, ``--tasks``, ``--output_path``, ...).
"""

from __future__ import annotations

import argparse

from lmms_emi.cli._commands import COMMANDS
from lmms_emi.cli._options import (
    HelpFormatter,
    add_analysis_options,
    add_encoder_options,
    add_estimator_options,
    add_judge_options,
    add_option,
    cache_setting,
    export_judge_key,
)
from lmms_emi.errors import EXIT_OK
from lmms_emi.harness.launch import run_eval
from lmms_emi.harness.options import EMIOptions

NAME = "eval"
HELP = COMMANDS[NAME].help


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmms-emi eval",
        add_help=False,
        allow_abbrev=False,
        formatter_class=HelpFormatter,
        description="Run lmms-eval with the LLaVA-Bench shift tasks and the EMI metric. Arguments not listed "
        "here go to lmms-eval (see `lmms-eval eval --help`).",
    )
    add_encoder_options(p, legacy=False)
    add_estimator_options(p, legacy=False)
    add_analysis_options(p)
    add_judge_options(p)
    g = p.add_argument_group("run")
    g.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="[BENCHMARK=]PATH",
        help="local copy of a benchmark (save_to_disk folder or parquet files), instead of the hub",
    )
    g.add_argument(
        "--metrics", help="'emi': attach the EMI metric to the other (non-plugin) tasks of --tasks"
    )
    add_option(g, "--report-dir", help="where the EMI reports go (default: next to the results JSON)")
    add_option(
        g,
        "--emi-id-task",
        metavar="TASK",
        help="the in-distribution task of your own --metrics emi tasks: EMID and the bounds of the others "
        "are measured against it (added to --tasks when missing)",
    )
    add_option(
        g,
        "--no-builtin-tasks",
        action="store_true",
        help="index only the plugin's (and --include_path) tasks: ~15 s faster, built-in tasks unavailable",
    )
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    g.add_argument("-h", "--help", action="store_true", help="show this help")
    return p


def options_from(ns: argparse.Namespace) -> EMIOptions:
    """The run's EMI options (exported to every process of the run)."""
    return EMIOptions(
        profile=ns.encoders,
        vision=ns.vision_encoder,
        text=ns.text_encoder,
        text_layer=ns.text_layer,
        estimator=ns.estimator,
        entropy_scale=ns.entropy_scale,
        bootstrap=ns.bootstrap,
        confidence=ns.confidence,
        seed=ns.emi_seed,
        device=ns.emi_device,
        batch_size=ns.emi_batch_size,
        cache_dir=None if cache_setting(ns.emi_cache) is None else ns.emi_cache,
        train_steps=ns.estimator_steps,
        train_patience=ns.estimator_patience,
        report_dir=ns.report_dir,
        progress=not ns.quiet,
        id_task=ns.emi_id_task,
        judge=ns.judge,
        judge_model=ns.judge_model,
        judge_base_url=ns.judge_base_url,
        judge_concurrency=ns.judge_concurrency,
        judge_cache=ns.judge_cache,
        judge_timeout=ns.judge_timeout,
        judge_max_attempts=ns.judge_max_attempts,
    )


def run(argv: list[str]) -> int:
    ns, lmms_args = build_parser().parse_known_args(argv)
    if ns.help:
        build_parser().print_help()
        print("\nEverything else is passed to lmms-eval; see `lmms-eval eval --help`.")
        return EXIT_OK
    export_judge_key(ns)  # the key goes to the run's processes through the environment, not the options
    return run_eval(
        options_from(ns),
        lmms_args,
        data_args=ns.data,
        metrics=ns.metrics,
        builtin_tasks=not ns.no_builtin_tasks,
    )

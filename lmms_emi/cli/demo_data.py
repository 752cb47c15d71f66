"""``lmms-emi demo-data``: build the offline demo dataset and a demo model's responses."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmms_emi import scenarios as sc
from lmms_emi.cli._commands import COMMANDS
from lmms_emi.demo_data import DEMO_MODEL, build_demo_dataset, write_demo_responses
from lmms_emi.errors import EXIT_OK

NAME = "demo-data"
HELP = COMMANDS[NAME].help


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help=HELP, description=HELP)
    p.add_argument("dir", help="output folder (gets dataset/ and responses/)")
    p.add_argument("--benchmark", choices=sc.BENCHMARKS, default="synthetic")
    p.add_argument("--scenarios", nargs="+", help="subset of scenarios (split names; commas allowed)")
    p.add_argument("--n-images", "--n_images", type=int, default=6, help="photos per scenario")
    p.add_argument(
        "--questions-per-image", "--questions_per_image", type=int, default=2, help="questions per photo"
    )
    p.add_argument(
        "--model-name", "--model_name", default=DEMO_MODEL, help="the demo model's name in the response files"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def run(ns: argparse.Namespace) -> int:
    from lmms_emi.pipeline.preflight import check_outputs
    from lmms_emi.shifts.compat import check_installed

    out = Path(ns.dir)
    check_outputs({"DIR": out})  # before anything is built
    check_installed("demo-data")
    dataset_dir = build_demo_dataset(
        out / "dataset",
        benchmark=ns.benchmark,
        scenarios=[n for raw in ns.scenarios or [] for n in raw.split(",") if n] or None,
        n_images=ns.n_images,
        questions_per_image=ns.questions_per_image,
        seed=ns.seed,
    )
    files = write_demo_responses(dataset_dir, out / "responses", ns.model_name, ns.seed)
    print(f"dataset: {dataset_dir}")
    print(f"responses: {out / 'responses'} ({len(files)} files, model {ns.model_name!r})")
    print(
        f"try: lmms-emi score --dataset {dataset_dir} --responses {out / 'responses'} "
        f"--model {ns.model_name} "
        f"--benchmark {ns.benchmark} --encoders offline --output-path {out / 'report'}"
    )
    return EXIT_OK

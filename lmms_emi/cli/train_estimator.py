"""``lmms-emi train-estimator``: fit and freeze one CLUB estimator from the embeddings of earlier runs.

Each sample is pooled once (:mod:`lmms_emi.embed.pool`: a sample already pooled from an earlier file is
skipped by its content fingerprint), and what came from where is printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmms_emi.cli._commands import COMMANDS
from lmms_emi.cli._options import add_emi_options, add_output_options, config_from
from lmms_emi.errors import EXIT_OK

NAME = "train-estimator"
HELP = COMMANDS[NAME].help


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        NAME,
        help=HELP,
        description="Pools the (query, response) and (query, reference) pairs of every task of every run "
        "(all embedded with the same encoders), fits one CLUB and saves it with a manifest. Score every "
        "model of a leaderboard with this one checkpoint (--estimator) to make their EMI comparable.",
    )
    p.add_argument(
        "inputs",
        nargs="+",
        help="report folders, or the embeddings files in them (*emi_embeddings.safetensors)",
    )
    p.add_argument(
        "--hidden-size", "--hidden_size", type=int, default=500, help="hidden width of the CLUB networks"
    )
    add_output_options(p, required=True, help="checkpoint file (.safetensors) or folder")
    add_emi_options(p, ("estimator", "display"), skip=("estimator",))
    return p


def run(ns: argparse.Namespace) -> int:
    from lmms_emi.embed.pool import embedding_files, pool_embeddings
    from lmms_emi.pipeline.estimator import fit_pooled_estimator

    config = config_from(ns)
    pool = pool_embeddings(embedding_files(ns.inputs))
    for line in pool.log:
        print(line)
    pooled, spec = pool.tasks, pool.spec
    out = Path(ns.output_path)
    if out.suffix != ".safetensors":
        out = out / "club.safetensors" if out.is_dir() or not out.suffix else out.with_suffix(".safetensors")
    club = fit_pooled_estimator(
        pooled,
        seed=config.seed,
        steps=config.estimator_steps,
        hidden_size=ns.hidden_size,
        progress=config.progress,
        patience=config.estimator_patience or None,
    )
    saved = club.save(out, club.make_manifest(spec))
    n_pairs = pool.n_pairs
    print(
        f"estimator: {saved} (fitted on {len(pooled)} tasks, {n_pairs} pairs; manifest records the encoders)"
    )
    print(f"use it with: lmms-emi score ... --estimator {saved}  (or lmms-emi eval ... --estimator {saved})")
    return EXIT_OK

"""``lmms-emi train-estimator``: fit and freeze one CLUB estimator from the embeddings of earlier runs."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmms_emi.cli._options import HelpFormatter, add_estimator_options, add_option, add_output_options
from lmms_emi.embed.store import EMBEDDINGS_FILE, load_embeddings
from lmms_emi.errors import EXIT_OK, UsageError
from lmms_emi.estimators.club import encoder_mismatches
from lmms_emi.pipeline.estimator import fit_pooled_estimator

NAME = "train-estimator"
HELP = "fit and freeze one CLUB estimator from the embeddings saved by score/analyze/eval runs"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        NAME,
        formatter_class=HelpFormatter,
        help=HELP,
        description="Pools the (query, response) and (query, reference) pairs of every task of every run "
        "(all embedded with the same encoders), fits one CLUB and saves it with a manifest. Score every "
        "model of a leaderboard with this one checkpoint (--estimator) to make their EMI comparable.",
    )
    p.add_argument("inputs", nargs="+", help=f"report folders or {EMBEDDINGS_FILE} files")
    add_estimator_options(p, estimator=False)
    add_option(p, "--hidden-size", type=int, default=500, help="hidden width of the CLUB networks")
    add_output_options(p, required=True, help="checkpoint file (.safetensors) or folder")
    return p


def _embedding_files(paths: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            found = sorted(p.rglob(EMBEDDINGS_FILE))
            if not found:
                raise UsageError(f"{p} holds no {EMBEDDINGS_FILE} (written by `lmms-emi score` / `analyze`)")
            files.extend(found)
        else:
            raise UsageError(f"{p}: no such file or folder")
    return files


def run(ns: argparse.Namespace) -> int:
    pooled: dict[str, Any] = {}
    spec: dict[str, Any] | None = None
    first: Path | None = None
    for i, path in enumerate(_embedding_files(ns.inputs)):
        tasks, file_spec = load_embeddings(path)
        if spec is None:
            spec, first = file_spec, path
        elif problems := encoder_mismatches(spec, file_spec):
            raise UsageError(f"{path} used other encoders than {first}: {'; '.join(problems[:3])}")
        pooled.update({f"{i}:{task}": emb for task, emb in tasks.items()})
    assert spec is not None
    out = Path(ns.output_path)
    if out.suffix != ".safetensors":
        out = out / "club.safetensors" if out.is_dir() or not out.suffix else out.with_suffix(".safetensors")
    club = fit_pooled_estimator(
        pooled, seed=ns.emi_seed, steps=ns.estimator_steps, hidden_size=ns.hidden_size, progress=not ns.quiet
    )
    saved = club.save(out, club.make_manifest(spec))
    n_pairs = sum(2 * e.n for e in pooled.values() if e.z_model is not None and e.z_ref is not None)
    print(
        f"estimator: {saved} (fitted on {len(pooled)} tasks, ~{n_pairs} pairs; manifest records the encoders)"
    )
    print(f"use it with: lmms-emi score ... --estimator {saved}  (or lmms-emi eval ... --estimator {saved})")
    return EXIT_OK

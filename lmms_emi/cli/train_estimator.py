"""``lmms-emi train-estimator``: fit and freeze one CLUB estimator from the embeddings of earlier runs.

Each sample is pooled once (:mod:`lmms_emi.embed.pool`: a sample already pooled from an earlier file is
skipped by its content fingerprint), and what came from where is printed. Degenerate embeddings are refused
before the fit, with one line naming the file, the task and the role (:func:`check_embeddings`).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lmms_emi.cli._commands import subcommand_parser
from lmms_emi.cli._options import add_emi_options, add_output_options, config_from
from lmms_emi.errors import EXIT_OK, UsageError

NAME = "train-estimator"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subcommand_parser(
        sub,
        NAME,
        ". Pools the (query, response) and (query, reference) pairs of every task of every run "
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
    from lmms_emi.pipeline.preflight import check_outputs, output_folder

    check_outputs({"--output-path": output_folder(ns.output_path)})  # before any input is read
    config = config_from(ns)
    pool = pool_embeddings(embedding_files(ns.inputs))
    for line in pool.log:
        print(line)
    for note in check_embeddings(pool.sources):
        print(note)
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
        method=config.estimator_fit,
        mi_estimator=config.mi_estimator,
    )
    saved = club.save(out, club.make_manifest(spec))
    n_pairs = pool.n_pairs
    print(
        f"estimator: {saved} (fitted on {len(pooled)} tasks, {n_pairs} pairs; manifest records the encoders)"
    )
    print(f"use it with: lmms-emi score ... --estimator {saved}  (or lmms-emi eval ... --estimator {saved})")
    return EXIT_OK


_ROLES = (("z_v", "image"), ("z_t", "query"), ("z_model", "response"), ("z_ref", "reference"))


def check_embeddings(sources: Mapping[Path, Mapping[str, Any]]) -> list[str]:
    """Refuse embeddings an estimator cannot be fitted on: :class:`~lmms_emi.errors.UsageError`, one line
    naming the file, the task and the role (image, query, response, reference), when a role's embeddings of
    a task hold NaN or inf, are all zero, or (image, response, reference) are all the same vector. Returns
    notes to print: a task whose text queries are all the same (a fixed prompt) is fine, since its query
    z_x = (z_v + z_t)/2 still varies with the image."""
    import torch

    notes = []
    for path, tasks in sources.items():
        for task, emb in tasks.items():
            for attr, role in _ROLES:
                z = getattr(emb, attr)
                if z is None:
                    continue
                z = torch.as_tensor(z).to(torch.float64)
                where = f"{path}: task {task!r}: its {z.shape[0]} {role} embeddings"
                advice = "re-embed that run (a broken encoder or blank inputs?); nothing was fitted"
                if not bool(torch.isfinite(z).all()):
                    row = int((~torch.isfinite(z)).any(dim=1).nonzero()[0])
                    raise UsageError(f"{where} contain NaN or inf (first at row {row}): {advice}")
                scale = float(z.abs().max()) if z.numel() else 0.0
                if scale == 0.0:
                    raise UsageError(f"{where} are all zero: {advice}")
                if z.shape[0] < 2 or float((z - z[:1]).abs().max()) > 1e-6 * scale:
                    continue
                if role == "query":
                    notes.append(f"note: {where} are all the same (a fixed prompt?); fitting on them")
                else:
                    raise UsageError(f"{where} are all the same vector: {advice}")
    return notes

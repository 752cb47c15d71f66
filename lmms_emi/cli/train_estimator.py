"""``lmms-emi train-estimator``: fit and freeze one CLUB estimator from the embeddings of earlier runs.

Each sample is pooled once: a sample (its image, query, response and reference embeddings) already pooled
from an earlier file (``analyze`` writes a copy of an ``eval`` run's embeddings into the same folder; a
run may be named twice) is skipped by its content fingerprint, and what came from where is printed.
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lmms_emi.cli._commands import COMMANDS
from lmms_emi.cli._options import HelpFormatter, add_estimator_options, add_option, add_output_options
from lmms_emi.embed.store import EMBEDDINGS_FILE, load_embeddings
from lmms_emi.emi import TaskEmbeddings
from lmms_emi.errors import EXIT_OK, UsageError
from lmms_emi.estimators.club import encoder_mismatches
from lmms_emi.pipeline.estimator import fit_pooled_estimator

NAME = "train-estimator"
HELP = COMMANDS[NAME].help


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
            found = sorted(p.rglob(f"*{EMBEDDINGS_FILE}"))  # <run id>_emi_embeddings.safetensors too
            if not found:
                raise UsageError(f"{p} holds no {EMBEDDINGS_FILE} (written by `lmms-emi score` / `analyze`)")
            files.extend(found)
        else:
            raise UsageError(f"{p}: no such file or folder")
    return files


def _fingerprints(emb: TaskEmbeddings) -> list[str]:
    """One sha256 per sample over its rows of every field (float32 bytes; a missing field counts)."""
    fields = [None if z is None else z.detach().to("cpu", torch.float32).contiguous().numpy() for z in emb]
    out = []
    for i in range(emb.n):
        h = hashlib.sha256()
        for z in fields:
            h.update(b"-" if z is None else z[i].tobytes())
        out.append(h.hexdigest())
    return out


def _dims(emb: TaskEmbeddings) -> tuple[int | None, ...]:
    return tuple(None if z is None else int(z.shape[1]) for z in emb)


def run(ns: argparse.Namespace) -> int:
    pooled: dict[str, Any] = {}
    spec: dict[str, Any] | None = None
    first: Path | None = None
    seen: set[str] = set()
    dims: tuple[tuple[int | None, ...], str] | None = None
    for i, path in enumerate(_embedding_files(ns.inputs)):
        tasks, file_spec = load_embeddings(path)
        if spec is None:
            spec, first = file_spec, path
        elif problems := encoder_mismatches(spec, file_spec):
            raise UsageError(f"{path} used other encoders than {first}: {'; '.join(problems[:3])}")
        new_samples = new_tasks = 0
        total = sum(e.n for e in tasks.values())
        for task, emb in tasks.items():
            dv, dt, dm, dr = _dims(emb)
            shape = (dv, dt, dm or dr)
            if dims is None:
                dims = (shape, f"{path} task {task!r}")
            elif shape != dims[0]:
                raise UsageError(
                    f"{path} task {task!r}: embeddings of dims {shape} (image, query, response), but "
                    f"{dims[1]} has {dims[0]}; pool runs embedded with the same encoders"
                )
            keep = []
            for row, fp in enumerate(_fingerprints(emb)):
                if fp not in seen:
                    seen.add(fp)
                    keep.append(row)
            if keep:
                pooled[f"{i}:{task}"] = emb if len(keep) == emb.n else emb.subset(keep)
                new_samples, new_tasks = new_samples + len(keep), new_tasks + 1
        skipped = f"; {total - new_samples} already pooled, skipped" if new_samples < total else ""
        print(f"pooled {new_samples} of {total} samples ({new_tasks} tasks) from {path}{skipped}")
    assert spec is not None
    if not pooled:
        raise UsageError("no samples to fit on")
    out = Path(ns.output_path)
    if out.suffix != ".safetensors":
        out = out / "club.safetensors" if out.is_dir() or not out.suffix else out.with_suffix(".safetensors")
    club = fit_pooled_estimator(
        pooled,
        seed=ns.emi_seed,
        steps=ns.estimator_steps,
        hidden_size=ns.hidden_size,
        progress=not ns.quiet,
        patience=ns.estimator_patience or None,
    )
    saved = club.save(out, club.make_manifest(spec))
    n_pairs = sum(2 * e.n for e in pooled.values() if e.z_model is not None and e.z_ref is not None)
    print(
        f"estimator: {saved} (fitted on {len(pooled)} tasks, {n_pairs} pairs; manifest records the encoders)"
    )
    print(f"use it with: lmms-emi score ... --estimator {saved}  (or lmms-emi eval ... --estimator {saved})")
    return EXIT_OK

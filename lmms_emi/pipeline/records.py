"""Records in, embeddings out: the first step of the run pipeline.

A :class:`Sample` is what every entry point gathers (from response files and a dataset, from an lmms-eval
samples log, or live inside lmms-eval); :func:`embed_tasks` turns a run's samples into one
:class:`~lmms_emi.emi.TaskEmbeddings` per task.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lmms_emi.emi import TaskEmbeddings

__all__ = ["Sample", "embed_tasks", "ordered_samples"]


@dataclass(frozen=True)
class Sample:
    """One evaluated document: its task, id, image query (PIL image, bytes, path or None), text query, the
    model's response and the reference answer (None when the task has no references), and, where the source
    has them, the model's per-token log-probabilities of its response and of the reference (natural log;
    they estimate the bound's Ĥ, :func:`~lmms_emi.emi.estimate_entropy_scale`)."""

    task: str
    doc_id: int | str
    image: Any
    question: str
    response: str | None
    reference: str | None = None
    response_logprobs: tuple[float, ...] | None = None
    reference_logprobs: tuple[float, ...] | None = None


def ordered_samples(task: str, samples: Sequence[Sample]) -> list[Sample]:
    """Samples in doc_id order (lmms-eval gathers them rank-major); a repeated id is an error."""
    try:
        ordered = sorted(samples, key=lambda s: s.doc_id)
    except TypeError:  # mixed id types: keep the given order
        ordered = list(samples)
    seen: set[Any] = set()
    for s in ordered:
        if s.doc_id in seen:
            raise ValueError(f"task {task!r}: doc_id {s.doc_id!r} appears more than once")
        seen.add(s.doc_id)
    return ordered


def _optional_column(task: str, samples: Sequence[Sample], name: str) -> list[str] | None:
    """A text column that must be present on all samples of a task or on none (then None)."""
    values = [getattr(s, name) for s in samples]
    present = [v is not None for v in values]
    if not any(present):
        return None
    if not all(present):
        first = next(s.doc_id for s, p in zip(samples, present, strict=True) if not p)
        raise ValueError(
            f"task {task!r}: {name} is missing for doc_id {first!r} but present for others "
            f"({sum(present)} of {len(values)})"
        )
    return [str(v) for v in values]


def embed_tasks(embedder: Any, samples_by_task: Mapping[str, Sequence[Sample]]) -> dict[str, TaskEmbeddings]:
    """Embed every task's samples with one ``embed_images`` and one ``embed_texts`` call over all tasks,
    so the embedder can batch and deduplicate across tasks (shared images / references are embedded once).

    Within a task, rows follow ``doc_id`` order. A task whose samples all lack a response (reference) gets
    ``z_model`` (``z_ref``) None.
    """
    images: list[Any] = []
    image_ids: list[str] = []
    texts: list[str] = []
    text_ids: list[str] = []  # names each text in the embedder's errors
    layout: list[tuple[str, int, int, int, int | None, int | None]] = []
    joint = bool(getattr(embedder, "joint_query", False))  # z_v = z_t = the joint (image, question) vector
    questions: list[str] = []  # a joint-query embedder's questions (embedded with their images only)
    for task, raw in samples_by_task.items():
        samples = ordered_samples(task, raw)
        if not samples:
            raise ValueError(f"task {task!r} has no samples")
        missing_image = [s.doc_id for s in samples if s.image is None]
        if missing_image:
            raise ValueError(
                f"task {task!r}: no image for doc_id {missing_image[0]!r} "
                f"({len(missing_image)} of {len(samples)} samples); the image query is needed"
            )
        responses = _optional_column(task, samples, "response")
        references = _optional_column(task, samples, "reference")
        n = len(samples)
        img_start = len(images)
        images.extend(s.image for s in samples)
        image_ids.extend(f"{task} doc_id={s.doc_id}" for s in samples)
        q_start = len(texts)
        if joint:
            questions.extend(str(s.question) for s in samples)
        else:
            texts.extend(str(s.question) for s in samples)
            text_ids.extend(f"{task} doc_id={s.doc_id} (question)" for s in samples)
        r_start = None
        if responses is not None:
            r_start = len(texts)
            texts.extend(responses)
            text_ids.extend(f"{task} doc_id={s.doc_id} (response)" for s in samples)
        y_start = None
        if references is not None:
            y_start = len(texts)
            texts.extend(references)
            text_ids.extend(f"{task} doc_id={s.doc_id} (reference)" for s in samples)
        layout.append((task, n, img_start, q_start, r_start, y_start))
    if joint:
        z_images = torch.as_tensor(embedder.embed_queries(images, questions, sample_ids=image_ids))
    else:
        z_images = torch.as_tensor(_embed_with_ids(embedder.embed_images, images, image_ids))
    z_texts = (
        torch.as_tensor(_embed_with_ids(embedder.embed_texts, texts, text_ids)) if texts else torch.empty(0)
    )
    out: dict[str, TaskEmbeddings] = {}
    for task, n, img_start, q_start, r_start, y_start in layout:
        out[task] = TaskEmbeddings(
            z_v=z_images[img_start : img_start + n],
            z_t=z_images[img_start : img_start + n] if joint else z_texts[q_start : q_start + n],
            z_model=None if r_start is None else z_texts[r_start : r_start + n],
            z_ref=None if y_start is None else z_texts[y_start : y_start + n],
        )
    return out


def _embed_with_ids(embed: Any, items: list[Any], ids: list[str]) -> Any:
    """``embed(items)`` with sample ids for its error messages when it accepts them."""
    try:
        accepts_ids = "sample_ids" in inspect.signature(embed).parameters
    except (TypeError, ValueError):
        accepts_ids = False
    if accepts_ids:
        return embed(items, sample_ids=ids)
    return embed(items)

"""Samples from saved response files (``<split>_<model>.jsonl``) joined with a dataset's splits: the
records of ``lmms-emi score``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lmms_emi import scenarios as sc
from lmms_emi.errors import UsageError
from lmms_emi.pipeline.records import Sample
from lmms_emi.sources.datasets import ColumnNames, column_values, encoded_images
from lmms_emi.sources.responses import list_models, records_for_rows

__all__ = ["collect_samples", "only_model"]


def collect_samples(
    splits: Mapping[str, Any],
    scenarios: Sequence[sc.Scenario],
    responses_dir: str | Path,
    model: str,
    columns: ColumnNames | None = None,
    *,
    progress: bool = True,
) -> dict[str, list[Sample]]:
    """{task: [Sample]} joining each split's rows with ``model``'s responses (by question_id or row order)."""
    columns = columns or ColumnNames()
    out: dict[str, list[Sample]] = {}
    for scen in tqdm(scenarios, desc="reading splits", disable=not progress, leave=False):
        ds = splits[scen.split]
        q_col, r_col, i_col = columns.resolve(ds, scen.split)
        ids = [int(q) for q in column_values(ds, "question_id")] if "question_id" in ds.column_names else None
        answers = records_for_rows(responses_dir, scen.split, model, question_ids=ids, n_rows=len(ds))
        questions = column_values(ds, q_col)
        references = column_values(ds, r_col) if r_col else [None] * len(ds)
        images = encoded_images(ds, i_col)
        out[scen.task] = [
            Sample(
                scen.task,
                i,
                images[i],
                str(questions[i]),
                answer.text,
                references[i],
                answer.response_logprobs,
                answer.reference_logprobs,
            )
            for i, answer in enumerate(answers)  # every row has one: records_for_rows raises otherwise
        ]
    return out


def only_model(responses: str | Path, splits: Sequence[str]) -> str:
    """The one model with responses for every split (UsageError when there are none or several)."""
    models = list_models(responses, splits)
    if len(models) != 1:
        found = ", ".join(models) or "none with files for every scenario"
        raise UsageError(f"say which model to score with --model (found in {responses}: {found})")
    return models[0]

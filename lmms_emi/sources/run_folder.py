"""An lmms-eval ``--output_path`` folder written with ``--log_samples``: the EMI records of each task (from
``*_samples_<task>.jsonl``), the task configs and model of the matching ``*_results.json``, and the images
read back from each task's dataset. The records of ``lmms-emi analyze``."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lmms_emi import scenarios as sc
from lmms_emi._io import json_lines
from lmms_emi.errors import UsageError
from lmms_emi.estimator_registry import file_sha256
from lmms_emi.judge import Judgment
from lmms_emi.metrics import RECORD_METRIC
from lmms_emi.pipeline.records import Sample
from lmms_emi.sources.datasets import IMAGE_COLUMNS, column_values, encoded_images, load_split, load_splits

__all__ = ["RunRecords", "model_name", "read_run"]


def model_name(model: str | None, model_args: Any) -> str | None:
    """The name a user knows a model by: ``model_name=`` or ``pretrained=`` of its model args, else the
    lmms-eval model class (``llava``, ``emi_replay``)."""
    pairs: Mapping[str, Any] = {}
    if isinstance(model_args, Mapping):
        pairs = model_args
    elif isinstance(model_args, str):
        pairs = dict(p.split("=", 1) for p in model_args.split(",") if "=" in p)
    value = pairs.get("model_name") or pairs.get("pretrained")
    return str(value) if value else model


@dataclass
class RunRecords:
    """The EMI records of one lmms-eval run folder, by task (sorted by doc_id), and the run's task configs."""

    records: dict[str, list[dict[str, Any]]]
    configs: dict[str, dict[str, Any]]
    model: str | None
    results_file: str | None
    #: judge verdicts of lmms-eval's llava-bench style metrics in the same sample logs (tasks they cover)
    judgments: dict[str, list[Judgment]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def samples(self, *, dataset: str | None = None, progress: bool = True) -> dict[str, list[Sample]]:
        """Sample lists with each document's image read back from the task's dataset split."""
        out: dict[str, list[Sample]] = {}
        for task, records in tqdm(
            self.records.items(), desc="reading images", disable=not progress, leave=False
        ):
            images = self._images(task, [r["doc_id"] for r in records], dataset, records)
            out[task] = [
                Sample(task, r["doc_id"], img, str(r["question"]), r["response"], r.get("reference"))
                for r, img in zip(records, images, strict=True)
            ]
        return out

    def _images(self, task: str, doc_ids: list[int], dataset: str | None, records: list[dict]) -> list[Any]:
        scenario = sc.scenario_for_task(task)
        config = self.configs.get(task, {})
        split = config.get("test_split") or (scenario.split if scenario else None)
        if dataset is not None and scenario is not None:
            ds = load_splits(dataset, scenario.benchmark, [scenario.split])[scenario.split]
        else:
            ds = _dataset_from_config(task, config, split)
        if doc_ids and max(doc_ids) >= len(ds):
            raise UsageError(
                f"task {task!r}: doc_id {max(doc_ids)} is beyond the {len(ds)} rows of its dataset split "
                "(is --dataset the data the run used?)"
            )
        if "question_id" in ds.column_names:  # guard against a different dataset than the run's
            qids = [int(q) for q in column_values(ds, "question_id", doc_ids)]
            for r, q in zip(records, qids, strict=True):
                if r.get("question_id") is not None and int(r["question_id"]) != q:
                    raise UsageError(
                        f"task {task!r}: doc_id {r['doc_id']} has question_id {r['question_id']} in the run "
                        f"but {q} in the dataset (is --dataset the data the run used?)"
                    )
        column = next((c for c in IMAGE_COLUMNS if c in ds.column_names), None)
        if column is None:
            raise UsageError(
                f"task {task!r}: its dataset split has no image column ({', '.join(ds.column_names)})"
            )
        return encoded_images(ds, column, doc_ids)


def _dataset_from_config(task: str, config: Mapping[str, Any], split: str | None) -> Any:
    """The task's split as lmms-eval loaded it (dataset_path + dataset_kwargs of the results JSON)."""
    path = config.get("dataset_path")
    if not path or not split:
        raise UsageError(
            f"task {task!r}: the run's results JSON does not say where its data is; pass --dataset PATH"
        )
    try:
        return load_split(path, split, config.get("dataset_kwargs") or {})
    except Exception as exc:  # offline / moved / unknown id: many exception types
        raise UsageError(
            f"task {task!r}: dataset {path!r} is not reachable ({type(exc).__name__}); the images need the "
            "Hugging Face hub (online) or a local copy given with --dataset"
        ) from None


def read_run(run_dir: str | Path, *, metric: str = RECORD_METRIC) -> RunRecords:
    """Read ``*_samples_<task>.jsonl`` (latest date of the folder) and the matching ``*_results.json``.

    Each line must carry, under ``metric``, the per-document record of the EMI metric (``question``,
    ``response``, ``reference``, ``doc_id``); files without it (other tasks) are skipped.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise UsageError(f"{root}: no such folder")
    files = sorted(root.rglob("*_samples_*.jsonl"))
    if not files:
        raise UsageError(f"{root} holds no *_samples_<task>.jsonl files (run lmms-eval with --log_samples)")
    dates = sorted({f.name.split("_samples_", 1)[0] for f in files})
    if len(dates) > 1:
        print(f"lmms-emi: {root} holds {len(dates)} runs; reading the latest ({dates[-1]})", file=sys.stderr)
    latest = [f for f in files if f.name.split("_samples_", 1)[0] == dates[-1]]
    records: dict[str, list[dict[str, Any]]] = {}
    judgments: dict[str, list[Judgment]] = {}
    notes: list[str] = []
    for path in latest:
        task = path.name.split("_samples_", 1)[1].removesuffix(".jsonl")
        rows = _read_records(path, metric)
        if rows is not None:
            rows.sort(key=lambda r: r["doc_id"])
            records[task] = rows
            logged, note = _logged_judgments(task, rows)
            if logged:
                judgments[task] = logged
            if note:
                notes.append(note)
    if not records:
        raise UsageError(
            f"no sample file under {root} has {metric!r} records (was the EMI metric part of the run?)"
        )
    results_files = sorted(latest[0].parent.glob(f"{dates[-1]}_results.json")) or sorted(
        root.rglob("*_results.json")
    )
    configs: dict[str, dict[str, Any]] = {}
    model = None
    results_file = None
    if results_files:
        results_file = str(results_files[-1])
        try:
            data = json.loads(results_files[-1].read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UsageError(f"{results_files[-1]}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        configs = data.get("configs", {}) or {}
        cfg = data.get("config", {}) or {}
        model = cfg.get("model_name") or model_name(cfg.get("model"), cfg.get("model_args"))
    return RunRecords(records, configs, model, results_file, judgments, notes)


def _read_records(path: Path, metric: str) -> list[dict[str, Any]] | None:
    rows: list[dict[str, Any]] = []
    for line_no, obj in json_lines(path, UsageError):
        rec = obj.get(metric)
        if rec is None and not rows and line_no == 1:
            return None  # a task without the EMI metric
        if not isinstance(rec, dict) or not {"question", "response"} <= set(rec):
            raise UsageError(f"{path}:{line_no}: no EMI record under {metric!r} (question, response, doc_id)")
        doc_id = rec.get("doc_id", obj.get("doc_id"))
        if doc_id is None:
            raise UsageError(f"{path}:{line_no}: the record has no doc_id")
        verdict = _judge_entry(obj)
        rows.append({**rec, "doc_id": int(doc_id), **({"_judge": verdict} if verdict else {})})
    return rows or None


def _judge_entry(obj: Mapping[str, Any]) -> dict[str, Any] | None:
    """The llava-bench judge verdict of a samples-log line: ``gpt_eval_llava_all``, else the first
    ``gpt_eval_llava_*`` dict whose scores are not lmms-eval's -999 placeholder."""
    keys = ["gpt_eval_llava_all", *sorted(k for k in obj if k.startswith("gpt_eval_llava_"))]
    for key in keys:
        value = obj.get(key)
        if isinstance(value, Mapping) and isinstance(value.get("scores"), (list, tuple)):
            if -999 not in value["scores"]:
                return dict(value)
    return None


def _logged_judgments(task: str, rows: list[dict[str, Any]]) -> tuple[list[Judgment], str | None]:
    """Verdicts of lmms-eval's own judge for the task's EMI records, when they cover every one of them
    and judged the same response; lmms-eval's failure marker (-1 scores) is an excluded sample."""
    verdicts = [r.pop("_judge", None) for r in rows]
    present = [v for v in verdicts if v is not None]
    if not present:
        return [], None
    if len(present) < len(rows):
        return [], (
            f"{task}: the samples log has judge scores for {len(present)} of {len(rows)} samples; not used "
            "(use --judge to score them all)"
        )
    out: list[Judgment] = []
    for r, v in zip(rows, verdicts, strict=True):
        if v.get("ans2") is not None and str(v["ans2"]) != str(r["response"]):
            return (
                [],
                f"{task}: the logged judge scores are for other responses (doc_id {r['doc_id']}); not used",
            )
        scores = v["scores"]
        ok = len(scores) >= 2 and all(isinstance(x, (int, float)) and x >= 0 for x in scores[:2])
        if ok:
            out.append(Judgment(task, r["doc_id"], float(scores[0]), float(scores[1]), source="log"))
        else:
            out.append(
                Judgment(task, r["doc_id"], error=f"lmms-eval's judge failed (scores {scores})", source="log")
            )
    return out, None


#: What a run recorded (``lmms_emi.options`` in its results JSON) that describes its analysis rather than the
#: machine it ran on: ``lmms-emi analyze`` starts from these (flags and ``LMMS_EMI_*`` still override).
REPLAYED_OPTIONS = (
    "encoders",
    "vision_encoder",
    "text_encoder",
    "text_layer",
    "estimator_steps",
    "estimator_patience",
    "estimator_fit",
    "mi_estimator",
    "jsd_estimator",
    "seed",
    "bootstrap",
    "confidence",
    "entropy_scale",
    "id_task",
    "judge",
    "judge_model",
    "judge_base_url",
)


def recorded_options(run_dir: str | Path) -> dict[str, Any] | None:
    """The analysis options the run folder's latest results JSON recorded (:data:`REPLAYED_OPTIONS`, plus
    ``estimator`` when the estimator it used is still there unchanged), or None when it recorded none.

    The estimator is found by what the run recorded: a registered name; else its checkpoint file (the
    recorded path, or the same name beside the results JSON) when its sha256 is the recorded one, and a
    checkpoint that is missing or changed is one :class:`UsageError` line. An estimator the run fitted on its
    own pairs is fitted again on the same pairs with the recorded seed and method (deterministic: the same
    estimator, still marked as fitted on the run)."""
    root = Path(run_dir)
    files = sorted(root.rglob("*_results.json")) if root.is_dir() else []
    if not files:
        return None
    try:
        data = json.loads(files[-1].read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # read_run reports a broken results file in one line
    section = data.get("lmms_emi") if isinstance(data, dict) else None
    options = section.get("options") if isinstance(section, dict) else None
    if not isinstance(options, dict):
        return None
    out = {k: options[k] for k in REPLAYED_OPTIONS if k in options}
    est = section.get("estimator") or {}
    if est.get("source") == "fitted":
        out["estimator"] = "fit"
        return out
    if est.get("name"):
        out["estimator"] = est["name"]
        return out
    path, sha = est.get("path"), est.get("sha256")
    if path and sha:
        for candidate in (Path(path), files[-1].parent / Path(path).name):
            if candidate.is_file() and file_sha256(candidate) == sha:
                out["estimator"] = str(candidate)
                return out
        raise UsageError(
            f"{files[-1].name}: the run used the estimator {path} (sha256 {sha[:12]}), which is missing "
            "or changed; give the estimator with --estimator"
        )
    return out

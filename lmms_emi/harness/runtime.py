"""Per-process state of an EMI run inside lmms-eval, and the final cross-task analysis.

lmms-eval calls, in this order (see ``lmms_eval.evaluator.evaluate``):

1. ``process_docs`` of every task at load time (every rank) -> :func:`register_dataset` keeps the split so
   that rank 0 can read the images back later (samples then travel between ranks without images);
2. ``process_results`` per document (every rank, thread pool) -> :func:`make_record`, a small picklable dict
   carrying ``task`` and ``doc_id``;
3. per-task aggregation (rank 0, every rank's records gathered rank-major) -> :func:`register_samples`
   (sorted by ``doc_id``) and :func:`provisional_metric` (EMI when an estimator is available without
   training, EMID / bounds when the ID task is registered too; None otherwise);
4. group aggregation (rank 0) -> means of the per-task values.

After lmms-eval returns, the launcher calls :func:`finalize` on rank 0: embeddings of every registered task,
the estimator (given / shipped default / fitted on the pooled embeddings of the whole run), and
``analysis.analyze_shift`` per benchmark. Its :class:`RunAnalysis` is what the launcher writes into the
results JSON and the reports.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from lmms_emi import scenarios as sc
from lmms_emi.harness.options import EMIOptions

DOC_ID_COLUMN = "emi_doc_id"
TASK_COLUMN = "emi_task"

_LOCK = threading.RLock()


@dataclass
class ForeignTask:
    """Accessors of a non-plugin lmms-eval task scored with ``--metrics emi`` (its own config's functions)."""

    name: str
    doc_to_visual: Callable[[dict], Any]
    doc_to_text: Callable[[dict], str]
    doc_to_target: Callable[[dict], Any]
    process_docs: Callable[[Any], Any] | None = None


@dataclass
class _State:
    datasets: dict[str, Any] = field(default_factory=dict)  # task -> processed split (for images)
    foreign: dict[str, ForeignTask] = field(default_factory=dict)
    samples: dict[str, list[dict]] = field(default_factory=dict)  # task -> records sorted by doc_id
    local: dict[str, dict[Any, dict]] = field(default_factory=dict)  # this rank's records, by task and doc_id
    embeddings: dict[str, Any] = field(default_factory=dict)  # task -> TaskEmbeddings
    provisional: dict[str, dict[str, float | None]] = field(default_factory=dict)
    options: EMIOptions | None = None
    embedder: Any = None
    fixed_estimator: Any = None  # (club, info) | False (none without training) | None (not looked up)
    errors: dict[str, str] = field(default_factory=dict)


_STATE = _State()


def reset(options: EMIOptions | None = None) -> None:
    """Forget everything (a new run in the same process); ``options`` replaces the environment's."""
    global _STATE
    with _LOCK:
        _STATE = _State(options=options)


def options() -> EMIOptions:
    with _LOCK:
        if _STATE.options is None:
            _STATE.options = EMIOptions.from_env()
        return _STATE.options


# ------------------------------------------------------------------------------------------------ load time
def register_foreign(task: ForeignTask) -> None:
    with _LOCK:
        _STATE.foreign[task.name] = task


def foreign_task(name: str) -> ForeignTask | None:
    with _LOCK:
        return _STATE.foreign.get(name)


def register_dataset(task: str, dataset: Any) -> Any:
    """Add the ``emi_doc_id`` (row number = lmms-eval's doc_id) and ``emi_task`` columns; keep the split."""
    n = len(dataset)
    for column, values in ((DOC_ID_COLUMN, list(range(n))), (TASK_COLUMN, [task] * n)):
        if column in dataset.column_names:
            dataset = dataset.remove_columns(column)
        dataset = dataset.add_column(column, values)
    with _LOCK:
        _STATE.datasets[task] = dataset
    return dataset


# ---------------------------------------------------------------------------------------- per document
def make_record(task: str, doc: Mapping[str, Any], response: str, question: str, reference: Any) -> dict:
    """What EMI needs of one document, minus the image (read back on rank 0): picklable, carries doc_id."""
    doc_id = doc.get(DOC_ID_COLUMN)
    qid = doc.get("question_id")
    record = {
        "task": task,
        "doc_id": None if doc_id is None else int(doc_id),
        "question_id": qid if isinstance(qid, (int, str)) else None,
        "question": str(question),
        "response": response,
        "reference": None if reference is None else str(reference),
    }
    if record["doc_id"] is not None:
        with _LOCK:  # process_results runs in a thread pool
            _STATE.local.setdefault(task, {})[record["doc_id"]] = record
    return record


# ---------------------------------------------------------------------------------------- aggregation
def register_samples(items: Sequence[Mapping[str, Any]]) -> str | None:
    """Store a task's gathered records (any rank order) sorted by doc_id; return the task name."""
    if not items:
        return None
    task = str(items[0]["task"])
    records = [dict(r) for r in items]
    if all(r.get("doc_id") is not None for r in records):
        records.sort(key=lambda r: r["doc_id"])
    with _LOCK:
        if _STATE.samples.get(task) != records:
            _STATE.samples[task] = records
            _STATE.embeddings.pop(task, None)
            _STATE.provisional.pop(task, None)
    return task


def registered_tasks() -> list[str]:
    with _LOCK:
        return list(_STATE.samples)


def provisional_metric(task: str | None, metric: str) -> float | None:
    """A per-task metric computable before all tasks are in (see module doc); None when it is not (yet)."""
    if task is None:
        return None
    with _LOCK:
        if task not in _STATE.provisional:
            try:
                _STATE.provisional[task] = _provisional(task)
            except Exception as exc:
                logger.warning(f"lmms-emi: {task}: {exc} (the EMI numbers are computed after the run)")
                _STATE.errors[task] = str(exc)
                _STATE.provisional[task] = {}
        return _STATE.provisional[task].get(metric)


def _provisional(task: str) -> dict[str, float | None]:
    from lmms_emi import analysis

    fixed = _fixed_estimator()
    if fixed is None or len(_STATE.samples[task]) < 2:
        return {}
    club, _info = fixed
    opts = options()
    emb = _embeddings([task])
    scenario = sc.scenario_for_task(task)
    id_task = sc.id_scenario(scenario.benchmark).task if scenario is not None else None
    if (
        id_task is not None
        and id_task not in _STATE.samples
        and _single_process()
        and _STATE.local.get(id_task)
    ):
        # lmms-eval aggregates the ID task later; in one process its records are all here already
        register_samples(list(_STATE.local[id_task].values()))
    if id_task is not None and id_task != task and id_task in _STATE.samples:
        emb.update(_embeddings([id_task]))
    else:
        emb, id_task = {task: emb[task]}, task
    result = analysis.analyze_shift(
        emb,
        id_task,
        club,
        entropy_scale=opts.entropy_scale,
        n_resamples=opts.bootstrap,
        confidence_level=opts.confidence,
        seed=opts.seed,
    ).task(task)
    return task_metrics(result, entropy_scale=opts.entropy_scale)


def _single_process() -> bool:
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return world == 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1


def task_metrics(result: Any, *, entropy_scale: float | None) -> dict[str, float | None]:
    """The per-task metric values of lmms-eval's results JSON from an ``analysis.TaskResult``."""
    ci = result.emi_ci or (None, None)
    bound = (
        result.bound_theorem
        if entropy_scale is not None and result.bound_theorem is not None
        else result.bound
    )
    return {
        "emi": result.emi,
        "emi_n": result.n,
        "emi_ci_low": ci[0],
        "emi_ci_high": ci[1],
        "emid": result.emid,
        "emid_bound": bound,
        "emid_bound_partial": result.partial_bound,
    }


# ---------------------------------------------------------------------------------------- embeddings
def embedder() -> Any:
    """The run's Embedder (built on first use from the options)."""
    with _LOCK:
        if _STATE.embedder is None:
            from lmms_emi.embed import Embedder

            opts = options()
            _STATE.embedder = Embedder.from_profile(opts.profile, **opts.embedder_kwargs())
        return _STATE.embedder


def _shipped_checkpoints() -> bool:
    """Whether any estimator checkpoint ships with the plugin (checked before loading any encoder)."""
    from lmms_emi import analysis

    return any(
        p.suffix in analysis.ESTIMATOR_SUFFIXES
        for folder in analysis.default_checkpoint_dirs()
        for p in folder.iterdir()
    )


def _encoder_spec() -> dict[str, Any]:
    """The run's encoder spec; a built-in profile's without loading its models."""
    opts = options()
    if opts.vision is None and opts.text is None and opts.text_layer is None and _STATE.embedder is None:
        from lmms_emi.embed import profile_spec

        return profile_spec(opts.profile)
    return embedder().encoder_spec()


def _fixed_estimator() -> tuple[Any, Any] | None:
    """The estimator when it needs no training (a given checkpoint or a shipped default), else None."""
    with _LOCK:
        if _STATE.fixed_estimator is None:
            from lmms_emi import analysis

            opts = options()
            _STATE.fixed_estimator = False
            if opts.estimator and opts.estimator != "fit":
                spec = embedder().encoder_spec()
                _STATE.fixed_estimator = analysis.resolve_estimator(opts.estimator, spec, {})
            elif opts.estimator is None and _shipped_checkpoints():
                spec = _encoder_spec()
                if analysis.find_default_checkpoint(spec) is not None:
                    _STATE.fixed_estimator = analysis.resolve_estimator(None, spec, {})
        return _STATE.fixed_estimator or None


def _images(task: str, doc_ids: list[int | None]) -> list[Any]:
    """The image query of each document, read from the split registered at load time (encoded bytes for the
    plugin's tasks; the task's own ``doc_to_visual`` for foreign ones)."""
    dataset = _STATE.datasets.get(task)
    if dataset is None or any(i is None for i in doc_ids):
        raise ValueError(
            f"task {task!r}: its dataset split was not registered in this process, so the images cannot be "
            "read back (run through `lmms-emi eval`, or give the task `process_docs` of lmms_emi)"
        )
    foreign = _STATE.foreign.get(task)
    if foreign is None and "image" in dataset.column_names:
        import datasets

        raw = dataset.select_columns(["image"]).cast_column("image", datasets.Image(decode=False))
        return list(raw.select(doc_ids)["image"])
    rows = dataset.select(doc_ids)
    out = []
    for row in rows:
        visual = foreign.doc_to_visual(row) if foreign is not None else row.get("image")
        out.append(visual[0] if isinstance(visual, (list, tuple)) and visual else visual)
    return out


def _embeddings(tasks: Sequence[str]) -> dict[str, Any]:
    """TaskEmbeddings of ``tasks`` (cached), embedded together so shared content is encoded once."""
    from lmms_emi import analysis

    todo = [t for t in tasks if t not in _STATE.embeddings]
    if todo:
        samples: dict[str, list[Any]] = {}
        for task in todo:
            records = _STATE.samples[task]
            images = _images(task, [r["doc_id"] for r in records])
            samples[task] = [
                analysis.Sample(
                    task=task,
                    doc_id=r["doc_id"] if r["doc_id"] is not None else i,
                    image=img,
                    question=r["question"],
                    response=r["response"],
                    reference=r["reference"],
                )
                for i, (r, img) in enumerate(zip(records, images, strict=True))
            ]
        _STATE.embeddings.update(analysis.embed_tasks(embedder(), samples))
    return {t: _STATE.embeddings[t] for t in tasks}


# ---------------------------------------------------------------------------------------- finalize
@dataclass
class RunAnalysis:
    """Everything computed at the end of a run: one ``ShiftAnalysis`` per benchmark that has its ID task,
    one single-task analysis per other task, the estimator info, and the report files written."""

    benchmarks: dict[str, Any] = field(default_factory=dict)  # benchmark -> ShiftAnalysis
    singles: dict[str, Any] = field(default_factory=dict)  # task -> ShiftAnalysis of that task alone
    estimator: Any = None  # analysis.EstimatorInfo
    reports: dict[str, dict[str, Path]] = field(default_factory=dict)  # benchmark or task -> kind -> path
    warnings: list[str] = field(default_factory=list)

    def task_result(self, task: str) -> Any:
        """The ``TaskResult`` of ``task`` (from its benchmark's analysis when there is one)."""
        for analysis in self.benchmarks.values():
            try:
                return analysis.task(task)
            except KeyError:
                continue
        if task in self.singles:
            return self.singles[task].task(task)
        raise KeyError(task)

    def analysis_for(self, task: str) -> Any:
        for analysis in self.benchmarks.values():
            if any(t.task == task for t in analysis.tasks):
                return analysis
        return self.singles.get(task)


def finalize(
    report_dir: str | Path | None = None, *, metadata: Mapping[str, Any] | None = None
) -> RunAnalysis:
    """Embed every registered task, resolve the estimator (fitting one on the pooled embeddings of the run
    when needed, saved into ``report_dir``), analyse each benchmark against its ID task, and write one report
    per benchmark (``emi_report_<benchmark>.*``) and per other task. Raises ValueError with a one-line
    message on user errors (too few samples, encoder/checkpoint mismatch, ...)."""
    from lmms_emi import analysis
    from lmms_emi.report import write_report

    opts = options()
    with _LOCK:
        tasks = list(_STATE.samples)
        if not tasks:
            raise ValueError("no EMI samples were recorded: no task of this run has the EMI metric")
        for task in tasks:
            n = len(_STATE.samples[task])
            if n < 2:
                raise ValueError(f"task {task!r} has {n} sample(s); EMI and the bounds need at least 2")
        all_emb = _embeddings(tasks)
        out_dir = Path(report_dir or opts.report_dir or ".")
        # saved so that `lmms-emi train-estimator` can pool this run with others
        analysis.save_embeddings(
            all_emb, out_dir / analysis.EMBEDDINGS_FILE, encoders=embedder().encoder_spec()
        )
        fixed = _fixed_estimator()
        if fixed is not None:
            club, info = fixed
        else:
            kwargs: dict[str, Any] = {"save_dir": out_dir, "seed": opts.seed, "progress": False}
            if opts.train_steps is not None:
                kwargs["steps"] = opts.train_steps
            logger.info(
                f"lmms-emi: fitting a CLUB estimator on the pooled embeddings of {len(tasks)} task(s)"
            )
            club, info = analysis.resolve_estimator(
                opts.estimator,  # None (shipped default, else fit) or "fit"; a path was handled above
                embedder().encoder_spec(),
                all_emb,
                **kwargs,
            )
        run = RunAnalysis(estimator=info)
        meta = dict(metadata or {})
        common = {
            "entropy_scale": opts.entropy_scale,
            "n_resamples": opts.bootstrap,
            "confidence_level": opts.confidence,
            "seed": opts.seed,
        }
        by_benchmark: dict[str, list[str]] = {}
        others: list[str] = []
        for task in tasks:
            scenario = sc.scenario_for_task(task)
            (by_benchmark.setdefault(scenario.benchmark, []) if scenario else others).append(task)
        for benchmark, members in by_benchmark.items():
            id_task = sc.id_scenario(benchmark).task
            if id_task not in members:
                run.warnings.append(
                    f"{benchmark}: the ID task {id_task} was not run, so no EMID / bounds for "
                    f"{len(members)} task(s)"
                )
                others.extend(members)
                continue
            order = {s.task: i for i, s in enumerate(sc.scenarios(benchmark))}
            ordered = sorted(members, key=order.__getitem__)  # ID first, then the scenario order
            result = analysis.analyze_shift({t: all_emb[t] for t in ordered}, id_task, club, **common)
            result = result.with_context(estimator=info, metadata={**meta, "benchmark": benchmark})
            run.benchmarks[benchmark] = result
            run.reports[benchmark] = write_report(result, out_dir, prefix=f"emi_report_{benchmark}")
        for task in others:
            result = analysis.analyze_shift({task: all_emb[task]}, task, club, **common)
            result = result.with_context(estimator=info, metadata={**meta, "task": task})
            run.singles[task] = result
            run.reports[task] = write_report(result, out_dir, prefix=f"emi_report_{task}")
        return run

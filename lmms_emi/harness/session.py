"""The run session: the state of one EMI run inside lmms-eval, behind public methods.

lmms-eval calls, in this order (see ``lmms_eval.evaluator.evaluate``), through
:mod:`lmms_emi.harness.task_utils`:

1. ``process_docs`` of every task at load time (every rank) -> :meth:`RunSession.register_dataset` keeps the
   split so that rank 0 can read the images back later (records then travel between ranks without images);
2. ``process_results`` per document (every rank, thread pool) -> :meth:`RunSession.add_record`, a small
   picklable dict carrying ``task`` and ``doc_id``;
3. per-task aggregation (rank 0, every rank's records gathered rank-major) ->
   :meth:`RunSession.register_samples` (sorted by ``doc_id``) and :meth:`RunSession.provisional_metric`
   (EMI when the estimator needs no training, EMID / bounds when the ID task is registered too; else None);
4. group aggregation (rank 0) -> the metric table's group aggregations.

After lmms-eval returns, the launcher calls :meth:`RunSession.finalize` on rank 0: the run's samples go
through the one pipeline (:func:`lmms_emi.pipeline.analyze_run`), reusing the embeddings and the estimator
the provisional metrics already computed. As lmms-eval's own judge tasks hold their pipeline, there is one
session per process: :func:`current` returns it and :func:`reset` starts a new one.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from loguru import logger

from lmms_emi import scenarios as sc
from lmms_emi.config import EMIConfig
from lmms_emi.embed import Embedder
from lmms_emi.emi import TaskEmbeddings
from lmms_emi.estimators.club import CLUB
from lmms_emi.judge import Judge
from lmms_emi.metrics import task_values
from lmms_emi.pipeline.agreement import JudgeRun
from lmms_emi.pipeline.estimator import EstimatorInfo, EstimatorPolicy, fixed_estimator
from lmms_emi.pipeline.preflight import Ready, judge_config
from lmms_emi.pipeline.records import Sample
from lmms_emi.pipeline.run import RunAnalysis, analyze_run
from lmms_emi.pipeline.shift import AnalysisSettings

__all__ = [
    "DOC_ID_COLUMN",
    "RUN_CONFIG_VAR",
    "TASK_COLUMN",
    "ForeignTask",
    "RunSession",
    "current",
    "export",
    "exported",
    "reset",
]

DOC_ID_COLUMN = "emi_doc_id"
TASK_COLUMN = "emi_task"
#: The resolved config of a run, set by the process that planned it for every process of the run (also
#: ``torchrun`` / ``accelerate launch`` workers, which inherit the environment); not a user setting.
RUN_CONFIG_VAR = "LMMS_EMI_RUN_CONFIG"


@dataclass
class ForeignTask:
    """Accessors of a non-plugin lmms-eval task scored with ``--metrics emi`` (its own config's functions)."""

    name: str
    doc_to_visual: Callable[[dict], Any]
    doc_to_text: Callable[[dict], str]
    doc_to_target: Callable[[dict], Any]
    process_docs: Callable[[Any], Any] | None = None


class RunSession:
    """Explicit state of one run: datasets, records, embeddings, provisional metrics, the estimator."""

    def __init__(self, config: EMIConfig | None = None, ready: Ready | None = None) -> None:
        self.config = config or _config_from_env()
        self._lock = threading.RLock()
        self._datasets: dict[str, Any] = {}  # task -> processed split (for the images)
        self._foreign: dict[str, ForeignTask] = {}
        self._samples: dict[str, list[dict]] = {}  # task -> gathered records sorted by doc_id
        self._local: dict[str, dict[Any, dict]] = {}  # this rank's records, by task and doc_id
        self._embeddings: dict[str, TaskEmbeddings] = {}
        self._provisional: dict[str, dict[str, Any]] = {}
        self._embedder: Embedder | None = None if ready is None else ready.embedder
        self._policy = EstimatorPolicy.from_config(self.config) if ready is None else ready.policy
        self._settings = AnalysisSettings.from_config(self.config) if ready is None else ready.settings
        # False: not looked up yet; a preflight's estimator is reused, not loaded again
        checked = ready is not None and ready.embedder is not None  # the preflight resolved the estimator
        self._fixed: tuple[CLUB, EstimatorInfo] | bool | None = ready.estimator if checked else False
        self._filled: dict[tuple[str, int], str] = {}  # (task, doc_id) -> source of an answer not the model's
        self._stop: Callable[[Exception], Any] | None = None

    # ------------------------------------------------------------------------------------------ load time
    def on_stop(self, handler: Callable[[Exception], Any] | None) -> None:
        """What :meth:`stop` calls (the launcher's: one line, then ``SystemExit`` past lmms-eval)."""
        self._stop = handler

    def stop(self, error: Exception) -> None:
        """Stop the run on a user error found inside lmms-eval (e.g. a task's columns, before generation)."""
        handler = getattr(self, "_stop", None)
        if handler is not None:
            handler(error)
        raise error

    def register_foreign(self, task: ForeignTask) -> None:
        with self._lock:
            self._foreign[task.name] = task

    def foreign_task(self, name: str) -> ForeignTask | None:
        with self._lock:
            return self._foreign.get(name)

    def register_dataset(self, task: str, dataset: Any) -> Any:
        """Add the ``emi_doc_id`` (row number = lmms-eval's doc_id) and ``emi_task`` columns; keep the
        split."""
        n = len(dataset)
        for column, values in ((DOC_ID_COLUMN, list(range(n))), (TASK_COLUMN, [task] * n)):
            if column in dataset.column_names:
                dataset = dataset.remove_columns(column)
            dataset = dataset.add_column(column, values)
        with self._lock:
            self._datasets[task] = dataset
        return dataset

    # ----------------------------------------------------------------------------------------- per document
    def mark_filled(self, task: str, doc_id: int, source: str) -> None:
        """The answer to ``doc_id`` of ``task`` is not the model's (``source`` says where it came from, e.g.
        the replay model's fallback for a row without a saved response): its record carries ``filled``, and
        the task's warnings say so (in the results JSON and the reports, not only on stderr)."""
        with self._lock:
            self._filled[(task, int(doc_id))] = source

    def add_record(
        self, task: str, doc: Mapping[str, Any], response: str, question: str, reference: Any
    ) -> dict:
        """What EMI needs of one document, minus the image (read back on rank 0): picklable, carries
        doc_id."""
        doc_id = doc.get(DOC_ID_COLUMN)
        qid = doc.get("question_id")
        record = {
            "task": task,
            "doc_id": None if doc_id is None else int(doc_id),
            "question_id": qid if isinstance(qid, (int, str)) else None,
            "question": str(question),
            "response": response,
            "reference": None if reference is None else str(reference),
            "rank": _rank(),  # which process generated it (the results JSON's lmms_emi.sample_ranks)
        }
        if record["doc_id"] is not None:
            with self._lock:  # process_results runs in a thread pool
                filled = self._filled.get((task, record["doc_id"]))
                if filled is not None:  # travels with the record to rank 0
                    record["filled"] = filled
                self._local.setdefault(task, {})[record["doc_id"]] = record
        return record

    # ----------------------------------------------------------------------------------------- aggregation
    def register_samples(self, items: Sequence[Mapping[str, Any]]) -> str | None:
        """Store a task's gathered records (any rank order) sorted by doc_id; return the task name."""
        if not items:
            return None
        task = str(items[0]["task"])
        records = [dict(r) for r in items]
        if all(r.get("doc_id") is not None for r in records):
            records.sort(key=lambda r: r["doc_id"])
        with self._lock:
            if self._samples.get(task) != records:
                self._samples[task] = records
                self._embeddings.pop(task, None)
                self._provisional.pop(task, None)
        return task

    def tasks(self) -> list[str]:
        """The tasks whose records are registered, in registration order."""
        with self._lock:
            return list(self._samples)

    def records(self, task: str) -> list[dict]:
        with self._lock:
            return list(self._samples[task])

    def provisional_metric(self, task: str | None, metric: str) -> Any:
        """A per-task metric computable before all tasks are in (see module doc); None when it is not
        (yet)."""
        if task is None:
            return None
        with self._lock:
            if task not in self._provisional:
                try:
                    self._provisional[task] = self._provisional_values(task)
                except Exception as exc:
                    logger.warning(f"lmms-emi: {task}: {exc} (the EMI numbers are computed after the run)")
                    self._provisional[task] = {}
            return self._provisional[task].get(metric)

    def _provisional_values(self, task: str) -> dict[str, Any]:
        fixed = self.fixed_estimator()
        if fixed is None or len(self._samples[task]) < 2:
            return {}
        scenario = sc.scenario_for_task(task)
        id_task = sc.id_scenario(scenario.benchmark).task if scenario is not None else None
        if (
            id_task is not None
            and id_task not in self._samples
            and _single_process()
            and self._local.get(id_task)
        ):
            # lmms-eval aggregates the ID task later; in one process its records are all here already
            self.register_samples(list(self._local[id_task].values()))
        tasks = [task] + ([id_task] if id_task not in (None, task) and id_task in self._samples else [])
        run = self._analyze(tasks, fixed)
        return task_values(run.task_result(task), entropy_scale=self.config.entropy_scale)

    # ----------------------------------------------------------------------------------- encoders, estimator
    def embedder(self) -> Embedder:
        """The run's Embedder (built on first use from the options)."""
        with self._lock:
            if self._embedder is None:
                config = self.config.replace(progress=False)  # inside lmms-eval: its own bars only
                self._embedder = Embedder.from_profile(config.encoders, **config.embedder_kwargs())
            return self._embedder

    def encoder_spec(self) -> dict[str, Any]:
        """The run's encoder spec (from the encoders' configs: no model is loaded for it)."""
        return self.embedder().encoder_spec()

    def fixed_estimator(self) -> tuple[CLUB, EstimatorInfo] | None:
        """The estimator when it needs no training (a given checkpoint or a shipped default), else None."""
        with self._lock:
            if self._fixed is False:
                self._fixed = fixed_estimator(self._policy, self.encoder_spec())
            return self._fixed or None

    # ------------------------------------------------------------------------------------------- the end
    def samples(self, tasks: Sequence[str] | None = None) -> dict[str, list[Sample]]:
        """The registered records of ``tasks`` (default: all) as pipeline samples, images read back."""
        with self._lock:
            out: dict[str, list[Sample]] = {}
            for task in self._samples if tasks is None else tasks:
                records = self._samples[task]
                images = self._images(task, [r["doc_id"] for r in records])
                out[task] = [
                    Sample(
                        task=task,
                        doc_id=r["doc_id"] if r["doc_id"] is not None else i,
                        image=img,
                        question=r["question"],
                        response=r["response"],
                        reference=r["reference"],
                    )
                    for i, (r, img) in enumerate(zip(records, images, strict=True))
                ]
            return out

    def finalize(
        self, metadata: Mapping[str, Any] | None = None, *, shift_kinds: Mapping[str, str] | None = None
    ) -> RunAnalysis:
        """Every registered task through the one pipeline (embeddings and a fixed estimator reused);
        ``shift_kinds``: the kinds of the user's own shifted tasks (their YAMLs' metadata).
        Raises ValueError with a one-line message on user errors (too few samples, mismatches, ...)."""
        with self._lock:
            judge = None
            settings = judge_config(self.config)
            if settings is not None:  # the judge step (win rates) over every task's records
                records = {t: self._samples[t] for t in self.tasks()}
                judge = JudgeRun.from_records(Judge(settings), records, progress=self.config.progress)
            run = self._analyze(
                self.tasks(), self.fixed_estimator(), metadata, judge=judge, shift_kinds=shift_kinds
            )
            return with_task_notes(run, self.filled_notes())

    def filled_notes(self) -> dict[str, list[str]]:
        """Per task, a warning counting the answers that are not the model's (:meth:`mark_filled`)."""
        notes: dict[str, list[str]] = {}
        with self._lock:
            for task, records in self._samples.items():
                sources: dict[str, int] = {}
                for r in records:
                    if r.get("filled") is not None:
                        sources[r["filled"]] = sources.get(r["filled"], 0) + 1
                notes[task] = [
                    f"{k} of {len(records)} responses are not the model's: {source}"
                    for source, k in sources.items()
                ]
        return {t: n for t, n in notes.items() if n}

    def _analyze(
        self,
        tasks: Sequence[str],
        estimator: tuple[CLUB, EstimatorInfo] | None,
        metadata: Mapping[str, Any] | None = None,
        judge: JudgeRun | None = None,
        shift_kinds: Mapping[str, str] | None = None,
    ) -> RunAnalysis:
        run = analyze_run(
            self.samples([t for t in tasks if t not in self._embeddings]),
            embedder=self.embedder(),
            policy=self._policy,
            settings=self._settings,
            metadata=metadata,
            embeddings={t: self._embeddings[t] for t in tasks if t in self._embeddings},
            estimator=estimator,
            id_task=self.config.id_task,
            judge=judge,
            shift_kinds=shift_kinds,
        )
        self._embeddings.update(run.embeddings)
        return run

    def _images(self, task: str, doc_ids: list[int | None]) -> list[Any]:
        """The image query of each document, read from the split registered at load time (encoded bytes for
        the plugin's tasks; the task's own ``doc_to_visual`` for foreign ones)."""
        dataset = self._datasets.get(task)
        if dataset is None or any(i is None for i in doc_ids):
            raise ValueError(
                f"task {task!r}: its dataset split was not registered in this process, so the images cannot "
                "be read back (give the task `process_docs` of lmms_emi)"
            )
        foreign = self._foreign.get(task)
        if foreign is None and "image" in dataset.column_names:
            import datasets

            raw = dataset.select_columns(["image"]).cast_column("image", datasets.Image(decode=False))
            return list(raw.select(doc_ids)["image"])
        out = []
        for row in dataset.select(doc_ids):
            visual = foreign.doc_to_visual(row) if foreign is not None else row.get("image")
            out.append(visual[0] if isinstance(visual, (list, tuple)) and visual else visual)
        return out


def with_task_notes(run: RunAnalysis, notes: Mapping[str, Sequence[str]]) -> RunAnalysis:
    """``run`` with ``notes[task]`` first in each task's warnings (every analysis holding the task: what the
    results JSON's ``emi_warnings`` and the report files show) and in the run's warnings."""
    if not notes:
        return run

    def noted(analysis: Any) -> Any:
        tasks = tuple(
            replace(t, warnings=(*notes[t.task], *t.warnings)) if t.task in notes else t
            for t in analysis.tasks
        )
        return replace(analysis, tasks=tasks)

    run.benchmarks = {k: noted(a) for k, a in run.benchmarks.items()}
    run.singles = {k: noted(a) for k, a in run.singles.items()}
    run.warnings[:0] = [f"{task}: {note}" for task, task_notes in notes.items() for note in task_notes]
    return run


def _rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return int(os.environ.get("RANK", "0") or 0)


def _single_process() -> bool:
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return world == 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1


_CURRENT: RunSession | None = None
_CURRENT_LOCK = threading.Lock()


def _config_from_env() -> EMIConfig:
    """The config the planning process exported (:func:`export`), else the environment's options."""
    raw = os.environ.get(RUN_CONFIG_VAR)
    if raw:
        return EMIConfig.from_sources(environ={"LMMS_EMI_OPTIONS": raw})
    return EMIConfig.from_sources()


def export(config: EMIConfig) -> None:
    """Hand ``config`` to every process of the run (through the environment they inherit)."""
    os.environ[RUN_CONFIG_VAR] = config.to_json()


@contextlib.contextmanager
def exported(config: EMIConfig) -> Iterator[None]:
    """:func:`export` for the duration of a run in this process; the environment is restored after."""
    before = os.environ.get(RUN_CONFIG_VAR)
    export(config)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(RUN_CONFIG_VAR, None)
        else:
            os.environ[RUN_CONFIG_VAR] = before


def current() -> RunSession:
    """This process's run session (made from the exported config on first use)."""
    global _CURRENT
    with _CURRENT_LOCK:
        if _CURRENT is None:
            _CURRENT = RunSession()
        return _CURRENT


def reset(config: EMIConfig | None = None, ready: Ready | None = None) -> RunSession:
    """Start a new run session (a new run in the same process) with ``config`` (default: the exported one)
    and what its preflight built."""
    global _CURRENT
    with _CURRENT_LOCK:
        _CURRENT = RunSession(config, ready)
        return _CURRENT

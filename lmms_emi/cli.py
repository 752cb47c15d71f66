"""The ``lmms-emi`` console script.

Subcommands::

    lmms-emi eval ...                 lmms-eval with the plugin's tasks and EMI options
    lmms-emi analyze RUN_DIR          post-hoc report from an lmms-eval --log_samples output folder
    lmms-emi score ...                EMI / EMID / bound from saved response files against a dataset
    lmms-emi train-estimator ...      fit and freeze one CLUB estimator (leaderboards) from saved embeddings
    lmms-emi demo-data DIR            build the offline demo dataset and a demo model's responses

Errors a user can fix (unreachable dataset or encoders, checkpoint/encoder mismatch, too few samples, unknown
scenario, malformed response files) print one line on stderr and exit with status 2; ``--debug`` (or
``LMMS_EMI_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmms_emi import scenarios as sc

__all__ = ["CLIError", "RunRecords", "build_parser", "collect_samples", "main", "read_run"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

QUESTION_COLUMNS = ("question", "prompt", "instruction", "text")
REFERENCE_COLUMNS = ("reference_answer", "gpt_answer", "answer", "reference", "caption")
IMAGE_COLUMNS = ("image", "images", "img")


class CLIError(Exception):
    """A problem the user can fix; printed as one line, no traceback."""


# --------------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------------
def _select_scenarios(benchmark: str, names: Sequence[str] | None) -> list[sc.Scenario]:
    """The benchmark's scenarios, restricted to ``names`` (split or task names, comma lists allowed);
    the ID scenario is always included since EMID is measured against it."""
    try:
        all_scen = sc.scenarios(benchmark)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if not names:
        return all_scen
    wanted = [n.strip() for raw in names for n in raw.split(",") if n.strip()]
    by_name = {s.split: s for s in all_scen} | {s.task: s for s in all_scen}
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise CLIError(
            f"unknown {benchmark} scenario {unknown[0]!r}; valid names look like {all_scen[1].split!r} "
            f"(or the task name {all_scen[1].task!r}); see lmms_emi.scenarios"
        )
    chosen = [by_name[n] for n in wanted]
    id_scen = sc.id_scenario(benchmark)
    if id_scen not in chosen:
        print(
            f"lmms-emi: adding the ID scenario {id_scen.split} (EMID is measured against it)", file=sys.stderr
        )
        chosen.insert(0, id_scen)
    return list(dict.fromkeys(chosen))


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """Silence the hub client's retry warnings while a dataset loads: on failure the user gets one line."""
    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "datasets", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _load_splits(dataset: str | None, benchmark: str, splits: Sequence[str]) -> dict[str, Any]:
    """{split: datasets.Dataset} from a local copy (save_to_disk folder or parquet files) or the hub."""
    import datasets

    from lmms_emi.harness.overrides import DataPathError, local_dataset

    source = dataset or (sc.SYNTHETIC_DATASET if benchmark == "synthetic" else sc.NATURAL_DATASET)
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        if Path(source).expanduser().exists():
            try:
                path, kwargs, available = local_dataset(source)
            except DataPathError as exc:
                raise CLIError(str(exc).replace("--data", "--dataset", 1)) from None
            missing = [s for s in splits if s not in available]
            if missing:
                raise CLIError(
                    f"dataset {source} has no split {missing[0]!r} ({len(missing)} missing; it has "
                    f"{', '.join(available[:4])}{', ...' if len(available) > 4 else ''}); "
                    "restrict with --scenarios"
                )
            if kwargs.get("load_from_disk"):
                dd = datasets.load_from_disk(path)
                return {s: dd[s] for s in splits}
            files = kwargs["data_files"]
            return {s: datasets.load_dataset("parquet", data_files={s: files[s]}, split=s) for s in splits}
        out = {}
        for split in splits:
            try:
                with _quiet_hub():
                    out[split] = datasets.load_dataset(source, split=split)
            except Exception as exc:  # offline / unknown id / missing split: many exception types
                raise CLIError(
                    f"dataset {source!r} is not reachable ({type(exc).__name__}): scoring needs the "
                    "Hugging Face hub (online) or a local path given with --dataset (a "
                    "DatasetDict.save_to_disk folder or parquet files)"
                ) from None
        return out
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _column(ds: Any, candidates: Sequence[str], override: str | None, what: str, split: str) -> str | None:
    if override:
        if override not in ds.column_names:
            raise CLIError(f"split {split}: no column {override!r} (columns: {', '.join(ds.column_names)})")
        return override
    return next((c for c in candidates if c in ds.column_names), None)


@dataclass
class _ColumnNames:
    question: str | None = None
    reference: str | None = None
    image: str | None = None


def collect_samples(
    splits: Mapping[str, Any],
    scenarios: Sequence[sc.Scenario],
    responses_dir: str | Path,
    model: str,
    columns: _ColumnNames | None = None,
    *,
    progress: bool = True,
) -> dict[str, list[Any]]:
    """{task: [Sample]} joining each split's rows with ``model``'s responses (by question_id or row order)."""
    from tqdm.auto import tqdm

    from lmms_emi.analysis import Sample
    from lmms_emi.responses import responses_for_rows

    columns = columns or _ColumnNames()
    out: dict[str, list[Any]] = {}
    for scen in tqdm(scenarios, desc="reading splits", disable=not progress, leave=False):
        ds = splits[scen.split]
        q_col = _column(ds, QUESTION_COLUMNS, columns.question, "question", scen.split)
        r_col = _column(ds, REFERENCE_COLUMNS, columns.reference, "reference", scen.split)
        i_col = _column(ds, IMAGE_COLUMNS, columns.image, "image", scen.split)
        if q_col is None or i_col is None:
            raise CLIError(
                f"split {scen.split}: no {'question' if q_col is None else 'image'} column among "
                f"{', '.join(ds.column_names)} (name it with --question-column / --image-column)"
            )
        ids = [int(q) for q in ds["question_id"]] if "question_id" in ds.column_names else None
        texts = responses_for_rows(responses_dir, scen.split, model, question_ids=ids, n_rows=len(ds))
        questions = list(ds[q_col])
        references = list(ds[r_col]) if r_col else [None] * len(ds)
        images = _encoded_images(ds, i_col)
        out[scen.task] = [
            Sample(scen.task, i, images[i], str(questions[i]), texts[i], references[i])
            for i in range(len(ds))
        ]
    return out


def _encoded_images(ds: Any, column: str, rows: Sequence[int] | None = None) -> list[Any]:
    """The image column as stored (encoded bytes / path dicts, not decoded PIL images): the embedder decodes
    and hashes them, and ``score`` and ``analyze`` see identical inputs."""
    import datasets

    raw = ds.select_columns([column])
    if isinstance(raw.features[column], datasets.Image):
        raw = raw.cast_column(column, datasets.Image(decode=False))
    if rows is not None:
        raw = raw.select(rows)
    return list(raw[column])


def _embedder(ns: argparse.Namespace) -> Any:
    """Build the Embedder of ``--encoders`` with overrides; encoder load failures become CLIError."""
    from lmms_emi.embed import Embedder, EncoderLoadError

    overrides: dict[str, Any] = {"progress": not ns.quiet, "batch_size": ns.batch_size}
    for name in ("vision", "text", "text_layer", "device"):
        value = getattr(ns, name, None)
        if value is not None:
            overrides[name] = value
    if ns.cache_dir is not None:
        overrides["cache_dir"] = False if ns.cache_dir.lower() in ("off", "none", "false") else ns.cache_dir
    try:
        with _quiet_hub():
            return Embedder.from_profile(ns.encoders, **overrides)
    except EncoderLoadError as exc:
        first = str(exc).splitlines()[0]
        head = re.match(r"(could not load .*?'[^']*')", first)  # drop the library's long explanation
        first = head.group(1) if head else first
        raise CLIError(
            f"{first} — the '{ns.encoders}' encoders need the Hugging Face hub or local copies "
            "(--vision/--text DIR), or use --encoders offline"
        ) from None


def _expected_spec(ns: argparse.Namespace) -> dict[str, Any] | None:
    """The encoder spec of a plain profile, known without loading any model (None with overrides)."""
    from lmms_emi.embed import profile_spec

    if any(getattr(ns, n, None) is not None for n in ("vision", "text", "text_layer")):
        return None
    try:
        return profile_spec(ns.encoders)
    except KeyError:
        return None


def _check_estimator_early(ns: argparse.Namespace) -> None:
    """Fail before the (slow) embedding when ``--estimator`` does not fit the chosen encoders."""
    if not ns.estimator or ns.estimator == "fit":
        return
    from lmms_emi.estimators.club import CLUB

    spec = _expected_spec(ns)
    CLUB.from_checkpoint(ns.estimator, encoders=spec)  # CheckpointError / EncoderMismatchError (ValueError)


def _finish(
    ns: argparse.Namespace,
    task_embeddings: Mapping[str, Any],
    encoder_spec: Mapping[str, Any],
    groups: Sequence[tuple[str, str, Sequence[str]]],
    metadata: Mapping[str, Any],
) -> int:
    """Estimator (one for all tasks) -> one analysis + report per group ``(prefix, id_task, tasks)``;
    the embeddings are saved next to the reports (input of ``train-estimator``); print the headlines."""
    from lmms_emi.analysis import EMBEDDINGS_FILE, analyze_shift, resolve_estimator, save_embeddings
    from lmms_emi.report import robustness_summary, write_report

    out = Path(ns.output)
    out.mkdir(parents=True, exist_ok=True)
    save_embeddings(task_embeddings, out / EMBEDDINGS_FILE, encoders=encoder_spec, extra=dict(metadata))
    club, info = resolve_estimator(
        ns.estimator,
        encoder_spec,
        task_embeddings,
        save_dir=out,
        seed=ns.seed,
        steps=ns.steps,
        progress=not ns.quiet,
    )

    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    for prefix, id_task, tasks in groups:
        analysis = analyze_shift(
            {t: task_embeddings[t] for t in tasks},
            id_task,
            club,
            entropy_scale=ns.entropy_scale,
            n_resamples=ns.bootstrap,
            confidence_level=ns.confidence,
            seed=ns.seed,
        ).with_context(estimator=info, metadata=metadata)
        paths = write_report(analysis, out, prefix=prefix)
        s = robustness_summary(analysis)
        print(
            f"{s['model'] or 'model'} [{id_task}]: ID EMI {f(s['id_emi'])}, "
            f"mean EMID {f(s['mean_emid'])} over "
            f"{s['n_ood_tasks']} shifted task(s), Pearson r(EMID, bound) {f(s['pearson_r'])}"
        )
        print(f"reports: {', '.join(str(p) for p in paths.values())}")
    if info.comparability == "run":
        print(f"lmms-emi: note: {info.note}", file=sys.stderr)
    return EXIT_OK


# --------------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------------
def cmd_eval(argv: list[str]) -> int:
    from lmms_emi.harness.launch import run_eval

    return int(run_eval(argv))


def cmd_score(ns: argparse.Namespace) -> int:
    scenarios = _select_scenarios(ns.benchmark, ns.scenarios)
    if not ns.scenarios and ns.dataset and Path(ns.dataset).expanduser().exists():
        scenarios = _available_scenarios(ns.dataset, scenarios)
    if not Path(ns.responses).is_dir():
        raise CLIError(f"--responses {ns.responses}: no such folder")
    _check_estimator_early(ns)
    splits = _load_splits(ns.dataset, ns.benchmark, [s.split for s in scenarios])
    model = ns.model or _only_model(ns.responses, [s.split for s in scenarios])
    columns = _ColumnNames(ns.question_column, ns.reference_column, ns.image_column)
    samples = collect_samples(splits, scenarios, ns.responses, model, columns, progress=not ns.quiet)
    _check_sizes(samples)
    embedder = _embedder(ns)
    from lmms_emi.analysis import embed_tasks

    task_embeddings = embed_tasks(embedder, samples)
    metadata = {
        "model": model,
        "benchmark": ns.benchmark,
        "dataset": ns.dataset or scenarios[0].dataset,
        "responses": str(ns.responses),
        "encoders": ns.encoders,
    }
    groups = [("emi_report", scenarios[0].task, list(task_embeddings))]
    return _finish(ns, task_embeddings, embedder.encoder_spec(), groups, metadata)


def _available_scenarios(dataset: str, scenarios: list[sc.Scenario]) -> list[sc.Scenario]:
    """The scenarios a local dataset copy holds (all of them are scored when --scenarios is not given)."""
    from lmms_emi.harness.overrides import DataPathError, local_dataset

    try:
        available = set(local_dataset(dataset)[2])
    except DataPathError as exc:
        raise CLIError(str(exc).replace("--data", "--dataset", 1)) from None
    present = [s for s in scenarios if s.split in available]
    if scenarios[0] not in present:
        raise CLIError(f"dataset {dataset} has no split {scenarios[0].split!r} (the ID scenario EMID needs)")
    if len(present) < len(scenarios):
        print(
            f"lmms-emi: {dataset} holds {len(present)} of the {len(scenarios)} {scenarios[0].benchmark} "
            "scenarios; scoring those",
            file=sys.stderr,
        )
    return present


def _only_model(responses: str | Path, splits: Sequence[str]) -> str:
    from lmms_emi.responses import list_models

    models = list_models(responses, splits)
    if len(models) != 1:
        found = ", ".join(models) or "none with files for every scenario"
        raise CLIError(f"say which model to score with --model (found in {responses}: {found})")
    return models[0]


def _check_sizes(samples: Mapping[str, Sequence[Any]]) -> None:
    for task, rows in samples.items():
        if len(rows) < 2:
            raise CLIError(f"task {task!r} has {len(rows)} sample(s); EMI needs at least 2")


def cmd_analyze(ns: argparse.Namespace) -> int:
    """Post-hoc report of an lmms-eval run: the per-sample records stored under the metric key of
    ``*_samples_<task>.jsonl`` (question, response, reference, doc_id) plus the images read back from each
    task's dataset (as configured in the results JSON, or ``--dataset``)."""
    from lmms_emi.analysis import embed_tasks

    run = read_run(ns.run_dir, metric=ns.metric)
    _check_sizes(run.records)
    _check_estimator_early(ns)
    samples = run.samples(dataset=ns.dataset, progress=not ns.quiet)
    embedder = _embedder(ns)
    task_embeddings = embed_tasks(embedder, samples)
    groups: list[tuple[str, str, list[str]]] = []
    others: list[str] = []
    by_benchmark: dict[str, list[str]] = {}
    for task in run.records:
        scenario = sc.scenario_for_task(task)
        (by_benchmark.setdefault(scenario.benchmark, []) if scenario else others).append(task)
    for benchmark, members in by_benchmark.items():
        id_task = sc.id_scenario(benchmark).task
        if id_task not in members:
            print(
                f"lmms-emi: {benchmark}: the ID task {id_task} is not in this run, so no EMID / bound "
                f"for {len(members)} task(s)",
                file=sys.stderr,
            )
            others.extend(members)
            continue
        order = {s.task: i for i, s in enumerate(sc.scenarios(benchmark))}
        groups.append((f"emi_report_{benchmark}", id_task, sorted(members, key=order.__getitem__)))
    groups.extend((f"emi_report_{task}", task, [task]) for task in others)
    metadata = {"model": ns.model or run.model, "run_dir": str(ns.run_dir), "results_file": run.results_file}
    ns.output = ns.output or str(Path(ns.run_dir) / "emi_report")
    return _finish(ns, task_embeddings, embedder.encoder_spec(), groups, metadata)


@dataclass
class RunRecords:
    """The EMI records of one lmms-eval run folder, by task (sorted by doc_id), and the run's task configs."""

    records: dict[str, list[dict[str, Any]]]
    configs: dict[str, dict[str, Any]]
    model: str | None
    results_file: str | None

    def samples(self, *, dataset: str | None = None, progress: bool = True) -> dict[str, list[Any]]:
        """``analysis.Sample`` lists with each document's image read back from the task's dataset split."""
        from tqdm.auto import tqdm

        from lmms_emi.analysis import Sample

        out: dict[str, list[Any]] = {}
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
            ds = _load_splits(dataset, scenario.benchmark, [scenario.split])[scenario.split]
        else:
            ds = _dataset_from_config(task, config, split)
        if doc_ids and max(doc_ids) >= len(ds):
            raise CLIError(
                f"task {task!r}: doc_id {max(doc_ids)} is beyond the {len(ds)} rows of its dataset split "
                "(is --dataset the data the run used?)"
            )
        if "question_id" in ds.column_names:  # guard against a different dataset than the run's
            qids = [int(q) for q in ds.select(doc_ids)["question_id"]]
            for r, q in zip(records, qids, strict=True):
                if r.get("question_id") is not None and int(r["question_id"]) != q:
                    raise CLIError(
                        f"task {task!r}: doc_id {r['doc_id']} has question_id {r['question_id']} in the run "
                        f"but {q} in the dataset (is --dataset the data the run used?)"
                    )
        column = next((c for c in IMAGE_COLUMNS if c in ds.column_names), None)
        if column is None:
            raise CLIError(
                f"task {task!r}: its dataset split has no image column ({', '.join(ds.column_names)})"
            )
        return _encoded_images(ds, column, doc_ids)


def _dataset_from_config(task: str, config: Mapping[str, Any], split: str | None) -> Any:
    """The task's split as lmms-eval loaded it (dataset_path + dataset_kwargs of the results JSON)."""
    import datasets

    path = config.get("dataset_path")
    if not path or not split:
        raise CLIError(
            f"task {task!r}: the run's results JSON does not say where its data is; pass --dataset PATH"
        )
    kwargs = dict(config.get("dataset_kwargs") or {})
    try:
        if kwargs.pop("load_from_disk", False):
            return datasets.load_from_disk(path)[split]
        kwargs = {k: v for k, v in kwargs.items() if k in ("data_files", "name", "revision", "data_dir")}
        with _quiet_hub():
            return datasets.load_dataset(path, split=split, **kwargs)
    except Exception as exc:  # offline / moved / unknown id: many exception types
        raise CLIError(
            f"task {task!r}: dataset {path!r} is not reachable ({type(exc).__name__}); the images need the "
            "Hugging Face hub (online) or a local copy given with --dataset"
        ) from None


def read_run(run_dir: str | Path, *, metric: str = "emi") -> RunRecords:
    """Read ``*_samples_<task>.jsonl`` (latest date of the folder) and the matching ``*_results.json``.

    Each line must carry, under ``metric``, the record of :func:`lmms_emi.harness.runtime.make_record`
    (``question``, ``response``, ``reference``, ``doc_id``); files without it (other tasks) are skipped.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise CLIError(f"{root}: no such folder")
    files = sorted(root.rglob("*_samples_*.jsonl"))
    if not files:
        raise CLIError(f"{root} holds no *_samples_<task>.jsonl files (run lmms-eval with --log_samples)")
    dates = sorted({f.name.split("_samples_", 1)[0] for f in files})
    if len(dates) > 1:
        print(f"lmms-emi: {root} holds {len(dates)} runs; reading the latest ({dates[-1]})", file=sys.stderr)
    latest = [f for f in files if f.name.split("_samples_", 1)[0] == dates[-1]]
    records: dict[str, list[dict[str, Any]]] = {}
    for path in latest:
        task = path.name.split("_samples_", 1)[1].removesuffix(".jsonl")
        rows = _read_records(path, metric)
        if rows is not None:
            rows.sort(key=lambda r: r["doc_id"])
            records[task] = rows
    if not records:
        raise CLIError(
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
            raise CLIError(f"{results_files[-1]}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        configs = data.get("configs", {}) or {}
        cfg = data.get("config", {}) or {}
        model = cfg.get("model_name") or _model_from_args(cfg.get("model_args")) or cfg.get("model")
    return RunRecords(records, configs, model, results_file)


def _model_from_args(model_args: Any) -> str | None:
    """``pretrained=org/name,...`` or ``model_name=...`` -> a readable model name."""
    if isinstance(model_args, dict):
        value = model_args.get("model_name") or model_args.get("pretrained")
        return str(value) if value else None
    if not isinstance(model_args, str):
        return None
    pairs = dict(p.split("=", 1) for p in model_args.split(",") if "=" in p)
    return pairs.get("model_name") or pairs.get("pretrained")


def _read_records(path: Path, metric: str) -> list[dict[str, Any]] | None:
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CLIError(f"{path}:{line_no}: invalid JSON ({exc.msg})") from None
            rec = obj.get(metric)
            if rec is None and not rows and line_no == 1:
                return None  # a task without the EMI metric
            if not isinstance(rec, dict) or not {"question", "response"} <= set(rec):
                raise CLIError(
                    f"{path}:{line_no}: no EMI record under {metric!r} (question, response, doc_id)"
                )
            doc_id = rec.get("doc_id", obj.get("doc_id"))
            if doc_id is None:
                raise CLIError(f"{path}:{line_no}: the record has no doc_id")
            rows.append({**rec, "doc_id": int(doc_id)})
    return rows or None


def _embedding_files(paths: Sequence[str]) -> list[Path]:
    from lmms_emi.analysis import EMBEDDINGS_FILE

    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            found = sorted(p.rglob(EMBEDDINGS_FILE))
            if not found:
                raise CLIError(f"{p} holds no {EMBEDDINGS_FILE} (written by `lmms-emi score` / `analyze`)")
            files.extend(found)
        else:
            raise CLIError(f"{p}: no such file or folder")
    return files


def cmd_train_estimator(ns: argparse.Namespace) -> int:
    """Pool the (query, response) and (query, reference) pairs of every task of every given run (same
    encoders required), fit one CLUB and save it with its manifest: the frozen estimator of a leaderboard."""
    from lmms_emi.analysis import fit_pooled_estimator, load_embeddings
    from lmms_emi.estimators.club import encoder_mismatches

    pooled: dict[str, Any] = {}
    spec: dict[str, Any] | None = None
    first: Path | None = None
    for i, path in enumerate(_embedding_files(ns.inputs)):
        try:
            tasks, file_spec = load_embeddings(path)
        except (ValueError, FileNotFoundError) as exc:
            raise CLIError(str(exc)) from None
        if spec is None:
            spec, first = file_spec, path
        elif encoder_mismatches(spec, file_spec):
            problems = "; ".join(encoder_mismatches(spec, file_spec)[:3])
            raise CLIError(f"{path} used other encoders than {first}: {problems}")
        pooled.update({f"{i}:{task}": emb for task, emb in tasks.items()})
    assert spec is not None and first is not None
    out = Path(ns.output)
    if out.suffix != ".safetensors":
        out = out / "club.safetensors" if out.is_dir() or not out.suffix else out.with_suffix(".safetensors")
    _club, saved = fit_pooled_estimator(
        pooled,
        spec,
        save_path=out,
        seed=ns.seed,
        steps=ns.steps,
        hidden_size=ns.hidden_size,
        progress=not ns.quiet,
    )
    n_pairs = sum(2 * e.n for e in pooled.values() if e.z_model is not None and e.z_ref is not None)
    print(
        f"estimator: {saved} (fitted on {len(pooled)} tasks, ~{n_pairs} pairs; manifest records the encoders)"
    )
    print(f"use it with: lmms-emi score ... --estimator {saved}  (or lmms-emi eval ... --estimator {saved})")
    return EXIT_OK


def cmd_demo_data(ns: argparse.Namespace) -> int:
    from lmms_emi.demo_data import build_demo_dataset, write_demo_responses

    out = Path(ns.dir)
    try:
        dataset_dir = build_demo_dataset(
            out / "dataset",
            benchmark=ns.benchmark,
            scenarios=[n for raw in ns.scenarios or [] for n in raw.split(",") if n] or None,
            n_images=ns.n_images,
            questions_per_image=ns.questions_per_image,
            seed=ns.seed,
        )
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    files = write_demo_responses(dataset_dir, out / "responses", ns.model_name, ns.seed)
    print(f"dataset: {dataset_dir}")
    print(f"responses: {out / 'responses'} ({len(files)} files, model {ns.model_name!r})")
    print(
        f"try: lmms-emi score --dataset {dataset_dir} --responses {out / 'responses'} "
        f"--model {ns.model_name} "
        f"--benchmark {ns.benchmark} --encoders offline --output {out / 'report'}"
    )
    return EXIT_OK


# --------------------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------------------
def _add_common(p: argparse.ArgumentParser, *, estimator: bool = True) -> None:
    g = p.add_argument_group("encoders and estimator")
    g.add_argument("--encoders", default="paper", help="encoder profile: paper (default) | offline")
    g.add_argument("--vision", help="vision encoder override (registry name, hub id or local folder)")
    g.add_argument("--text", help="text encoder override")
    g.add_argument("--text-layer", type=int, help="hidden layer of the text encoder")
    g.add_argument("--device", help="torch device for encoders and estimator (default: cuda if available)")
    g.add_argument("--batch-size", type=int, default=32, help="embedding batch size")
    g.add_argument("--cache-dir", help="embedding cache folder, or 'off'")
    if estimator:
        g.add_argument(
            "--estimator",
            help="CLUB checkpoint (project format or the paper's CLUB_global.pt); 'fit' to fit one on this "
            "run. Default: a shipped checkpoint matching the encoders, else fit one on this run",
        )
    g.add_argument("--steps", type=int, default=5000, help="CLUB training steps when one is fitted")
    a = p.add_argument_group("analysis")
    a.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs (0: none)")
    a.add_argument("--confidence", type=float, default=0.95, help="confidence level of the intervals")
    a.add_argument("--entropy-scale", type=float, help="Ĥ for the Theorem 4.5 form of the bound")
    a.add_argument("--seed", type=int, default=0)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmms-emi",
        description="Effective mutual information (EMI) of multimodal LLMs under distribution shift.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    sub.add_parser(
        "eval",
        help="run lmms-eval with the plugin's tasks (arguments go to lmms-eval; see `lmms-emi eval --help`)",
        add_help=False,
    )

    p = sub.add_parser("analyze", help="report from an lmms-eval output folder written with --log_samples")
    p.add_argument("run_dir", help="lmms-eval --output_path folder (holding *_samples_<task>.jsonl)")
    p.add_argument("--output", help="report folder (default: RUN_DIR/emi_report)")
    p.add_argument("--metric", default="emi", help="metric key holding the per-sample records (default: emi)")
    p.add_argument("--model", help="model name for the report")
    p.add_argument("--dataset", help="local copy of the data the run used (default: the run's task configs)")
    _add_common(p)

    p = sub.add_parser("score", help="EMI / EMID / bound from saved response files against a dataset")
    p.add_argument(
        "--dataset",
        help="hub id or local path (save_to_disk folder or parquet files); "
        "default: the benchmark's hub dataset",
    )
    p.add_argument("--responses", required=True, help="folder of <scenario>_<model>.jsonl files")
    p.add_argument("--model", help="model name in the file names (default: the only one present)")
    p.add_argument("--benchmark", choices=("synthetic", "natural"), default="synthetic")
    p.add_argument("--scenarios", nargs="+", help="subset of scenarios (split or task names; commas allowed)")
    p.add_argument("--output", required=True, help="report folder")
    p.add_argument("--question-column", help="dataset column of the text query")
    p.add_argument("--reference-column", help="dataset column of the reference answer")
    p.add_argument("--image-column", help="dataset column of the image")
    _add_common(p)

    p = sub.add_parser(
        "train-estimator",
        help="fit and freeze one CLUB estimator from the embeddings saved by score/analyze runs",
        description="Pools the (query, response) and (query, reference) pairs of every task of every run "
        "(all embedded with the same encoders), fits one CLUB and saves it with a manifest. Score every "
        "model of a leaderboard with this one checkpoint (--estimator) to make their EMI comparable.",
    )
    p.add_argument("inputs", nargs="+", help="report folders or emi_embeddings.safetensors files")
    p.add_argument("--output", required=True, help="checkpoint file (.safetensors) or folder")
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--hidden-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--debug", action="store_true")

    p = sub.add_parser("demo-data", help="build the offline demo dataset and a demo model's responses")
    p.add_argument("dir", help="output folder (gets dataset/ and responses/)")
    p.add_argument("--benchmark", choices=("synthetic", "natural"), default="synthetic")
    p.add_argument("--scenarios", nargs="+", help="subset of scenarios (split names)")
    p.add_argument("--n-images", type=int, default=6)
    p.add_argument("--questions-per-image", type=int, default=2)
    p.add_argument("--model-name", default="demo-model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--debug", action="store_true")
    return parser


_COMMANDS = {
    "analyze": cmd_analyze,
    "score": cmd_score,
    "train-estimator": cmd_train_estimator,
    "demo-data": cmd_demo_data,
}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lmms-emi``; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "eval":
        return cmd_eval(args[1:])
    parser = build_parser()
    ns = parser.parse_args(args)
    if ns.command is None:
        parser.print_help()
        return EXIT_USAGE
    debug = ns.debug or os.environ.get("LMMS_EMI_DEBUG", "") not in ("", "0")
    from lmms_emi.embed import EmbedInputError, EncoderLoadError

    try:
        return _COMMANDS[ns.command](ns)
    except KeyboardInterrupt:
        print("lmms-emi: interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, FileNotFoundError, EncoderLoadError, EmbedInputError) as exc:
        if debug:
            raise
        print(f"lmms-emi {ns.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

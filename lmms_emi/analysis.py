"""Orchestration: samples -> embeddings -> estimator -> EMI / EMID / bounds / correlations.

Used by the lmms-eval harness, the ``lmms-emi`` CLI and the report writer. The math lives in
:mod:`lmms_emi.emi`; this module only decides *what* to compute for which task and gathers the numbers.

For the in-distribution (ID) task P and each out-of-distribution (OOD) task Q:

    EMI(T)      = Î(z_x; z_ŷ) − Î(z_x; z_y)          on task T (CLUB estimate, nats)
    EMID(P, Q)  = EMI(P) − EMI(Q)
    bound       = √D_v + √D_t + D_P^¼ + D_Q^¼        (scale-adjusted; D = RJSD)
    theorem     = Ĥ(√D_v + √D_t) + 8(D_P + D_Q)^¼     (Theorem 4.5, when an entropy scale Ĥ is given)
    partial     = √D_v + √D_t                         (needs no references)

and over the OOD tasks the Pearson r (the paper's headline check), Spearman ρ and Kendall τ between EMID and
its bound.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmms_emi import emi as emi_lib
from lmms_emi._io import atomic_write
from lmms_emi.emi import TaskEmbeddings
from lmms_emi.scenarios import scenario_for_task

__all__ = [
    "EMBEDDINGS_FILE",
    "ESTIMATOR_SUFFIXES",
    "FITTED_CHECKPOINT_NAME",
    "Correlation",
    "EstimatorInfo",
    "Sample",
    "ShiftAnalysis",
    "TaskResult",
    "analyze_shift",
    "atomic_write",
    "correlate",
    "default_checkpoint_dirs",
    "embed_tasks",
    "find_default_checkpoint",
    "fit_pooled_estimator",
    "json_ready",
    "load_embeddings",
    "pooled_pairs",
    "resolve_estimator",
    "save_embeddings",
    "shift_kind",
    "task_seed",
]

ESTIMATOR_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
FITTED_CHECKPOINT_NAME = "club_fitted.safetensors"
EMBEDDINGS_FILE = "emi_embeddings.safetensors"  # per-task embeddings saved next to a report


# --------------------------------------------------------------------------------------------------------
# Samples and embeddings
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    """One evaluated document: its task, id, image query (PIL image, bytes, path or None), text query, the
    model's response and the reference answer (None when the task has no references)."""

    task: str
    doc_id: int | str
    image: Any
    question: str
    response: str | None
    reference: str | None = None


def _sorted_samples(task: str, samples: Sequence[Sample]) -> list[Sample]:
    """Samples in doc_id order (lmms-eval gathers them rank-major); duplicate ids are an error."""
    try:
        ordered = sorted(samples, key=lambda s: s.doc_id)
    except TypeError:  # mixed id types: keep the given order
        ordered = list(samples)
    ids = [s.doc_id for s in ordered]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"task {task!r}: doc_id {dup!r} appears more than once")
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
    layout: list[tuple[str, int, int, int, int | None, int | None]] = []
    for task, raw in samples_by_task.items():
        samples = _sorted_samples(task, raw)
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
        texts.extend(str(s.question) for s in samples)
        r_start = None
        if responses is not None:
            r_start = len(texts)
            texts.extend(responses)
        y_start = None
        if references is not None:
            y_start = len(texts)
            texts.extend(references)
        layout.append((task, n, img_start, q_start, r_start, y_start))
    z_images = torch.as_tensor(_embed_images(embedder, images, image_ids))
    z_texts = torch.as_tensor(embedder.embed_texts(texts)) if texts else torch.empty(0)
    out: dict[str, TaskEmbeddings] = {}
    for task, n, img_start, q_start, r_start, y_start in layout:
        out[task] = TaskEmbeddings(
            z_v=z_images[img_start : img_start + n],
            z_t=z_texts[q_start : q_start + n],
            z_model=None if r_start is None else z_texts[r_start : r_start + n],
            z_ref=None if y_start is None else z_texts[y_start : y_start + n],
        )
    return out


def _embed_images(embedder: Any, images: list[Any], ids: list[str]) -> Any:
    """``embedder.embed_images`` with sample ids for its error messages when it accepts them."""
    import inspect

    try:
        accepts_ids = "sample_ids" in inspect.signature(embedder.embed_images).parameters
    except (TypeError, ValueError):
        accepts_ids = False
    if accepts_ids:
        return embedder.embed_images(images, sample_ids=ids)
    return embedder.embed_images(images)


def save_embeddings(
    task_embeddings: Mapping[str, TaskEmbeddings],
    path: str | Path,
    *,
    encoders: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Save per-task embeddings as one safetensors file (keys ``<task>/z_v`` ...), atomically; the encoder
    spec and ``extra`` go into its metadata. These files feed ``lmms-emi train-estimator``."""
    import json

    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for task, emb in task_embeddings.items():
        for name, z in zip(("z_v", "z_t", "z_model", "z_ref"), emb, strict=True):
            if z is not None:
                tensors[f"{task}/{name}"] = torch.as_tensor(z).detach().to("cpu", torch.float32).clone()
    metadata = {
        "format": "lmms-emi-embeddings",
        "version": "1",
        "encoders": json.dumps(dict(encoders or {}), sort_keys=True),
        "tasks": json.dumps(list(task_embeddings)),
        "extra": json.dumps(dict(extra or {}), sort_keys=True),
    }
    path = Path(path)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return path


def load_embeddings(path: str | Path) -> tuple[dict[str, TaskEmbeddings], dict[str, Any]]:
    """Read a file written by :func:`save_embeddings`: (task embeddings in saved order, encoder spec)."""
    import json

    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embeddings file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise ValueError(f"{path} is not an lmms-emi embeddings file ({type(exc).__name__}: {exc})") from None
    if meta.get("format") != "lmms-emi-embeddings":
        raise ValueError(f"{path} is not an lmms-emi embeddings file (no format marker)")
    out: dict[str, TaskEmbeddings] = {}
    for task in json.loads(meta.get("tasks", "[]")):
        get = lambda name, task=task: tensors.get(f"{task}/{name}")  # noqa: E731
        out[task] = TaskEmbeddings(get("z_v"), get("z_t"), get("z_model"), get("z_ref"))
    return out, json.loads(meta.get("encoders", "{}"))


# --------------------------------------------------------------------------------------------------------
# Estimator: given checkpoint, shipped default, or fitted on this run
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EstimatorInfo:
    """Where the CLUB estimator came from and how far its values can be compared.

    ``source``: "checkpoint" (a path given), "default" (shipped in ``estimator_ckpt/``) or "fitted" (fitted
    on this run's pooled pairs). ``comparability``: "global" — comparable with every run using the same
    checkpoint and encoders; "run" — comparable only within this run.
    """

    source: str
    path: str | None
    comparability: str
    encoders: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_checkpoint_dirs() -> list[Path]:
    """Folders searched for a shipped estimator: ``<package>/estimator_ckpt`` (installed wheel) and
    ``<checkout>/estimator_ckpt`` (source checkout), the ones that exist."""
    import lmms_emi

    pkg = Path(lmms_emi.__file__).resolve().parent
    dirs = [pkg / "estimator_ckpt", pkg.parent / "estimator_ckpt"]
    return [d for d in dirs if d.is_dir()]


def find_default_checkpoint(encoder_spec: Mapping[str, Any]) -> tuple[Any, Path] | None:
    """The first checkpoint in :func:`default_checkpoint_dirs` whose manifest matches ``encoder_spec``
    (files in name order, safetensors first); (CLUB, path) or None."""
    from lmms_emi.estimators.club import CLUB, CheckpointError

    for folder in default_checkpoint_dirs():
        files = sorted(
            (p for p in folder.iterdir() if p.is_file() and p.suffix in ESTIMATOR_SUFFIXES),
            key=lambda p: (p.suffix != ".safetensors", p.name),
        )
        for path in files:
            try:
                return CLUB.from_checkpoint(path, encoders=dict(encoder_spec)), path
            except CheckpointError:
                continue  # another encoder pair, or not ours
    return None


def pooled_pairs(task_embeddings: Mapping[str, TaskEmbeddings]) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's estimator training set: (z_x, z_ŷ) and (z_x, z_y) pairs of all tasks, concatenated."""
    xs, ys = [], []
    for task, emb in task_embeddings.items():
        try:
            query = emb.query
        except ValueError as exc:
            raise ValueError(f"task {task!r}: {exc}") from None
        for z in (emb.z_model, emb.z_ref):
            if z is not None:
                xs.append(query)
                ys.append(torch.nn.functional.normalize(torch.as_tensor(z, dtype=torch.float32), dim=-1))
    if not xs:
        raise ValueError("no task has responses or references: nothing to fit the estimator on")
    return torch.cat(xs), torch.cat(ys)


def fit_pooled_estimator(
    task_embeddings: Mapping[str, TaskEmbeddings],
    encoder_spec: Mapping[str, Any],
    *,
    save_path: str | Path | None = None,
    seed: int = 0,
    steps: int = 5000,
    hidden_size: int = 500,
    progress: bool = True,
) -> tuple[Any, Path | None]:
    """Fit one CLUB on :func:`pooled_pairs` of all tasks and (optionally) save it with its manifest."""
    from lmms_emi.estimators.club import CLUB

    x, y = pooled_pairs(task_embeddings)
    club = CLUB(x_dim=x.shape[1], y_dim=y.shape[1], hidden_size=hidden_size)
    club.fit(x, y, steps=steps, seed=seed, progress=progress)
    saved = None
    if save_path is not None:
        saved = club.save(save_path, club.make_manifest(dict(encoder_spec)))
    return club, saved


def resolve_estimator(
    estimator: str | Path | None,
    encoder_spec: Mapping[str, Any],
    pooled: Mapping[str, TaskEmbeddings],
    *,
    save_dir: str | Path | None = None,
    seed: int = 0,
    steps: int = 5000,
    progress: bool = True,
) -> tuple[Any, EstimatorInfo]:
    """Pick the CLUB estimator.

    1. ``estimator`` is a path: load it, checking its manifest against ``encoder_spec``
       (:class:`~lmms_emi.estimators.club.EncoderMismatchError` on a mismatch).
    2. ``estimator`` is None: a shipped checkpoint in ``estimator_ckpt/`` trained on these encoders.
    3. Otherwise (or ``estimator == "fit"``): fit one CLUB on the pooled (query, response) and
       (query, reference) pairs of all tasks — the paper's protocol — save it to
       ``save_dir/club_fitted.safetensors`` and mark the values comparable only within this run.
    """
    from lmms_emi.estimators.club import CLUB

    spec = dict(encoder_spec)
    if estimator is not None and str(estimator) != "fit":
        path = Path(estimator)
        club = CLUB.from_checkpoint(path, encoders=spec)
        manifest = asdict(club.manifest) if club.manifest is not None else None
        note = (
            "" if manifest else "plain state dict without manifest: assumed trained on the paper's encoders"
        )
        return club, EstimatorInfo("checkpoint", str(path), "global", spec, manifest, note)
    if estimator is None:
        found = find_default_checkpoint(spec)
        if found is not None:
            club, path = found
            manifest = asdict(club.manifest) if club.manifest is not None else None
            return club, EstimatorInfo("default", str(path), "global", spec, manifest, "shipped estimator")
    save_path = Path(save_dir) / FITTED_CHECKPOINT_NAME if save_dir is not None else None
    club, saved = fit_pooled_estimator(
        pooled, spec, save_path=save_path, seed=seed, steps=steps, progress=progress
    )
    manifest = asdict(club.make_manifest(spec))
    note = (
        "estimator fitted on this run's pooled (query, response) and (query, reference) pairs: EMI values "
        "are comparable only within this run; freeze one with `lmms-emi train-estimator` to compare runs"
    )
    return club, EstimatorInfo("fitted", None if saved is None else str(saved), "run", spec, manifest, note)


# --------------------------------------------------------------------------------------------------------
# Shift analysis
# --------------------------------------------------------------------------------------------------------
def shift_kind(task: str, id_task: str) -> str:
    """ "id" for the ID task, else the scenario's shift kind ("visual", "text", "joint"), else "ood"."""
    if task == id_task:
        return "id"
    scenario = scenario_for_task(task)
    if scenario is None:
        from lmms_emi import scenarios as sc

        for benchmark in ("synthetic", "natural"):
            for s in sc.scenarios(benchmark):
                if s.split == task:
                    scenario = s
    if scenario is None or scenario.is_id:
        return "ood"
    return scenario.shift_kind


@dataclass(frozen=True)
class Correlation:
    """Correlation between EMID and a bound over the OOD tasks (p-values two-sided)."""

    n_tasks: int
    pearson_r: float
    pearson_p: float
    spearman_rho: float
    spearman_p: float
    kendall_tau: float
    kendall_p: float
    tasks: tuple[str, ...] = ()


def correlate(x: Sequence[float], y: Sequence[float], tasks: Sequence[str] = ()) -> Correlation | None:
    """Pearson, Spearman and Kendall correlations via scipy.stats; None with fewer than 3 points.

    A constant series gives NaN coefficients (correlation undefined), reported as None in ``to_dict``.
    """
    import warnings

    from scipy import stats

    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} values but y has {len(y)}")
    if len(x) < 3:
        return None
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConstantInputWarning: reported as NaN
        pr = stats.pearsonr(xa, ya)
        sr = stats.spearmanr(xa, ya)
        kt = stats.kendalltau(xa, ya)
    return Correlation(
        n_tasks=len(xa),
        pearson_r=float(pr.statistic),
        pearson_p=float(pr.pvalue),
        spearman_rho=float(sr.statistic),
        spearman_p=float(sr.pvalue),
        kendall_tau=float(kt.statistic),
        kendall_p=float(kt.pvalue),
        tasks=tuple(tasks),
    )


@dataclass(frozen=True)
class TaskResult:
    """Numbers of one task. EMID, bounds and JSD terms are relative to the ID task (None on the ID row);
    EMI fields are None when the task has no references or no responses."""

    task: str
    shift_kind: str
    n: int
    emi: float | None = None
    mi_model: float | None = None
    mi_ref: float | None = None
    emi_ci: tuple[float, float] | None = None
    emid: float | None = None
    emid_ci: tuple[float, float] | None = None
    bound: float | None = None
    bound_theorem: float | None = None
    partial_bound: float | None = None
    jsd_visual: float | None = None
    jsd_text: float | None = None
    jsd_response_p: float | None = None
    jsd_response_q: float | None = None

    @property
    def is_id(self) -> bool:
        return self.shift_kind == "id"


def json_ready(value: Any) -> Any:
    """JSON-ready copy: non-finite floats become None, tuples lists, numpy scalars Python numbers."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


@dataclass(frozen=True)
class ShiftAnalysis:
    """EMI of every task, EMID and bounds of every OOD task against ``id_task``, and the correlations.

    ``correlations`` maps the bound's name ("bound", "partial_bound", and "bound_theorem" when an entropy
    scale was given) to its :class:`Correlation` with EMID over the OOD tasks, or None (fewer than 3).
    """

    id_task: str
    tasks: tuple[TaskResult, ...]
    correlations: dict[str, Correlation | None]
    settings: dict[str, Any] = field(default_factory=dict)
    estimator: EstimatorInfo | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def correlation(self) -> Correlation | None:
        """EMID vs the scale-adjusted bound: the paper's headline check."""
        return self.correlations.get("bound")

    def task(self, name: str) -> TaskResult:
        for t in self.tasks:
            if t.task == name:
                return t
        raise KeyError(name)

    @property
    def ood_tasks(self) -> list[TaskResult]:
        return [t for t in self.tasks if not t.is_id]

    def with_context(
        self, *, estimator: EstimatorInfo | None = None, metadata: Mapping[str, Any] | None = None
    ) -> ShiftAnalysis:
        """A copy carrying the estimator info and extra metadata (model name, run dir, ...)."""
        from dataclasses import replace

        merged = {**self.metadata, **dict(metadata or {})}
        return replace(self, estimator=estimator or self.estimator, metadata=merged)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready and deterministic for a seed (no timestamps)."""
        return json_ready(
            {
                "id_task": self.id_task,
                "settings": self.settings,
                "estimator": None if self.estimator is None else self.estimator.to_dict(),
                "metadata": self.metadata,
                "tasks": [asdict(t) for t in self.tasks],
                "correlations": {k: None if v is None else asdict(v) for k, v in self.correlations.items()},
            }
        )


def task_seed(seed: int, task: str) -> int:
    """Per-task bootstrap seed: independent of task order and of PYTHONHASHSEED."""
    return (seed * 1_000_003 + zlib.crc32(task.encode())) % (2**32)


def _with_task(task: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except ValueError as exc:
        raise ValueError(f"task {task!r}: {exc}") from None


def analyze_shift(
    task_embeddings: Mapping[str, TaskEmbeddings],
    id_task: str,
    club: Any,
    *,
    entropy_scale: float | None = None,
    n_resamples: int = 1000,
    confidence_level: float = 0.95,
    seed: int = 0,
) -> ShiftAnalysis:
    """EMI per task, EMID / bounds per OOD task against ``id_task``, and their correlations.

    Confidence intervals are percentile bootstraps over samples with the estimator fixed (``n_resamples=0``
    skips them). Tasks without references (or responses) get EMI None but still the partial bound.
    Raises ValueError naming the task for a task with fewer than 2 samples or inconsistent embeddings.
    """
    if id_task not in task_embeddings:
        raise ValueError(
            f"ID task {id_task!r} is not among the tasks: {', '.join(task_embeddings) or 'none'}"
        )
    if n_resamples < 0:
        raise ValueError(f"n_resamples must be >= 0, got {n_resamples}")
    for task, emb in task_embeddings.items():
        n = 0 if emb.z_v is None else int(torch.as_tensor(emb.z_v).shape[0])
        if n < 2:
            raise ValueError(f"task {task!r} has {n} sample(s); EMI and the bounds need at least 2")
    emi_results: dict[str, emi_lib.EMIResult | None] = {}
    emi_cis: dict[str, tuple[float, float] | None] = {}
    for task, emb in task_embeddings.items():
        if emb.z_model is None or emb.z_ref is None:
            emi_results[task], emi_cis[task] = None, None
            continue
        emi_results[task] = _with_task(task, emi_lib.effective_mutual_information, club, *emb)
        if n_resamples:
            ci = _with_task(
                task,
                emi_lib.bootstrap_emi,
                club,
                emb,
                n_resamples=n_resamples,
                confidence_level=confidence_level,
                seed=task_seed(seed, task),
            )
            emi_cis[task] = (ci.low, ci.high)
        else:
            emi_cis[task] = None

    p_emb, p_emi = task_embeddings[id_task], emi_results[id_task]
    # every RJSD term against the ID task in one pass (the ID task's spectra are computed once)
    divergences = emi_lib.shift_divergences(
        p_emb, {task: emb for task, emb in task_embeddings.items() if task != id_task}
    )
    results: list[TaskResult] = []
    for task, emb in task_embeddings.items():
        emi_res = emi_results[task]
        base = {
            "task": task,
            "shift_kind": shift_kind(task, id_task),
            "n": emb.n,
            "emi": None if emi_res is None else emi_res.emi,
            "mi_model": None if emi_res is None else emi_res.mi_model,
            "mi_ref": None if emi_res is None else emi_res.mi_ref,
            "emi_ci": emi_cis[task],
        }
        if task == id_task:
            results.append(TaskResult(**base))
            continue
        terms = divergences[task]
        partial = terms.partial()
        extra: dict[str, Any] = {
            "partial_bound": partial.value,
            "jsd_visual": partial.jsd_visual,
            "jsd_text": partial.jsd_text,
        }
        if p_emi is not None and emi_res is not None:
            extra["emid"] = emi_lib.emid(p_emi, emi_res)
            if n_resamples:
                ci = _with_task(
                    task,
                    emi_lib.bootstrap_emid,
                    club,
                    p_emb,
                    emb,
                    n_resamples=n_resamples,
                    confidence_level=confidence_level,
                    seed=task_seed(seed, f"{id_task}->{task}"),
                )
                extra["emid_ci"] = (ci.low, ci.high)
            bound = terms.bound()
            extra.update(
                bound=bound.value,
                jsd_response_p=bound.jsd_response_p,
                jsd_response_q=bound.jsd_response_q,
            )
            if entropy_scale is not None:
                extra["bound_theorem"] = terms.bound(entropy_scale).value
        results.append(TaskResult(**base, **extra))

    correlations: dict[str, Correlation | None] = {}
    names = ["bound", "partial_bound"] + (["bound_theorem"] if entropy_scale is not None else [])
    for name in names:
        rows = [t for t in results if not t.is_id and t.emid is not None and getattr(t, name) is not None]
        correlations[name] = correlate(
            [t.emid for t in rows], [getattr(t, name) for t in rows], [t.task for t in rows]
        )
    settings = {
        "entropy_scale": entropy_scale,
        "n_resamples": n_resamples,
        "confidence_level": confidence_level,
        "seed": seed,
    }
    return ShiftAnalysis(id_task, tuple(results), correlations, settings)

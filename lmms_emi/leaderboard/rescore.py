"""``lmms-emi leaderboard --common-estimator``: runs that each fitted their own estimator are made comparable
by re-scoring them all with one estimator, fitted on the pooled, de-duplicated embeddings the runs saved
(:mod:`lmms_emi.embed.pool`, as ``lmms-emi train-estimator`` pools them). No encoder is loaded: every run is
re-scored from its embeddings file through the one pipeline (:func:`lmms_emi.pipeline.run.analyze_run`),
with the estimator loaded from the file that is saved beside the board, exactly as ``lmms-emi score ...
--estimator <that file>`` loads it, and with each run's own analysis settings (bootstrap resamples,
confidence level, seed, entropy scale), so the numbers are those ``score`` gives on the same data."""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lmms_emi.errors import UsageError
from lmms_emi.leaderboard.runs import RunResults

__all__ = ["COMMON_ESTIMATOR_FILE", "CommonEstimator"]

COMMON_ESTIMATOR_FILE = "leaderboard_club.safetensors"


class _SpecOnly:
    """The embedder of a re-scoring: it knows the encoder spec and embeds nothing (every task is given as
    embeddings)."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self._spec = dict(spec)

    def encoder_spec(self) -> dict[str, Any]:
        return dict(self._spec)

    def embed_images(self, *_: Any, **__: Any) -> Any:  # pragma: no cover - never called
        raise RuntimeError("re-scoring embeds nothing")

    embed_texts = embed_images


@dataclass
class CommonEstimator:
    """How to fit the common estimator (``steps``, ``patience``: None trains exactly ``steps``, ``seed``,
    ``hidden_size``) and where it goes (``out_dir``/:data:`COMMON_ESTIMATOR_FILE`). After :meth:`rescore`,
    ``file_bytes`` holds the saved checkpoint, for the board's writer."""

    out_dir: Path
    steps: int = 5000
    patience: int | None = 5
    seed: int = 0
    hidden_size: int = 500
    progress: bool = False
    file_bytes: bytes | None = field(default=None, repr=False)

    @property
    def path(self) -> Path:
        return Path(self.out_dir) / COMMON_ESTIMATOR_FILE

    def rescore(self, runs: Sequence[RunResults]) -> tuple[list[RunResults], dict[str, Any]]:
        """Fit the estimator on all runs' saved embeddings and re-score every run with it: the runs with
        their new analyses, and the estimator's record (``note``: one line for the board's notes).
        UsageError naming the run whose embeddings file is missing, or the file of other encoders."""
        from lmms_emi.embed.pool import pool_embeddings
        from lmms_emi.estimator_registry import file_sha256
        from lmms_emi.pipeline.estimator import EstimatorPolicy, fit_pooled_estimator, fixed_estimator

        files: list[Path] = []
        for run in runs:
            found = run.artifact("embeddings")
            if found is None:
                raise UsageError(
                    f"{run.label}: no saved embeddings (expected {run.path.parent}/{run.run_id}_"
                    "emi_embeddings.safetensors, written by every lmms-emi run); --common-estimator "
                    "re-scores runs from their embeddings"
                )
            files.append(found)
        pool = pool_embeddings(list(dict.fromkeys(files)))
        club = fit_pooled_estimator(
            pool.tasks,
            seed=self.seed,
            steps=self.steps,
            hidden_size=self.hidden_size,
            progress=self.progress,
            patience=self.patience,
        )
        with tempfile.TemporaryDirectory(prefix="lmms_emi_common_") as tmp:
            saved = club.save(Path(tmp) / COMMON_ESTIMATOR_FILE, club.make_manifest(pool.spec))
            self.file_bytes = saved.read_bytes()
            sha = file_sha256(saved)
            # loaded from its file as `lmms-emi score --estimator FILE` loads it: the same numbers
            fixed = fixed_estimator(EstimatorPolicy(str(saved), progress=False), pool.spec)
            assert fixed is not None
            loaded, info = fixed
        info = replace(
            info,
            path=str(self.path),
            sha256=sha,
            note=f"fitted by lmms-emi leaderboard --common-estimator on the pooled embeddings of {len(runs)} "
            "runs",
        )
        rescored = [
            self._rescore_run(run, pool.sources[file], pool.spec, loaded, info)
            for run, file in zip(runs, files, strict=True)
        ]
        record = {
            "path": str(self.path),
            "sha256": sha,
            "tensors_sha256": (info.manifest or {}).get("tensors_sha256"),
            "fitted_on": [str(f) for f in dict.fromkeys(files)],
            "n_tasks": len(pool.tasks),
            "n_pairs": pool.n_pairs,
            "steps": self.steps,
            "patience": self.patience,
            "seed": self.seed,
            "hidden_size": self.hidden_size,
            "note": f"re-scored every run with one estimator ({self.path.name}, sha256 {sha[:12]}) fitted on "
            f"the pooled embeddings of {len(files)} run(s) ({pool.n_pairs} pairs)",
        }
        return rescored, record

    @staticmethod
    def _rescore_run(
        run: RunResults, tasks: Mapping[str, Any], spec: Mapping[str, Any], club: Any, info: Any
    ) -> RunResults:
        from lmms_emi import scenarios as sc
        from lmms_emi.pipeline.estimator import EstimatorPolicy
        from lmms_emi.pipeline.run import analyze_run
        from lmms_emi.pipeline.shift import AnalysisSettings

        analyses = run.analyses
        first = next(iter(analyses.values()))
        settings = first.get("settings") or {}
        own = [k for k in run.emi.get("benchmarks") or {} if k not in sc.BENCHMARKS]  # a user's ID task
        metadata = {
            k: v
            for k, v in (first.get("metadata") or {}).items()
            if k not in ("benchmark", "task", "lmms_emi_version")
        }
        result = analyze_run(
            {},
            embedder=_SpecOnly(spec),
            policy=EstimatorPolicy(progress=False),
            settings=AnalysisSettings(
                entropy_scale=settings.get("entropy_scale"),
                n_resamples=int(settings.get("n_resamples", 1000)),
                confidence_level=float(settings.get("confidence_level", 0.95)),
                seed=int(settings.get("seed", 0)),
            ),
            metadata=metadata,
            embeddings=dict(tasks),
            estimator=(club, info),
            id_task=own[0] if own else None,
        )
        data = copy.deepcopy(run.data)
        data["lmms_emi"].update(
            estimator=info.to_dict(),
            benchmarks={b: a.to_dict() for b, a in result.benchmarks.items()},
            tasks={t: a.to_dict() for t, a in result.singles.items()},
            warnings=list(result.warnings),
        )
        return replace(run, data=data, rescored=True)

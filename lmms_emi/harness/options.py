"""EMI options of a run, handed from the ``lmms-emi eval`` launcher to the run session of every process.

The launcher exports them as JSON in ``$LMMS_EMI_OPTIONS``; every process of the run (also ``torchrun`` /
``accelerate launch`` workers, which inherit the environment) reads them back with
:func:`EMIOptions.from_env`. Plain ``lmms-eval --include_path ...`` runs get the defaults.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

from lmms_emi.pipeline.estimator import EstimatorPolicy
from lmms_emi.pipeline.shift import AnalysisSettings

ENV_VAR = "LMMS_EMI_OPTIONS"


@dataclass
class EMIOptions:
    """How EMI is computed for a run."""

    profile: str = "paper"  # encoder profile of lmms_emi.embed ("paper" | "offline")
    vision: str | None = None  # vision encoder override (registry name, hub id or local dir)
    text: str | None = None  # text encoder override
    text_layer: int | None = None  # text encoder hidden layer override
    estimator: str | None = None  # CLUB checkpoint (project format or the paper's plain state dict)
    entropy_scale: float | None = None  # Ĥ of Theorem 4.5; None = the scale-adjusted bound
    bootstrap: int = 1000  # bootstrap resamples for the confidence intervals
    confidence: float = 0.95
    seed: int = 0
    device: str | None = None  # embedding / estimator device (default: CUDA when available)
    batch_size: int = 32  # embedding batch size
    cache_dir: str | None = None  # embedding cache; "off" disables it
    train_steps: int | None = None  # CLUB training steps when one has to be trained (None: library default)
    report_dir: str | None = None  # where the report goes (the launcher sets it next to the results)
    progress: bool = True  # progress bars for long steps (the estimator fit)

    def to_env(self, environ: dict[str, str] | None = None) -> None:
        """Export to ``environ`` (default ``os.environ``)."""
        (os.environ if environ is None else environ)[ENV_VAR] = json.dumps(asdict(self))

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> EMIOptions:
        """The options of this run (defaults when ``$LMMS_EMI_OPTIONS`` is unset)."""
        raw = (os.environ if environ is None else environ).get(ENV_VAR)
        if not raw:
            return cls()
        data: dict[str, Any] = json.loads(raw)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def policy(self) -> EstimatorPolicy:
        """The run's estimator policy."""
        steps = {} if self.train_steps is None else {"steps": self.train_steps}
        return EstimatorPolicy(self.estimator, seed=self.seed, progress=self.progress, **steps)

    def settings(self) -> AnalysisSettings:
        """The run's analysis settings (validated)."""
        return AnalysisSettings(self.entropy_scale, self.bootstrap, self.confidence, self.seed)

    def embedder_kwargs(self) -> dict[str, Any]:
        """Keyword overrides for ``Embedder.from_profile(self.profile, **kwargs)``."""
        kwargs: dict[str, Any] = {"batch_size": self.batch_size, "progress": False}
        for name in ("vision", "text", "text_layer", "device"):
            value = getattr(self, name)
            if value is not None:
                kwargs[name] = value
        if self.cache_dir is not None:
            kwargs["cache_dir"] = (
                False if self.cache_dir.lower() in ("off", "none", "false") else self.cache_dir
            )
        return kwargs

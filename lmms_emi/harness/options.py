"""EMI options of a run, handed from the ``lmms-emi eval`` launcher to the run session of every process.

The launcher exports them as JSON in ``$LMMS_EMI_OPTIONS``; every process of the run (also ``torchrun`` /
``accelerate launch`` workers, which inherit the environment) reads them back with
:func:`EMIOptions.from_env`. Plain ``lmms-eval`` runs (the hook, :mod:`lmms_emi.harness.hook`) read
``$LMMS_EMI_OPTIONS`` and the short variables of :data:`SHORT_VARS` (:meth:`EMIOptions.for_plain_run`) and
export the result the same way.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

from lmms_emi.judge import JudgeConfig
from lmms_emi.pipeline.estimator import EstimatorPolicy
from lmms_emi.pipeline.shift import AnalysisSettings

ENV_VAR = "LMMS_EMI_OPTIONS"
# short variables for plain lmms-eval runs (the rest through $LMMS_EMI_OPTIONS)
SHORT_VARS = {
    "LMMS_EMI_ENCODERS": "profile",
    "LMMS_EMI_ESTIMATOR": "estimator",
    "LMMS_EMI_ID_TASK": "id_task",
    "LMMS_EMI_JUDGE": "judge",  # 1 / true / yes: score with the judge (its key: $OPENAI_API_KEY)
    "LMMS_EMI_JUDGE_MODEL": "judge_model",
    "LMMS_EMI_JUDGE_BASE_URL": "judge_base_url",
}
_TRUE = ("1", "true", "yes", "on")


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
    train_patience: int | None = None  # early-stopping patience of that fit (None: default; 0: fixed steps)
    report_dir: str | None = None  # where the report goes (the launcher sets it next to the results)
    progress: bool = True  # progress bars for long steps (the estimator fit)
    id_task: str | None = None  # explicit ID task of the run's own (non-plugin) tasks: EMID against it
    # the judge (win rate; off by default). The API key is not an option here: it travels in the environment
    # ($LMMS_EMI_JUDGE_API_KEY or $OPENAI_API_KEY) so that it is never written into the results JSON
    judge: bool = False
    judge_model: str | None = None  # default $MODEL_VERSION, else lmms_emi.judge.DEFAULT_MODEL
    judge_base_url: str | None = None  # default $OPENAI_API_URL / $OPENAI_BASE_URL, else OpenAI's
    judge_concurrency: int = 8
    judge_cache: str | None = None  # None: ~/.cache/lmms_emi/judge; "off": no cache
    judge_timeout: float = 60.0
    judge_max_attempts: int = 4

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

    @classmethod
    def for_plain_run(cls, environ: dict[str, str] | None = None) -> EMIOptions:
        """The options of a plain ``lmms-eval`` run: ``$LMMS_EMI_OPTIONS`` (JSON, any field), then the short
        variables of :data:`SHORT_VARS` (e.g. ``LMMS_EMI_ESTIMATOR=path``) over it."""
        env = os.environ if environ is None else environ
        opts = cls.from_env(env)
        for var, name in SHORT_VARS.items():
            value = env.get(var)
            if value:
                flag = isinstance(getattr(cls, name, None), bool)
                setattr(opts, name, value.strip().lower() in _TRUE if flag else value)
        return opts

    def policy(self) -> EstimatorPolicy:
        """The run's estimator policy."""
        steps = {} if self.train_steps is None else {"steps": self.train_steps}
        if self.train_patience is not None:
            steps["patience"] = self.train_patience or None
        return EstimatorPolicy(self.estimator, seed=self.seed, progress=self.progress, **steps)

    def settings(self) -> AnalysisSettings:
        """The run's analysis settings (validated)."""
        return AnalysisSettings(self.entropy_scale, self.bootstrap, self.confidence, self.seed)

    def judge_config(self) -> JudgeConfig | None:
        """The judge's config when ``--judge`` is on (validated; the key from the environment), else None."""
        if not self.judge:
            return None
        return JudgeConfig.resolve(
            model=self.judge_model,
            base_url=self.judge_base_url,
            concurrency=self.judge_concurrency,
            cache_dir=self.judge_cache,
            timeout=self.judge_timeout,
            max_attempts=self.judge_max_attempts,
        )

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

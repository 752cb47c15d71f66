"""The one preflight: every entry point (``score``, ``analyze``, ``eval`` and plain ``lmms-eval``) calls
:func:`preflight` with its :class:`~lmms_emi.config.EMIConfig` before any data is read or any model runs.

In this order, each failure one :class:`~lmms_emi.errors.LmmsEmiError` line:

1. every named input path exists (nothing is read yet);
2. every output folder is created and proven writable (before any input is read);
3. the analysis settings and the estimator choice are valid; a checkpoint file is read and checked, a
   registered estimator is found or downloaded (verified);
4. the judge, when on, answers a probe call;
5. the encoders' configs are read (no weights) and the estimator is checked against them.

What it built (the Embedder, the estimator policy, the analysis settings, the judge client) is returned in a
:class:`Ready`, so nothing is resolved twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmms_emi._io import ensure_writable_dir
from lmms_emi.config import EMIConfig
from lmms_emi.errors import UsageError
from lmms_emi.judge import Judge, JudgeConfig
from lmms_emi.pipeline.estimator import EstimatorPolicy
from lmms_emi.pipeline.shift import AnalysisSettings

__all__ = ["Ready", "check_outputs", "judge_config", "preflight"]


@dataclass
class Ready:
    """What a passed preflight built for the run."""

    config: EMIConfig
    policy: EstimatorPolicy
    settings: AnalysisSettings
    embedder: Any | None = None  # lmms_emi.embed.Embedder (configs read, weights loaded on first use)
    judge: Judge | None = None


def check_outputs(outputs: Mapping[str, str | Path | None]) -> None:
    """Create each output folder and prove it writable: ``{option: folder}`` (None: not given)."""
    for option, folder in outputs.items():
        if folder is None:
            continue
        try:
            ensure_writable_dir(Path(folder).expanduser())
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise UsageError(
                f"{option} {folder}: cannot write there ({reason}); choose another folder"
            ) from None


def judge_config(config: EMIConfig) -> JudgeConfig | None:
    """The judge's settings of ``config`` (None when the judge is off); the key comes from the environment."""
    if not config.judge:
        return None
    return JudgeConfig.resolve(
        model=config.judge_model,
        base_url=config.judge_base_url,
        concurrency=config.judge_concurrency,
        cache_dir=config.judge_cache,
        timeout=config.judge_timeout,
        max_attempts=config.judge_max_attempts,
    )


def preflight(
    config: EMIConfig,
    *,
    outputs: Mapping[str, str | Path | None] | None = None,
    inputs: Mapping[str, str | Path | None] | None = None,
    encoders: bool = True,
    judge: bool = True,
) -> Ready:
    """Check everything a run needs before it reads data (see the module docstring). ``outputs`` and
    ``inputs``: ``{option: path}``; ``encoders=False`` skips step 5 (the caller has no encoders to check,
    or checks them on another rank); ``judge=False`` skips step 4."""
    for option, path in (inputs or {}).items():  # exists, not read: before an output is made inside it
        if path is not None and not Path(path).expanduser().exists():
            raise UsageError(f"{option} {path}: no such file or folder")
    check_outputs(outputs or {})
    settings = AnalysisSettings.from_config(config)
    policy = EstimatorPolicy.from_config(config)
    policy.check(None)  # an unreadable checkpoint, an unknown or undownloadable registered estimator
    client = None
    judge_settings = judge_config(config) if judge else None
    if judge_settings is not None:
        client = Judge(judge_settings)
        client.check()
    embedder = None
    if encoders:
        from lmms_emi.embed import Embedder
        from lmms_emi.environment import quiet_hub

        with quiet_hub():
            embedder = Embedder.from_profile(config.encoders, **config.embedder_kwargs())
        policy.check(embedder.encoder_spec())
    return Ready(config, policy, settings, embedder, client)

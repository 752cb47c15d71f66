"""The one preflight: every entry point (``score``, ``analyze``, ``eval`` and plain ``lmms-eval``) calls
:func:`preflight` with its :class:`~lmms_emi.config.EMIConfig` before any data is read or any model runs.

In this order, each failure one :class:`~lmms_emi.errors.LmmsEmiError` line:

1. every named input path exists (nothing is read yet);
2. every output folder is created and proven writable (before any input is read);
3. the analysis settings and the estimator choice are valid (``--entropy-scale estimate`` only where the
   records can carry token log-probabilities); a checkpoint file is read and checked, a registered
   estimator is found or downloaded (verified);
4. the judge, when on, answers a probe call;
5. the encoders' configs are read (no weights) and the estimator is checked against them.

What it built (the Embedder, the estimator policy, the analysis settings, the judge client) is returned in a
:class:`Ready`, so nothing is resolved twice.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmms_emi._io import ensure_writable_dir, free_bytes
from lmms_emi.config import ESTIMATE, EMIConfig
from lmms_emi.errors import UsageError
from lmms_emi.estimators.club import CLUB
from lmms_emi.judge import Judge, JudgeConfig
from lmms_emi.pipeline.estimator import EstimatorInfo, EstimatorPolicy, fixed_estimator
from lmms_emi.pipeline.shift import AnalysisSettings

__all__ = ["Ready", "check_free_space", "check_outputs", "judge_config", "output_folder", "preflight"]


@dataclass
class Ready:
    """What a passed preflight built for the run."""

    config: EMIConfig
    policy: EstimatorPolicy
    settings: AnalysisSettings
    embedder: Any | None = None  # lmms_emi.embed.Embedder (configs read, weights loaded on first use)
    judge: Judge | None = None
    estimator: tuple[CLUB, EstimatorInfo] | None = None  # loaded once; None: fitted on the run


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


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n / 2**10:,.0f} KiB"


def _filesystem(folder: Path) -> tuple[int, Path]:
    """(device id, nearest existing folder) of ``folder``."""
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        return os.stat(existing).st_dev, existing
    except OSError:
        return -1, existing


def check_free_space(needs: Mapping[str, tuple[str | Path | None, int]]) -> None:
    """Refuse, in one line, a run whose outputs clearly do not fit: ``{what: (folder, bytes it needs)}`` (a
    None folder is skipped); the needs of folders on one filesystem add up, and each filesystem's free space
    (``shutil.disk_usage``) must hold them. A filesystem whose free space cannot be told passes."""
    by_fs: dict[int, tuple[Path, list[str], int]] = {}
    for what, (folder, need) in needs.items():
        if folder is None or need <= 0:
            continue
        dev, existing = _filesystem(Path(folder).expanduser())
        root, names, total = by_fs.get(dev, (existing, [], 0))
        by_fs[dev] = (root, [*names, f"{what} {folder}"], total + need)
    for root, names, total in by_fs.values():
        free = free_bytes(root)
        if free is not None and free < total:
            raise UsageError(
                f"{'; '.join(names)}: only {_mib(free)} free on that disk, and the run needs about "
                f"{_mib(total)} there; free some space or choose another folder"
            )


def output_folder(path: str | Path) -> Path:
    """The folder an output given as a file or a folder goes into: ``path`` itself when it is a folder or
    has no suffix, else its parent."""
    path = Path(path).expanduser()
    return path if path.is_dir() or not path.suffix else path.parent


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
    token_logprobs: bool = True,
) -> Ready:
    """Check everything a run needs before it reads data (see the module docstring). ``outputs`` and
    ``inputs``: ``{option: path}``; ``encoders=False`` skips step 5 (the caller has no encoders to check,
    or checks them on another rank); ``judge=False`` skips step 4; ``token_logprobs=False``: the entry
    point's records never carry token log-probabilities (lmms-eval's text-only generations), so Ĥ cannot be
    estimated."""
    for option, path in (inputs or {}).items():  # exists, not read: before an output is made inside it
        if path is not None and not Path(path).expanduser().exists():
            raise UsageError(f"{option} {path}: no such file or folder")
    check_outputs(outputs or {})
    settings = AnalysisSettings.from_config(config)
    if settings.entropy_scale == ESTIMATE and not token_logprobs:
        raise UsageError(
            f"--entropy-scale {ESTIMATE}: this run's responses come from lmms-eval's generate_until, which "
            "returns text without token log-probabilities; give Ĥ as a number, or score saved responses "
            "that carry them (response_logprobs, reference_logprobs) with `lmms-emi score`"
        )
    policy = EstimatorPolicy.from_config(config)
    policy.check(None)  # a missing checkpoint file; a registered estimator found or downloaded (verified)
    client = None
    judge_settings = judge_config(config) if judge else None
    if judge_settings is not None:
        client = Judge(judge_settings)
        client.check()
    embedder = None
    estimator = None  # None also when the encoders are not checked here: the run resolves it
    if encoders:
        from lmms_emi.embed import Embedder
        from lmms_emi.environment import quiet_hub

        with quiet_hub():
            embedder = Embedder.from_profile(config.encoders, **config.embedder_kwargs())
        estimator = fixed_estimator(policy, embedder.encoder_spec())  # loaded, checked against the encoders
    return Ready(config, policy, settings, embedder, client, estimator)

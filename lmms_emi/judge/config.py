"""Where the judge is and how it is called (:class:`JudgeConfig`), with lmms-eval's environment fallbacks, and
the default folder of its answer cache."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmms_emi.errors import UsageError
from lmms_emi.paths import user_cache_dir

__all__ = [
    "API_KEY_ENV",
    "CACHE_ENV",
    "DEFAULT_BASE_URL",
    "DEFAULT_MODEL",
    "JudgeConfig",
    "default_cache_dir",
]

DEFAULT_MODEL = "gpt-4o-2024-11-20"  # lmms-eval's default judge (MODEL_VERSION of its llava tasks)
DEFAULT_BASE_URL = "https://api.openai.com/v1"
#: where ``--judge-api-key`` is handed to the processes of a run (never written into options / results)
API_KEY_ENV = "LMMS_EMI_JUDGE_API_KEY"
CACHE_ENV = "LMMS_EMI_JUDGE_CACHE"  # overrides the default cache folder
_OFF = ("off", "none", "false")


def default_cache_dir() -> Path:
    """``$LMMS_EMI_JUDGE_CACHE``, else ``user_cache_dir("judge")`` (``~/.cache/lmms_emi/judge`` on Linux)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else user_cache_dir("judge")


@dataclass(frozen=True)
class JudgeConfig:
    """Where the judge is and how it is called. ``api_key`` is never serialised (:meth:`to_dict`).

    ``max_attempts``: calls per sample before it is excluded. Transport failures (timeouts, connection
    errors, HTTP 408 / 409 / 429 / 5xx) are retried by the ``openai`` client itself (exponential backoff with
    jitter, the server's ``Retry-After`` honoured) within that budget; an answer without two scores is asked
    again by the judge, with what is left of it."""

    model: str = DEFAULT_MODEL
    base_url: str = DEFAULT_BASE_URL
    api_key: str = field(default="", repr=False)
    concurrency: int = 8  # judge calls in flight at once
    cache_dir: str | None = None  # None: default_cache_dir(); "off": no cache
    timeout: float = 60.0  # seconds per call
    max_attempts: int = 4  # calls per sample before it is excluded
    max_tokens: int = 1024

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise UsageError(f"--judge-concurrency must be >= 1, got {self.concurrency}")
        if self.max_attempts < 1:
            raise UsageError(f"--judge-max-attempts must be >= 1, got {self.max_attempts}")
        if not (self.timeout > 0 and math.isfinite(self.timeout)):
            raise UsageError(f"--judge-timeout must be a positive number of seconds, got {self.timeout}")

    @classmethod
    def resolve(
        cls,
        *,
        model: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        environ: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> JudgeConfig:
        """Options first, then the environment variables lmms-eval's judge tasks read: the key from
        ``$LMMS_EMI_JUDGE_API_KEY`` or ``$OPENAI_API_KEY``, the URL from ``$OPENAI_API_URL`` /
        ``$OPENAI_BASE_URL`` (a trailing ``/chat/completions`` is dropped), the model from
        ``$MODEL_VERSION``."""
        env = os.environ if environ is None else environ
        url = base_url or env.get("OPENAI_API_URL") or env.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
        url = url.rstrip("/").removesuffix("/chat/completions")
        key = api_key or env.get(API_KEY_ENV) or env.get("OPENAI_API_KEY") or ""
        name = model or env.get("MODEL_VERSION") or DEFAULT_MODEL
        return cls(
            model=name, base_url=url, api_key=key, **{k: v for k, v in kwargs.items() if v is not None}
        )

    def cache_path(self) -> Path | None:
        """The answer cache's folder; None when the cache is off."""
        if self.cache_dir is not None and self.cache_dir.lower() in _OFF:
            return None
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("api_key")
        return out

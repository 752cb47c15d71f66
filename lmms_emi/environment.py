"""The one home of lmms-emi's environment variables: their names, what each does, and the old names still
read for one release (with a deprecation warning).

Every option of :class:`lmms_emi.config.EMIConfig` is also a variable, ``LMMS_EMI_<FIELD>`` (the field name
upper-cased), listed here from the config's own fields; the rest are settings of the machine or the process.
Read them with :func:`getenv`, which knows the old names.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Mapping

__all__ = ["DEPRECATED", "PREFIX", "SETTINGS", "getenv", "quiet_hub", "warn_deprecated"]

PREFIX = "LMMS_EMI_"

#: Variables that are not options of a run: name -> what it does.
SETTINGS: dict[str, str] = {
    "LMMS_EMI_OPTIONS": "every option of a run as one JSON object (keys: the option names below, lower case)",
    "LMMS_EMI_HOOK": "plain lmms-eval hook: 0 off; force: hook and eval also on untested lmms-eval",
    "LMMS_EMI_DEBUG": "1: errors show their traceback instead of one line",
    "LMMS_EMI_JUDGE_API_KEY": "the judge's API key (else $OPENAI_API_KEY); never written to results",
    "LMMS_EMI_ESTIMATOR_DIR": "a folder of estimator files placed by hand (offline machines)",
    "LMMS_EMI_ESTIMATOR_CACHE": "download cache of registered estimators "
    "(default <user cache>/lmms_emi/estimators)",
    "LMMS_EMI_ESTIMATOR_MIRROR": "base URL that serves registered estimator files in place of their URLs",
    "LMMS_EMI_ESTIMATOR_DOWNLOAD_TIMEOUT": "seconds a whole estimator download may take before it is "
    "given up (default 600)",
}

#: Old name -> new name; the old one is read, with one warning per process, for one release.
DEPRECATED: dict[str, str] = {
    "LMMS_EMI_CACHE": "LMMS_EMI_EMBEDDING_CACHE",
    "LMMS_EMI_ESTIMATORS_DIR": "LMMS_EMI_ESTIMATOR_DIR",
    "LMMS_EMI_ESTIMATORS_MIRROR": "LMMS_EMI_ESTIMATOR_MIRROR",
}

_warned: set[str] = set()


def warn_deprecated(old: str, new: str) -> None:
    """One line on stderr, once per process, for an old spelling still in use."""
    if old not in _warned:
        _warned.add(old)
        print(
            f"lmms-emi: warning: {old} is deprecated and goes away in the next release; use {new}",
            file=sys.stderr,
        )


def getenv(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The value of variable ``name`` (None when unset or empty), falling back to its old name.

    >>> getenv("LMMS_EMI_ESTIMATOR_DIR", {"LMMS_EMI_ESTIMATOR_DIR": "/x"})
    '/x'
    >>> getenv("LMMS_EMI_HOOK", {}) is None
    True
    """
    env = os.environ if environ is None else environ
    value = env.get(name)
    if value:
        return value
    for old, new in DEPRECATED.items():
        if new == name and env.get(old):
            warn_deprecated(old, new)
            return env[old]
    return None


@contextlib.contextmanager
def quiet_hub() -> Iterator[None]:
    """Silence the hub clients' retry warnings while something loads: on failure the user gets one line."""
    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "datasets", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)

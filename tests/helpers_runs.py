"""Shared pieces of the end-to-end tests that run lmms-eval or ``lmms-emi eval`` in a subprocess."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def offline_env(options: dict[str, Any], **extra: str) -> dict[str, str]:
    """The environment of an offline run: this process's, without its ``LMMS_EMI_*`` options (the estimator
    file locations kept), one CPU thread, no hub, the EMI ``options`` as ``LMMS_EMI_OPTIONS``, lmms-eval's
    built-in task index skipped; ``extra`` on top."""
    keep = ("LMMS_EMI_ESTIMATOR_",)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMMS_EMI_") or k.startswith(keep)}
    env.pop("RANK", None)
    env.update(
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        LMMS_EMI_OPTIONS=json.dumps(options),
        LMMS_EMI_BUILTIN_TASKS="0",
    )
    env.update(extra)
    return env


def results_json(out: Path) -> dict:
    """The one lmms-eval results JSON under ``out``."""
    files = sorted(Path(out).rglob("*_results.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())

"""Encoder specs: what identifies the embedding space an EMI value lives in (one home for the fact and its
comparison).

An encoder spec maps a role (``"vision"``, ``"text"``) to the fields that identify its encoder (``name``,
``feature``, ``layer``, ``dim``, and for a random projection its seed). Two EMI values are comparable only
when their specs agree (and their estimators do).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["PAPER_ENCODERS", "spec_differences"]

#: The encoders the paper's estimator (``CLUB_global.pt``) was trained on: CLIP ViT-B/32 patch-token mean of
#: the last hidden state, and XLM-R-base mean over tokens after the first of hidden state 0.
PAPER_ENCODERS: dict[str, dict[str, Any]] = {
    "vision": {"name": "openai/clip-vit-base-patch32", "feature": "patch_mean", "layer": -1, "dim": 768},
    "text": {"name": "xlm-roberta-base", "feature": "mean_after_first", "layer": 0, "dim": 768},
}


def spec_differences(
    expected: Any, actual: Any, *, expected_label: str = "expected", actual_label: str = "in use"
) -> list[str]:
    """The fields where two specs (nested mappings) differ, one readable line each; ``[]`` when they agree.

    >>> spec_differences({"text": {"layer": 0, "dim": 768}}, {"text": {"layer": -1, "dim": 768}},
    ...                  expected_label="checkpoint has")
    ['text.layer: checkpoint has 0, in use -1']
    >>> spec_differences({"vision": {"dim": 768}}, {})
    ["vision: expected {'dim': 768}, in use None"]
    """
    lines: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            for key in sorted(set(a) | set(b), key=str):
                walk(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
        elif a != b:
            lines.append(f"{path or 'spec'}: {expected_label} {a!r}, {actual_label} {b!r}")

    walk(expected, actual, "")
    return lines

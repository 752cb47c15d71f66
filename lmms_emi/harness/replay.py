"""The ``emi_replay`` model manifest, returned by the entry point ``lmms_eval.models: lmms_emi``
(:func:`lmms_emi.harness.hook.model_manifests`).

Kept free of heavy imports: lmms-eval loads every ``lmms_eval.models`` entry point while it builds its model
registry (``import lmms_eval.models``), so this module must not import lmms-eval's model API itself.
"""

from __future__ import annotations

from typing import Any

REPLAY_MODEL = "emi_replay"
REPLAY_CLASS = "lmms_emi.harness.replay_model.ReplayModel"


def model_manifests() -> list[Any]:
    """The plugin's lmms-eval models: ``emi_replay`` (answers from saved response files)."""
    from lmms_emi.lmms_eval_compat import model_manifest

    return [model_manifest(REPLAY_MODEL, REPLAY_CLASS, aliases=("lmms_emi_replay",))]

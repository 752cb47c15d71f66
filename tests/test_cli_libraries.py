"""``lmms_emi.cli.load_libraries``: what a subcommand runs on is imported with the garbage collector paused,
then frozen, before the run."""

from __future__ import annotations

import json
import subprocess
import sys

CODE = """
import gc, json, sys
from lmms_emi.cli import load_libraries

HEAVY = ("torch", "scipy.stats", "matplotlib.figure", "lmms_emi.pipeline.run")

collections = []
gc.callbacks.append(lambda phase, info: collections.append(info["generation"]) if phase == "stop" else None)
load_libraries("estimators")
light = [m for m in ("torch", "scipy.stats", "matplotlib") if m in sys.modules]
load_libraries("score")
during = list(collections)
frozen = gc.get_freeze_count()
load_libraries("score")
print(json.dumps({
    "light": light,
    "loaded": [m for m in HEAVY if m in sys.modules],
    "collections_while_loading": during,
    "frozen": frozen,
    "frozen_again": gc.get_freeze_count(),
    "enabled": gc.isenabled(),
}))
"""


def test_score_libraries_load_without_collections_then_stay_frozen():
    """A light subcommand loads nothing; ``score`` loads torch, scipy.stats, matplotlib's figure and the
    pipeline with no collection while they import, freezes them (the objects alive then: several hundred
    thousand, none traced by later collections) and leaves the collector on; a second call does nothing."""
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["light"] == []
    assert out["loaded"] == ["torch", "scipy.stats", "matplotlib.figure", "lmms_emi.pipeline.run"]
    assert out["collections_while_loading"] == []
    assert out["frozen"] > 100_000
    assert out["frozen_again"] == out["frozen"]
    assert out["enabled"] is True

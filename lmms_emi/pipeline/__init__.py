"""The run pipeline, shared by every entry point: records -> embeddings -> estimator -> shift analysis.

- :mod:`.records` — :class:`Sample` and :func:`embed_tasks`
- :mod:`.estimator` — :class:`EstimatorPolicy`: given checkpoint, shipped default, or fitted on the run
- :mod:`.shift` — :func:`analyze_shift`: EMI / EMID / bounds / correlations against the ID task
- :mod:`.run` — :func:`analyze_run`: the one function the entry points call
"""

from lmms_emi.pipeline.estimator import EstimatorInfo, EstimatorPolicy, resolve_estimator
from lmms_emi.pipeline.records import Sample, embed_tasks
from lmms_emi.pipeline.run import RunAnalysis, analyze_run, plan_run
from lmms_emi.pipeline.shift import (
    AnalysisSettings,
    Correlation,
    ShiftAnalysis,
    TaskResult,
    analyze_shift,
    correlate,
    json_ready,
)

__all__ = [
    "AnalysisSettings",
    "Correlation",
    "EstimatorInfo",
    "EstimatorPolicy",
    "RunAnalysis",
    "Sample",
    "ShiftAnalysis",
    "TaskResult",
    "analyze_run",
    "analyze_shift",
    "correlate",
    "embed_tasks",
    "json_ready",
    "plan_run",
    "resolve_estimator",
]

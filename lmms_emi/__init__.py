"""lmms-emi: effective mutual information (EMI) for multimodal LLMs under distribution shift.

Where things are computed:
- :mod:`lmms_emi.estimators` — CLUB (mutual information) and RJSD (divergence), pure tensor math.
- :mod:`lmms_emi.emi` — EMI, EMID, the EMID upper bounds and bootstrap intervals.
- :mod:`lmms_emi.embed` — image/text encoders and the embedding cache.
- :mod:`lmms_emi.harness` — lmms-eval glue (tasks, metric, replay model).
"""

__version__ = "0.1.0"

"""lmms-emi: effective mutual information (EMI) for multimodal LLMs under distribution shift.

Layers, lowest first (each imports only from the ones below it; ``docs/LAYERS.md``, checked in CI):

- foundation: :mod:`.errors`, :mod:`._io`, :mod:`.paths`, :mod:`.scenarios` (split grammar),
  :mod:`.metrics` (the metric table);
- :mod:`lmms_emi.estimators` — CLUB (mutual information) and RJSD (divergence), pure tensor math;
- :mod:`lmms_emi.emi` — EMI, EMID, the EMID upper bounds and bootstrap intervals;
- :mod:`lmms_emi.embed` — image/text encoders, the embedding cache and the embeddings file;
- :mod:`lmms_emi.pipeline` — the one run pipeline: records -> embeddings -> estimator -> shift analysis;
- :mod:`lmms_emi.report` — report files of a run;
- :mod:`lmms_emi.sources`, :mod:`lmms_emi.demo_data` — where records come from;
- :mod:`lmms_emi.harness` — lmms-eval glue; :mod:`lmms_emi.cli` — the ``lmms-emi`` command.
"""

__version__ = "0.1.0"

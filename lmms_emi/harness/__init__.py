"""lmms-eval glue: task YAML helpers, the replay model, and the ``lmms-emi eval`` launcher.

Everything here is thin: the math lives in :mod:`lmms_emi.emi` and the orchestration of embeddings,
estimator and shift analysis in :mod:`lmms_emi.analysis`.

* :mod:`.task_utils` — functions the task YAMLs reference (``!function lmms_emi.harness.task_utils.*``).
* :mod:`.runtime` — per-process run state: samples gathered by the per-task aggregation, embeddings,
  the final cross-task analysis.
* :mod:`.replay` / :mod:`.replay_model` — a model that answers from saved response files.
* :mod:`.launch` — ``run_eval(argv)``: lmms-eval with the plugin's tasks visible, EMI options, dataset
  override, failure detection and the results post-processing.
"""

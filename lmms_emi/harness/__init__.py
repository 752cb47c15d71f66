"""lmms-eval glue: task YAMLs and the functions they name, the run session, the replay model, and the
``lmms-emi eval`` launcher. Everything here is thin: a run's records go through the one pipeline
(:mod:`lmms_emi.pipeline`) and the report writer (:mod:`lmms_emi.report`).

* :mod:`.task_utils` — functions the task YAMLs reference (``!function lmms_emi.harness.task_utils.*``).
* :mod:`.session` — the run session: records gathered by the per-task aggregation, provisional metrics,
  the estimator, and the final analysis through the pipeline.
* :mod:`.make_tasks` / :mod:`.overrides` / :mod:`.foreign` — the task YAMLs, their local-data copies, and
  the EMI metric on other lmms-eval tasks.
* :mod:`.replay` / :mod:`.replay_model` — a model that answers from saved response files.
* :mod:`.launch` / :mod:`.results` — the eval run and the merge of its numbers into the results JSON;
  :mod:`.hook` — the same run from plain ``lmms-eval`` (the ``lmms_eval.models`` entry point).
"""

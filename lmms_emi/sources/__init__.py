"""Where a run's records come from: saved response files joined with a dataset (``score``), an lmms-eval
``--log_samples`` folder (``analyze``), dataset copies on disk or the hub, and the parsing of response files.
Each source produces :class:`~lmms_emi.pipeline.records.Sample` lists for the one pipeline."""

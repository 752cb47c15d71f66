"""Shift families of any benchmark with the paper's transforms (``lmms-emi make-shifts``; docs/SHIFTS.md).

Modules, highest first: ``tasks`` (the family's lmms-eval YAMLs) → ``write`` (parquet per split, resumable,
worker pool) → ``source`` (rows of a JSONL / parquet / save_to_disk / hub source, bounded memory) and
``family`` (the grid, names, kinds, row seeds) → ``visual`` (imagecorruptions) and ``text`` (nlpaug) →
``compat`` (imagecorruptions' fixes for current libraries) and ``wordnet`` (the offline synonym source).
Heavy packages (imagecorruptions, nlpaug, nltk, datasets, pyarrow) are imported inside the functions that
use them.
"""

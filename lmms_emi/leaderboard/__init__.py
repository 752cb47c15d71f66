"""The leaderboard: several runs' results JSON files (several models, several runs of one model) merged into
one table, one row per (model, run, benchmark). Schema and column definitions: ``docs/LEADERBOARD.md``.

Every number is read from what ``lmms-emi eval`` (or an lmms-eval run with the plugin) merged into lmms-eval's
results JSON: the per-benchmark analyses under ``lmms_emi.benchmarks`` (and the single-task ones under
``lmms_emi.tasks``) and lmms-eval's own per-task metrics under ``results``. Nothing is re-estimated here:
the table only averages and picks values already in the files.

Runs are ranked only when they are comparable: the same encoders and an estimator of the same content (the
sha256 of its tensors or of its file; registry name or path only when neither run records content), whatever
its source (registered, a frozen file, fitted on a run). Otherwise :func:`build_leaderboard` raises a
:class:`~lmms_emi.errors.UsageError` naming what differs, unless ``force`` (then the rows are flagged), or
the runs are re-scored with one estimator fitted on all their saved embeddings (``common_estimator``).

The default ranking is the headline, EMI under shift (mean EMI over the shifted tasks, higher is better),
with ID EMI and mean / worst EMID beside it: docs/LEADERBOARD.md says why.

Modules: ``runs`` (reading the runs, their artifacts, comparability), ``render`` (the table, its JSON /
CSV / Markdown / PNG and the files), ``build`` (rows, ranking, :func:`build_leaderboard`), ``rescore``
(``--common-estimator``), ``paired`` (``lmms-emi compare``: a paired bootstrap of two runs).
"""

# The package's front door: what the CLI and users need; everything else is imported from its module.
from lmms_emi.leaderboard.build import build_leaderboard
from lmms_emi.leaderboard.render import COLUMNS, DEFAULT_SORT, SCHEMA, Leaderboard, write_leaderboard
from lmms_emi.leaderboard.runs import RunResults, load_run, load_runs

__all__ = [
    "COLUMNS",
    "DEFAULT_SORT",
    "SCHEMA",
    "Leaderboard",
    "RunResults",
    "build_leaderboard",
    "load_run",
    "load_runs",
    "write_leaderboard",
]

"""Numbers as text, and tables of them: the one formatter of the reports, the agreement report, the
leaderboard and the commands' printed summaries.

* :func:`fmt_number`: fixed decimals for a real number, ``str`` for an integer or anything else, and
  :data:`MISSING` for a value that is absent or not finite;
* :func:`fmt_ci`: a value with its interval, ``0.1234 [0.1000, 0.1500]``; :func:`fmt_interval` the bracket
  alone; :func:`fmt_p`: a p-value to two significant digits;
* :func:`csv_cell` / :func:`csv_table`: full precision (``repr`` of a float round-trips exactly), absent or
  non-finite as an empty cell;
* :func:`markdown_table`: a GitHub Markdown table, ``|`` in a cell escaped.

Standard library only: no project or third-party import.
"""

from __future__ import annotations

import csv
import io
import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "MISSING",
    "csv_cell",
    "csv_table",
    "fmt_ci",
    "fmt_interval",
    "fmt_number",
    "fmt_p",
    "markdown_table",
]

MISSING = "–"  # an absent or non-finite number in a Markdown table or a line of text (en dash)


def _real(value: Any) -> bool:
    """A real, non-integer number (float, numpy floating): what gets fixed decimals."""
    return isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral)


def _absent(value: Any) -> bool:
    return value is None or (_real(value) and not math.isfinite(value))


def fmt_number(value: Any, digits: int = 3, *, missing: str = MISSING) -> str:
    """``value`` with ``digits`` decimals when it is a real number; an integer (a count, a rank) or any other
    value as ``str``; ``missing`` for None, NaN or ±inf.

    >>> fmt_number(0.123456), fmt_number(2.5, 1), fmt_number(3), fmt_number(None), fmt_number(float("nan"))
    ('0.123', '2.5', '3', '–', '–')
    >>> fmt_number(None, missing="n/a")
    'n/a'
    """
    if _absent(value):
        return missing
    return f"{value:.{digits}f}" if _real(value) else str(value)


def fmt_interval(ci: Sequence[Any] | None, digits: int = 3, *, missing: str = MISSING) -> str:
    """``" [low, high]"`` (with its leading space), or ``""`` when there is no interval.

    >>> fmt_interval((0.1, 0.25)), fmt_interval(None)
    (' [0.100, 0.250]', '')
    """
    if not ci:
        return ""
    return f" [{fmt_number(ci[0], digits, missing=missing)}, {fmt_number(ci[1], digits, missing=missing)}]"


def fmt_ci(value: Any, ci: Sequence[Any] | None, digits: int = 3, *, missing: str = MISSING) -> str:
    """A value and its interval, ``"v [low, high]"``; the value alone without an interval; ``missing`` alone
    when the value is absent.

    >>> fmt_ci(0.5, (0.25, 0.75), 2), fmt_ci(0.5, None, 2), fmt_ci(None, (0.25, 0.75))
    ('0.50 [0.25, 0.75]', '0.50', '–')
    """
    if value is None:
        return missing
    return fmt_number(value, digits, missing=missing) + fmt_interval(ci, digits, missing=missing)


def fmt_p(value: Any, *, missing: str = MISSING) -> str:
    """A p-value with two significant digits.

    >>> fmt_p(1.6e-10), fmt_p(0.1937), fmt_p(None)
    ('1.6e-10', '0.19', '–')
    """
    return missing if _absent(value) else f"{value:.2g}"


def csv_cell(value: Any) -> str:
    """A CSV cell: a float at full precision (``repr``), None / NaN / ±inf as an empty cell, else ``str``.

    >>> csv_cell(0.1), csv_cell(None), csv_cell(float("nan")), csv_cell(3), csv_cell("a")
    ('0.1', '', '', '3', 'a')
    """
    if _absent(value):
        return ""
    return repr(float(value)) if _real(value) else str(value)


def csv_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A CSV text: the header, then one line per row (cells by :func:`csv_cell`), ``\\n`` line ends."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([csv_cell(v) for v in row])
    return buf.getvalue()


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """The lines of a Markdown table: the header, the ``|---|`` rule, one line per row of (formatted) cells;
    a ``|`` inside a cell is escaped.

    >>> markdown_table(["a", "b"], [["1", "x|y"]])
    ['| a | b |', '|---|---|', '| 1 | x\\\\|y |']
    """

    def line(cells: Iterable[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(r) for r in rows)]

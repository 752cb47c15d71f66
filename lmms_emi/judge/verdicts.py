"""The judge's verdicts and what is computed from them: :class:`Judgment` per sample, the win rate and the
relative score over a task's scored samples (an excluded sample counts in neither), :class:`JudgeStats` per
judging pass."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["JudgeStats", "Judgment", "relative_score", "win_rate"]


@dataclass(frozen=True)
class Judgment:
    """The judge's verdict on one sample: both scores, or ``error`` (then the sample is excluded)."""

    task: str
    doc_id: int | str
    ref_score: float | None = None
    model_score: float | None = None
    error: str | None = None
    attempts: int = 0  # calls made for it in this run (0: from the cache or a log)
    cached: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    source: str = "judge"  # "judge" (this run or the cache) or "log" (a run's lmms-eval judge scores)

    @property
    def scored(self) -> bool:
        return self.error is None and self.ref_score is not None and self.model_score is not None

    @property
    def win(self) -> bool | None:
        """1[r(ŷ) > r(y)] (paper Eq. 2: a tie is not a win); None when excluded."""
        return None if not self.scored else bool(self.model_score > self.ref_score)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def win_rate(judgments: Sequence[Judgment]) -> float | None:
    """WR = mean over the scored samples of 1[r(x, ŷ) > r(x, y)] (paper Eq. 2); None when none is scored."""
    wins = [j.win for j in judgments if j.scored]
    return sum(wins) / len(wins) if wins else None


def relative_score(judgments: Sequence[Judgment]) -> float | None:
    """mean response score / mean reference score × 100 over the scored samples (lmms-eval's llava-bench
    aggregate); None when none is scored or the reference mean is 0."""
    rows = [j for j in judgments if j.scored]
    if not rows:
        return None
    ref = sum(j.ref_score for j in rows) / len(rows)
    model = sum(j.model_score for j in rows) / len(rows)
    return 100.0 * model / ref if ref > 0 else None


@dataclass
class JudgeStats:
    """What a judging pass cost: calls (every HTTP request, the client's retries included), retries (calls
    after a sample's first), cache hits, exclusions, tokens, wall time."""

    calls: int = 0
    retries: int = 0
    cache_hits: int = 0
    excluded: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_reported: int = 0  # calls whose answer carried token usage
    wall_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

"""Encoder-call accounting of an :class:`~lmms_emi.embed.Embedder`: requests, in-call duplicates, cache hits
and misses, encoder calls and time, per modality."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class ModalityStats:
    """Counters for one modality.  ``saved = requested - encoder_calls``."""

    requested: int = 0  # items asked for, duplicates included
    unique: int = 0  # distinct contents after in-call dedup
    cache_hits: int = 0
    cache_misses: int = 0
    corrupt_entries: int = 0  # bad cache files detected (and recomputed)
    encoder_calls: int = 0  # items actually run through the encoder
    forward_passes: int = 0  # batches
    truncated: int = 0  # texts cut at the encoder's max length
    seconds: float = 0.0  # wall time spent encoding (preprocess + forward)
    forward_seconds: float = 0.0  # of which inside the encoder's forward passes
    load_seconds: float = 0.0  # wall time spent loading the encoder (0 when it was never needed)

    @property
    def saved(self) -> int:
        return self.requested - self.encoder_calls


@dataclass
class EmbedStats:
    """Encoder-call accounting of one :class:`~lmms_emi.embed.Embedder`."""

    image: ModalityStats = field(default_factory=ModalityStats)
    text: ModalityStats = field(default_factory=ModalityStats)

    def _sum(self, attr: str) -> int:
        return getattr(self.image, attr) + getattr(self.text, attr)

    @property
    def requested(self) -> int:
        return self._sum("requested")

    @property
    def encoder_calls(self) -> int:
        return self._sum("encoder_calls")

    @property
    def cache_hits(self) -> int:
        return self._sum("cache_hits")

    @property
    def cache_misses(self) -> int:
        return self._sum("cache_misses")

    @property
    def load_seconds(self) -> float:
        """Wall time spent loading encoders."""
        return float(self.image.load_seconds + self.text.load_seconds)

    @property
    def forward_seconds(self) -> float:
        """Wall time spent inside encoder forward passes."""
        return float(self.image.forward_seconds + self.text.forward_seconds)

    @property
    def saved(self) -> int:
        """Embeddings served without an encoder call (in-call duplicates + cache hits)."""
        return self._sum("saved")

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {m: {**asdict(s), "saved": s.saved} for m, s in (("image", self.image), ("text", self.text))}

    def reset(self) -> None:
        self.image, self.text = ModalityStats(), ModalityStats()

    def summary(self) -> str:
        lines = []
        for m, s in (("images", self.image), ("texts", self.text)):
            rate = f", {s.encoder_calls / s.seconds:.1f}/s" if s.seconds > 0 and s.encoder_calls else ""
            lines.append(
                f"{m}: {s.requested} requested, {s.unique} unique, {s.cache_hits} cache hits, "
                f"{s.cache_misses} misses ({s.corrupt_entries} corrupt), {s.encoder_calls} encoded in "
                f"{s.forward_passes} batches{rate}; {s.saved} encoder calls saved"
            )
        lines.append(
            f"total: {self.requested} requested, {self.encoder_calls} encoded, "
            f"{self.saved} encoder calls saved; {self.load_seconds:.1f} s loading encoders, "
            f"{self.forward_seconds:.1f} s in forward passes"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

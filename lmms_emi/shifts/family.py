"""A shift family: the ID split, every visual shift, every text shift and their product, with names, kinds,
per-row seeds and the manifest.

The paper's synthetic grid is the default: visual ``{none, defocus_blur, frost} x severities {1, 3, 5}`` (7)
times text ``{none, KeyboardAug_1, KeyboardAug_3, sr_4, sr_7}`` (5) = 35 splits. Split ``id`` is the source
as it is; ``<visual>``, ``<text>`` and ``<visual>_<text>`` (e.g. ``frost_3_sr_7``) the shifted ones. The
lmms-eval task of split ``s`` is ``<family>_<s>``; the group ``<family>`` holds the ID task and the
subgroups ``<family>_visual``, ``<family>_text``, ``<family>_joint``.

Seeds: the transform ``t`` of source row ``i`` draws its randomness from
``row_seed(seed, key(t), i)`` = the first 8 bytes of ``sha256("<seed>|<key>|<i>")`` (big-endian), where
``key`` is the corruption name (shared by its severities: frost 1/3/5 of a row use the same texture and
crop) or the text augmenter name. A row's shifted image is therefore the same in every split that has it
(``frost_3`` and ``frost_3_sr_7``), and so is its shifted question.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lmms_emi.errors import UsageError
from lmms_emi.scenarios import SHIFT_KINDS
from lmms_emi.shifts.text import TextShift, parse_text_shift
from lmms_emi.shifts.visual import VisualShift, parse_visual_shift

__all__ = [
    "DEFAULT_TEXT",
    "DEFAULT_VISUAL",
    "FamilySpec",
    "FamilySplit",
    "check_family_name",
    "package_versions",
    "row_seed",
]

DEFAULT_VISUAL: tuple[str, ...] = (
    "defocus_blur_1", "defocus_blur_3", "defocus_blur_5", "frost_1", "frost_3", "frost_5",
)  # fmt: skip
DEFAULT_TEXT: tuple[str, ...] = ("sr_4", "sr_7", "KeyboardAug_1", "KeyboardAug_3")
ID_SPLIT = "id"
#: task / group prefixes of the plugin's own benchmark: a family must not look like them
_RESERVED_PREFIXES = ("lbshift_", "llavabench_shift")


def row_seed(seed: int, key: str, row: int) -> int:
    """The seed of one transform of one row: the first 8 bytes of ``sha256("<seed>|<key>|<row>")``.

    >>> row_seed(0, "frost", 3) == row_seed(0, "frost", 3) != row_seed(1, "frost", 3)
    True
    """
    return int.from_bytes(hashlib.sha256(f"{seed}|{key}|{row}".encode()).digest()[:8], "big")


def check_family_name(name: str) -> str:
    """``name`` when it can name lmms-eval tasks (lower-case letters, digits, ``_``; not the plugin's)."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name or ""):
        raise UsageError(
            f"--name {name!r}: a family name is lower-case letters, digits and '_', starting with a letter"
        )
    if name.startswith(_RESERVED_PREFIXES):
        raise UsageError(
            f"--name {name}: names starting with {' or '.join(_RESERVED_PREFIXES)} are the plugin's"
        )
    return name


@dataclass(frozen=True)
class FamilySplit:
    """One split of a family: which visual and text shift it applies (None: none)."""

    family: str
    visual: VisualShift | None
    text: TextShift | None

    @property
    def split(self) -> str:
        parts = [s.name for s in (self.visual, self.text) if s is not None]
        return "_".join(parts) or ID_SPLIT

    @property
    def task(self) -> str:
        return f"{self.family}_{self.split}"

    @property
    def kind(self) -> str:
        """``id``, ``visual``, ``text`` or ``joint``."""
        if self.visual and self.text:
            return "joint"
        return "visual" if self.visual else ("text" if self.text else "id")


@dataclass(frozen=True)
class FamilySpec:
    """The grid: the ID split x visual shifts x text shifts, named ``family``, seeded by ``seed``."""

    family: str
    visual: tuple[VisualShift, ...] = field(
        default_factory=lambda: tuple(map(parse_visual_shift, DEFAULT_VISUAL))
    )
    text: tuple[TextShift, ...] = field(default_factory=lambda: tuple(map(parse_text_shift, DEFAULT_TEXT)))
    seed: int = 0

    def __post_init__(self) -> None:
        check_family_name(self.family)
        for option, shifts in (("--visual", self.visual), ("--text", self.text)):
            names = [s.name for s in shifts]
            repeated = next((n for n in names if names.count(n) > 1), None)
            if repeated:
                raise UsageError(f"{option} {repeated}: given twice")

    @classmethod
    def from_names(
        cls,
        family: str,
        visual: Sequence[str] | None = None,
        text: Sequence[str] | None = None,
        seed: int = 0,
    ) -> FamilySpec:
        """From option values (``None``: the paper's default grid; an empty list: no shift of that kind)."""
        v = DEFAULT_VISUAL if visual is None else visual
        t = DEFAULT_TEXT if text is None else text
        return cls(family, tuple(map(parse_visual_shift, v)), tuple(map(parse_text_shift, t)), seed)

    @property
    def id_task(self) -> str:
        return f"{self.family}_{ID_SPLIT}"

    def subgroup(self, kind: str) -> str:
        return f"{self.family}_{kind}"

    def splits(self) -> list[FamilySplit]:
        """Every split, visual-major (the ID split first), as the paper's grid is listed."""
        return [FamilySplit(self.family, v, t) for v in (None, *self.visual) for t in (None, *self.text)]

    def visual_groups(self) -> list[tuple[VisualShift | None, list[FamilySplit]]]:
        """The splits grouped by their visual shift: one pass over the source makes each group."""
        return [
            (v, [FamilySplit(self.family, v, t) for t in (None, *self.text)]) for v in (None, *self.visual)
        ]

    def describe(self) -> dict[str, Any]:
        """The grid's part of the manifest (names and parameters of every transform)."""
        return {
            "family": self.family,
            "seed": self.seed,
            "id_task": self.id_task,
            "group": self.family,
            "subgroups": {kind: self.subgroup(kind) for kind in SHIFT_KINDS},
            "visual_shifts": [{"name": v.name, **v.params()} for v in self.visual],
            "text_shifts": [{"name": t.name, **t.params()} for t in self.text],
            "seeding": (
                "row seed = first 8 bytes (big-endian) of sha256('<seed>|<key>|<row>'), key = corruption or "
                "text augmenter name; it seeds NumPy's global generator (and Python's random for text) for "
                "that one call"
            ),
        }


_PACKAGES = ("lmms-emi", "imagecorruptions", "nlpaug", "nltk", "wn", "numpy", "scipy", "scikit-image",
             "opencv-python", "opencv-python-headless", "pillow", "pyarrow")  # fmt: skip


def package_versions() -> dict[str, str | None]:
    """Versions of every package whose code decides the family's bytes (None: not installed)."""
    import importlib.metadata as metadata

    out: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out

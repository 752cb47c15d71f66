"""The LLaVA-Bench shift scenarios: the one home of split names, task names, groups and the ID task.

Two benchmarks (Oh et al., ICML 2025):

* synthetic — ``changdae/llavabench-shift-synthetic-v1``: 7 visual shifts (none, defocus blur and frost at
  severities 1/3/5) x 5 text shifts (none, sentence rewriting ``sr_4``/``sr_7``, keyboard typos
  ``KeyboardAug_1``/``KeyboardAug_3``) = 35 splits named ``llava_bench_coco{visual}{text}``.
* natural — ``changdae/llavabench-shift-natural-v1``: {coco, in-the-wild easy/normal/hard} x 7 languages
  = 28 splits named ``{image source}_{language}``.

The in-distribution (ID) scenario is ``llava_bench_coco`` (synthetic) and ``llava_bench_coco_English``
(natural). Every other scenario is out-of-distribution (OOD) and is compared against the ID one.

The split grammar is parsed once, here, into the fields of :class:`Scenario`; file and folder names that
start with a split name (``<split>_<model>.jsonl``, ``<split>-00000.parquet``) are matched by
:func:`split_prefix`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lmms_emi.errors import UsageError

SYNTHETIC_DATASET = "changdae/llavabench-shift-synthetic-v1"
NATURAL_DATASET = "changdae/llavabench-shift-natural-v1"
COCO = "llava_bench_coco"
WILD = "llava_bench_in_the_wild"

#: (corruption, severity) of the synthetic visual shifts; None = the clean COCO image
SYNTHETIC_VISUAL_SHIFTS: tuple[tuple[str, int] | None, ...] = (
    None,
    ("defocus_blur", 1),
    ("defocus_blur", 3),
    ("defocus_blur", 5),
    ("frost", 1),
    ("frost", 3),
    ("frost", 5),
)
#: (augmentation, level) of the synthetic text shifts; None = the original question
SYNTHETIC_TEXT_SHIFTS: tuple[tuple[str, int] | None, ...] = (
    None,
    ("sr", 4),
    ("sr", 7),
    ("KeyboardAug", 1),
    ("KeyboardAug", 3),
)
WILD_LEVELS: tuple[str, ...] = ("easy", "normal", "hard")
NATURAL_IMAGE_SOURCES: tuple[str, ...] = (COCO, *(f"{WILD}_{level}" for level in WILD_LEVELS))
NATURAL_LANGUAGES: tuple[str, ...] = ("English", "German", "Chinese", "Korean", "Greek", "Arabic", "Hindi")

BENCHMARKS: tuple[str, ...] = ("synthetic", "natural")
TASK_PREFIX = {"synthetic": "lbshift_syn_", "natural": "lbshift_nat_"}
GROUP_NAME = {"synthetic": "llavabench_shift_synthetic", "natural": "llavabench_shift_natural"}
DATASET = {"synthetic": SYNTHETIC_DATASET, "natural": NATURAL_DATASET}
SHIFT_KINDS: tuple[str, ...] = ("visual", "text", "joint")


@dataclass(frozen=True)
class Scenario:
    """One dataset split of a LLaVA-Bench shift benchmark, with its name parsed into fields.

    >>> s = parse_split("llava_bench_coco_frost_3_sr_7")
    >>> (s.benchmark, s.corruption, s.severity, s.text_aug, s.text_level, s.shift_kind)
    ('synthetic', 'frost', 3, 'sr', 7, 'joint')
    >>> n = parse_split("llava_bench_in_the_wild_hard_Korean")
    >>> (n.benchmark, n.image_source, n.wild_level, n.language, n.shift_kind)
    ('natural', 'llava_bench_in_the_wild_hard', 'hard', 'Korean', 'joint')
    """

    benchmark: str  # "synthetic" | "natural"
    split: str  # dataset split name, e.g. "llava_bench_coco_frost_3_sr_7"
    visual_shift: bool  # the images differ from the ID scenario
    text_shift: bool  # the questions differ from the ID scenario
    corruption: str | None = None  # synthetic: "defocus_blur" | "frost"
    severity: int = 0  # synthetic corruption severity (1, 3, 5)
    text_aug: str | None = None  # synthetic: "sr" (sentence rewriting) | "KeyboardAug" (typos)
    text_level: int = 0  # synthetic text augmentation level
    image_source: str = COCO  # natural: "llava_bench_coco" | "llava_bench_in_the_wild_<level>"
    language: str = "English"  # natural: the question's language
    wild_level: str | None = None  # natural in-the-wild: "easy" | "normal" | "hard"

    @property
    def task(self) -> str:
        """lmms-eval task name (prefixed so it never collides with lmms-eval's built-in tasks)."""
        return TASK_PREFIX[self.benchmark] + self.split

    @property
    def dataset(self) -> str:
        return DATASET[self.benchmark]

    @property
    def is_id(self) -> bool:
        return not (self.visual_shift or self.text_shift)

    @property
    def shift_kind(self) -> str:
        """ "id", "visual", "text" or "joint"."""
        if self.visual_shift and self.text_shift:
            return "joint"
        if self.visual_shift:
            return "visual"
        return "text" if self.text_shift else "id"


def _synthetic(visual: tuple[str, int] | None, text: tuple[str, int] | None) -> Scenario:
    split = COCO + (f"_{visual[0]}_{visual[1]}" if visual else "") + (f"_{text[0]}_{text[1]}" if text else "")
    return Scenario(
        "synthetic",
        split,
        visual_shift=visual is not None,
        text_shift=text is not None,
        corruption=visual[0] if visual else None,
        severity=visual[1] if visual else 0,
        text_aug=text[0] if text else None,
        text_level=text[1] if text else 0,
    )


def _natural(source: str, language: str) -> Scenario:
    return Scenario(
        "natural",
        f"{source}_{language}",
        visual_shift=source != COCO,
        text_shift=language != NATURAL_LANGUAGES[0],
        image_source=source,
        language=language,
        wild_level=source.rsplit("_", 1)[1] if source.startswith(WILD) else None,
    )


_SCENARIOS: dict[str, tuple[Scenario, ...]] = {
    "synthetic": tuple(_synthetic(v, t) for v in SYNTHETIC_VISUAL_SHIFTS for t in SYNTHETIC_TEXT_SHIFTS),
    "natural": tuple(_natural(s, lang) for s in NATURAL_IMAGE_SOURCES for lang in NATURAL_LANGUAGES),
}
_BY_SPLIT = {s.split: s for group in _SCENARIOS.values() for s in group}
_BY_TASK = {s.task: s for group in _SCENARIOS.values() for s in group}
#: file-name stems that are not splits but hold responses (the paper's combined in-the-wild files)
COMBINED_WILD_STEMS: tuple[str, ...] = tuple(f"{WILD}_{lang}" for lang in NATURAL_LANGUAGES)


def synthetic_scenarios() -> list[Scenario]:
    """The 35 synthetic scenarios, ID first, in (visual, text) order."""
    return list(_SCENARIOS["synthetic"])


def natural_scenarios() -> list[Scenario]:
    """The 28 natural scenarios, ID (``llava_bench_coco_English``) first."""
    return list(_SCENARIOS["natural"])


def scenarios(benchmark: str) -> list[Scenario]:
    """All scenarios of ``benchmark`` ("synthetic" or "natural"), ID first."""
    if benchmark not in _SCENARIOS:
        raise UsageError(f"unknown benchmark {benchmark!r}; expected 'synthetic' or 'natural'")
    return list(_SCENARIOS[benchmark])


def id_scenario(benchmark: str) -> Scenario:
    """The in-distribution scenario of ``benchmark``."""
    return scenarios(benchmark)[0]


def parse_split(split: str) -> Scenario | None:
    """The scenario of a dataset split name, or None when it is not a LLaVA-Bench shift split."""
    return _BY_SPLIT.get(split)


def scenario_for_task(task: str) -> Scenario | None:
    """The scenario behind an lmms-eval task name of this plugin, or None for any other task."""
    return _BY_TASK.get(task)


def run_order(scenario: Scenario) -> tuple[int, int]:
    """Sort key of the order a benchmark is run and analysed in: the ID scenario, then the visual, text and
    joint shifts (the benchmark group's subgroup order), each in scenario order. Every entry point pools and
    reports a run's tasks in this order, so the same records give the same numbers whatever their source."""
    kind = ("id", *SHIFT_KINDS).index(scenario.shift_kind)
    return kind, _SCENARIOS[scenario.benchmark].index(scenario)


def split_prefix(stem: str, *, extra: Iterable[str] = (), separator: str = "_") -> str | None:
    """The longest known split name (or combined in-the-wild stem, or one of ``extra``) that ``stem`` is or
    starts with followed by ``separator``; None when there is none.

    >>> split_prefix("llava_bench_coco_frost_5_llava-13b")
    'llava_bench_coco_frost_5'
    >>> split_prefix("llava_bench_coco_frost_5-00000-of-00001", separator="-")
    'llava_bench_coco_frost_5'
    """
    names = sorted({*_BY_SPLIT, *COMBINED_WILD_STEMS, *extra}, key=len, reverse=True)
    return next((n for n in names if stem == n or stem.startswith(n + separator)), None)


def select_scenarios(benchmark: str, names: Sequence[str] | None) -> list[Scenario]:
    """The benchmark's scenarios named in ``names`` (split or task names; comma lists allowed), in the given
    order without repeats; every scenario when ``names`` is empty. Unknown names raise :class:`UsageError`."""
    every = scenarios(benchmark)
    wanted = [n.strip() for raw in names or () for n in raw.split(",") if n.strip()]
    if not wanted:
        return every
    by_name = {s.split: s for s in every} | {s.task: s for s in every}
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise UsageError(
            f"unknown {benchmark} scenario {unknown[0]!r}; valid names look like {every[1].split!r} "
            f"(or the task name {every[1].task!r})"
        )
    return list(dict.fromkeys(by_name[n] for n in wanted))


def benchmark_of_splits(splits: Iterable[str]) -> str | None:
    """The benchmark most of these split names belong to (None if none does)."""
    counts = {b: 0 for b in BENCHMARKS}
    for split in splits:
        scenario = parse_split(split)
        if scenario is not None:
            counts[scenario.benchmark] += 1
    best = max(BENCHMARKS, key=lambda b: counts[b])
    return best if counts[best] else None


# ------------------------------------------------------------------------ the user's own shift families
#: Keys under a task YAML's ``metadata`` that ``lmms-emi make-shifts`` writes and runs read back: the family,
#: its ID task, and the task's shift kind ("id", "visual", "text" or "joint").
FAMILY_KEY, ID_TASK_KEY, SHIFT_KIND_KEY = "lmms_emi_family", "lmms_emi_id_task", "lmms_emi_shift_kind"
SHIFT_KINDS = ("visual", "text", "joint")


def shift_kinds_of(configs: Mapping[str, Any]) -> dict[str, str]:
    """{task: shift kind} recorded in the ``metadata`` of task configs (lmms-eval's results JSON
    ``configs``, or loaded task YAMLs); tasks without one are left out."""
    out: dict[str, str] = {}
    for task, config in configs.items():
        meta = config.get("metadata") if isinstance(config, Mapping) else None
        kind = meta.get(SHIFT_KIND_KEY) if isinstance(meta, Mapping) else None
        if kind in SHIFT_KINDS:
            out[str(task)] = str(kind)
    return out

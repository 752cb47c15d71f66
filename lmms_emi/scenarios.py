"""The LLaVA-Bench shift scenarios: dataset splits, task names, groups and the in-distribution task.

Two benchmarks (Oh et al., ICML 2025):

* synthetic — ``changdae/llavabench-shift-synthetic-v1``: 7 visual shifts (none, defocus blur and frost at
  severities 1/3/5) x 5 text shifts (none, sentence rewriting ``sr_4``/``sr_7``, keyboard typos
  ``KeyboardAug_1``/``KeyboardAug_3``) = 35 splits named ``llava_bench_coco{visual}{text}``.
* natural — ``changdae/llavabench-shift-natural-v1``: {coco, in-the-wild easy/normal/hard} x 7 languages
  = 28 splits named ``{visual}_{language}``.

The in-distribution (ID) scenario is ``llava_bench_coco`` (synthetic) and ``llava_bench_coco_English``
(natural). Every other scenario is out-of-distribution (OOD) and is compared against the ID one.
"""

from __future__ import annotations

from dataclasses import dataclass

SYNTHETIC_DATASET = "changdae/llavabench-shift-synthetic-v1"
NATURAL_DATASET = "changdae/llavabench-shift-natural-v1"

SYNTHETIC_VISUAL_SHIFTS: tuple[str, ...] = (
    "",
    "_defocus_blur_1",
    "_defocus_blur_3",
    "_defocus_blur_5",
    "_frost_1",
    "_frost_3",
    "_frost_5",
)
SYNTHETIC_TEXT_SHIFTS: tuple[str, ...] = ("", "_sr_4", "_sr_7", "_KeyboardAug_1", "_KeyboardAug_3")

NATURAL_VISUAL_SHIFTS: tuple[str, ...] = (
    "llava_bench_coco",
    "llava_bench_in_the_wild_easy",
    "llava_bench_in_the_wild_normal",
    "llava_bench_in_the_wild_hard",
)
NATURAL_LANGUAGES: tuple[str, ...] = ("English", "German", "Chinese", "Korean", "Greek", "Arabic", "Hindi")

TASK_PREFIX = {"synthetic": "lbshift_syn_", "natural": "lbshift_nat_"}
GROUP_NAME = {"synthetic": "llavabench_shift_synthetic", "natural": "llavabench_shift_natural"}


@dataclass(frozen=True)
class Scenario:
    """One dataset split of a LLaVA-Bench shift benchmark."""

    benchmark: str  # "synthetic" | "natural"
    split: str  # dataset split name, e.g. "llava_bench_coco_frost_3_sr_7"
    visual_shift: bool  # the images differ from the ID scenario
    text_shift: bool  # the questions differ from the ID scenario

    @property
    def task(self) -> str:
        """lmms-eval task name (prefixed so it never collides with lmms-eval's built-in tasks)."""
        return TASK_PREFIX[self.benchmark] + self.split

    @property
    def dataset(self) -> str:
        return SYNTHETIC_DATASET if self.benchmark == "synthetic" else NATURAL_DATASET

    @property
    def is_id(self) -> bool:
        return not (self.visual_shift or self.text_shift)

    @property
    def shift_kind(self) -> str:
        """"id", "visual", "text" or "joint"."""
        if self.visual_shift and self.text_shift:
            return "joint"
        if self.visual_shift:
            return "visual"
        return "text" if self.text_shift else "id"


def synthetic_scenarios() -> list[Scenario]:
    """The 35 synthetic scenarios, ID first, in (visual, text) order."""
    return [
        Scenario("synthetic", f"llava_bench_coco{v}{t}", visual_shift=bool(v), text_shift=bool(t))
        for v in SYNTHETIC_VISUAL_SHIFTS
        for t in SYNTHETIC_TEXT_SHIFTS
    ]


def natural_scenarios() -> list[Scenario]:
    """The 28 natural scenarios, ID (``llava_bench_coco_English``) first."""
    return [
        Scenario(
            "natural",
            f"{v}_{lang}",
            visual_shift=v != NATURAL_VISUAL_SHIFTS[0],
            text_shift=lang != NATURAL_LANGUAGES[0],
        )
        for v in NATURAL_VISUAL_SHIFTS
        for lang in NATURAL_LANGUAGES
    ]


def scenarios(benchmark: str) -> list[Scenario]:
    """All scenarios of ``benchmark`` ("synthetic" or "natural"), ID first."""
    if benchmark == "synthetic":
        return synthetic_scenarios()
    if benchmark == "natural":
        return natural_scenarios()
    raise ValueError(f"unknown benchmark {benchmark!r}; expected 'synthetic' or 'natural'")


def id_scenario(benchmark: str) -> Scenario:
    """The in-distribution scenario of ``benchmark``."""
    return scenarios(benchmark)[0]


def scenario_for_task(task: str) -> Scenario | None:
    """The scenario behind an lmms-eval task name of this plugin, or None for any other task."""
    for benchmark, prefix in TASK_PREFIX.items():
        if task.startswith(prefix):
            split = task[len(prefix) :]
            for scenario in scenarios(benchmark):
                if scenario.split == split:
                    return scenario
    return None

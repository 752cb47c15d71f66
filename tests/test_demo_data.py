"""Tests of the offline demo dataset and the demo model's responses (real photos, real datasets I/O)."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
from conftest import DEMO_NATURAL_SPLITS

from lmms_emi import scenarios as sc
from lmms_emi.demo_data import (
    QUESTION_TEMPLATES,
    build_demo_dataset,
    defocus_blur,
    frost,
    keyboard_typos,
    shift_strength,
    synonym_rewrite,
    write_demo_responses,
)

SYN = [
    "llava_bench_coco",
    "llava_bench_coco_defocus_blur_5",
    "llava_bench_coco_frost_3_KeyboardAug_3",
    "llava_bench_coco_sr_7",
]


@pytest.fixture(scope="module")
def syn_dir(tmp_path_factory):
    return build_demo_dataset(
        tmp_path_factory.mktemp("syn"), scenarios=SYN, n_images=3, questions_per_image=2
    )


@pytest.fixture
def nat_dir(demo_natural):
    """The session's natural demo dataset (conftest.demo_natural: English and German, 4 photos)."""
    return demo_natural["data"]


def _pixels(img) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.float64)


def test_splits_columns_and_ids(syn_dir):
    dd = datasets.load_from_disk(str(syn_dir))
    assert list(dd) == SYN
    id_split = dd[sc.id_scenario("synthetic").split]
    assert set(id_split.column_names) == {"question_id", "image", "question", "reference_answer"}
    assert isinstance(id_split.features["image"], datasets.Image)
    for split in SYN:
        assert len(dd[split]) == 6
        assert list(dd[split]["question_id"]) == list(id_split["question_id"]) == list(range(6))
        assert list(dd[split]["reference_answer"]) == list(id_split["reference_answer"])
    assert list(id_split["question"])[:2] == list(QUESTION_TEMPLATES[:2])


def test_visual_and_text_shifts_applied(syn_dir):
    dd = datasets.load_from_disk(str(syn_dir))
    clean = _pixels(dd["llava_bench_coco"][0]["image"])
    blurred = _pixels(dd["llava_bench_coco_defocus_blur_5"][0]["image"])
    frosted = _pixels(dd["llava_bench_coco_frost_3_KeyboardAug_3"][0]["image"])
    # blur removes high frequencies: mean absolute horizontal gradient drops a lot
    grad = lambda a: np.abs(np.diff(a, axis=1)).mean()  # noqa: E731
    assert grad(blurred) < 0.5 * grad(clean)
    assert frosted.mean() > clean.mean()  # frost whitens
    # text: typos differ from the template, sentence rewrite is lower-case without punctuation
    typo_q = list(dd["llava_bench_coco_frost_3_KeyboardAug_3"]["question"])
    assert typo_q != list(dd["llava_bench_coco"]["question"])
    assert all(
        len(a) == len(b) for a, b in zip(typo_q, list(dd["llava_bench_coco"]["question"]), strict=True)
    )
    assert all(q == q.lower() and "?" not in q for q in list(dd["llava_bench_coco_sr_7"]["question"]))
    # the visual-only split keeps the clean questions
    assert list(dd["llava_bench_coco_defocus_blur_5"]["question"]) == list(dd["llava_bench_coco"]["question"])


def test_deterministic(tmp_path, syn_dir):
    again = build_demo_dataset(tmp_path / "again", scenarios=SYN, n_images=3, questions_per_image=2)
    a, b = datasets.load_from_disk(str(syn_dir)), datasets.load_from_disk(str(again))
    for split in SYN:
        assert list(a[split]["question"]) == list(b[split]["question"])
        assert np.array_equal(_pixels(a[split][2]["image"]), _pixels(b[split][2]["image"]))


def test_natural_layout(nat_dir):
    dd = datasets.load_from_disk(str(nat_dir))
    assert list(dd) == list(DEMO_NATURAL_SPLITS)
    assert dd["llava_bench_coco_German"][0]["question"].endswith("; Please answer in English.")
    normal = list(dd["llava_bench_in_the_wild_normal_English"]["question_id"])
    easy = list(dd["llava_bench_in_the_wild_easy_English"]["question_id"])
    hard = list(dd["llava_bench_in_the_wild_hard_English"]["question_id"])
    assert sorted(easy + hard) == normal == list(range(8))
    assert len(easy) == len(hard) == 4


def test_unknown_scenario_and_sizes(tmp_path):
    with pytest.raises(ValueError, match="unknown synthetic scenario 'llava_bench_coco_fog_3'"):
        build_demo_dataset(tmp_path / "x", scenarios=["llava_bench_coco_fog_3"])
    with pytest.raises(ValueError, match="n_images"):
        build_demo_dataset(tmp_path / "y", n_images=0)


def test_task_names_accepted(tmp_path):
    out = build_demo_dataset(
        tmp_path / "t", scenarios=["lbshift_syn_llava_bench_coco"], n_images=1, questions_per_image=1
    )
    assert list(datasets.load_from_disk(str(out))) == ["llava_bench_coco"]


def test_demo_responses(syn_dir, tmp_path):
    paths = write_demo_responses(syn_dir, tmp_path / "resp")
    names = sorted(p.name for p in paths)
    assert names == sorted(f"{s}_demo-model.jsonl" for s in SYN)
    rows = {s: [json.loads(line) for line in open(tmp_path / "resp" / f"{s}_demo-model.jsonl")] for s in SYN}
    assert [r["question_id"] for r in rows["llava_bench_coco"]] == list(range(6))
    assert {"question_id", "text", "prompt", "model_id"} <= set(rows["llava_bench_coco"][0])
    # deterministic and degrading with shift strength
    again = write_demo_responses(syn_dir, tmp_path / "resp2")
    assert [p.read_text() for p in sorted(again)] == [p.read_text() for p in sorted(paths)]
    assert shift_strength("llava_bench_coco") == 0.0
    assert shift_strength("llava_bench_coco_frost_5_sr_7") > shift_strength("llava_bench_coco_frost_1")
    dd = datasets.load_from_disk(str(syn_dir))
    refs = list(dd["llava_bench_coco"]["reference_answer"])
    exact = lambda s: sum(r["text"] == ref for r, ref in zip(rows[s], refs, strict=True))  # noqa: E731
    assert exact("llava_bench_coco") > exact("llava_bench_coco_frost_3_KeyboardAug_3")
    assert not list((tmp_path / "resp").glob(".*"))  # atomic writes leave no temp files


def test_demo_responses_combined_wild(nat_dir, tmp_path):
    write_demo_responses(nat_dir, tmp_path, model_name="m", combined_wild=True)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "llava_bench_in_the_wild_English_m.jsonl" in files
    assert not any("in_the_wild_easy" in f or "in_the_wild_hard" in f for f in files)
    idx = json.loads((tmp_path / "lbwild_split_idx.json").read_text())
    dd = datasets.load_from_disk(str(nat_dir))
    rows = [json.loads(line) for line in open(tmp_path / "llava_bench_in_the_wild_English_m.jsonl")]
    assert len(rows) == 8
    easy_ids = [rows[i]["question_id"] for i in idx["easy_ood_fst_cd_new"]]
    assert easy_ids == list(dd["llava_bench_in_the_wild_easy_English"]["question_id"])
    hard_ids = [rows[i]["question_id"] for i in idx["hard_ood_fst_cd_new"]]
    assert hard_ids == list(dd["llava_bench_in_the_wild_hard_English"]["question_id"])


def test_text_augmenters():
    text = "What is the main subject of this image?"
    assert keyboard_typos(text, 0) == text
    typos = keyboard_typos(text, 3, seed=1)
    assert typos != text and len(typos) == len(text)
    assert keyboard_typos(text, 3, seed=1) == typos
    assert synonym_rewrite(text, 0) == "what is the main subject of this image"
    assert synonym_rewrite(text, 7, seed=2) == synonym_rewrite(text, 7, seed=2)


def test_image_corruptions_increase_with_severity():
    from PIL import Image

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    base = _pixels(img)
    d1, d5 = (np.abs(_pixels(defocus_blur(img, s)) - base).mean() for s in (1, 5))
    f1, f5 = (np.abs(_pixels(frost(img, s)) - base).mean() for s in (1, 5))
    assert 0 < d1 < d5 and 0 < f1 < f5
    assert defocus_blur(img, 3).size == img.size
    assert np.array_equal(_pixels(frost(img, 3, seed=4)), _pixels(frost(img, 3, seed=4)))


def test_combined_wild_needs_the_normal_split(tmp_path):
    scen = ["llava_bench_coco_English", "llava_bench_in_the_wild_easy_German"]
    out = build_demo_dataset(
        tmp_path / "d", benchmark="natural", scenarios=scen, n_images=2, questions_per_image=1
    )
    with pytest.raises(ValueError, match="llava_bench_in_the_wild_normal_German is not"):
        write_demo_responses(out, tmp_path / "r", combined_wild=True)
    assert len(write_demo_responses(out, tmp_path / "r2")) == 2  # per-split files work without it


def test_demo_shifts_are_the_make_shifts_transforms(syn_dir):
    """The demo's shifted images and questions are those of ``lmms_emi.shifts`` (imagecorruptions, nlpaug)
    with make-shifts' row seeds: the photo's index for the image, the question id for the text."""
    from lmms_emi.shifts.family import row_seed
    from lmms_emi.shifts.text import TextShift
    from lmms_emi.shifts.visual import apply_corruption

    dd = datasets.load_from_disk(str(syn_dir))
    clean = dd["llava_bench_coco"]
    for split, corruption, severity in (
        ("llava_bench_coco_defocus_blur_5", "defocus_blur", 5),
        ("llava_bench_coco_frost_3_KeyboardAug_3", "frost", 3),
    ):
        for qid in (0, 2, 4):  # questions_per_image=2: the first question of photos 0, 1, 2
            photo = qid // 2
            expected = apply_corruption(_pixels(clean[qid]["image"]).astype(np.uint8), corruption, severity,
                                        row_seed(0, corruption, photo))  # fmt: skip
            assert np.array_equal(_pixels(dd[split][qid]["image"]), expected), (split, qid)
    for split, aug, level in (
        ("llava_bench_coco_sr_7", "sr", 7),
        ("llava_bench_coco_frost_3_KeyboardAug_3", "KeyboardAug", 3),
    ):
        for qid, question in enumerate(clean["question"]):
            expected = TextShift(aug, level).apply(question, row_seed(0, aug, qid))
            assert dd[split][qid]["question"] == expected, (split, qid)

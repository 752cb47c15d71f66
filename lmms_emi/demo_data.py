"""A small, offline, LLaVA-Bench-shift-shaped demo dataset and a fake model's responses to it.

This is **demo data**, made so the whole pipeline (lmms-eval tasks, embeddings, EMI, report) runs on a machine
with no dataset hub. It imitates the *shape* of the real benchmarks, not their content:

* images: real photographs shipped inside the ``scikit-image`` wheel (``skimage.data``: astronaut, chelsea,
  coffee, rocket, camera, ...), resized so the longer side is 224 px;
* questions: three generic templates ("What is the main subject ...", "Describe ...", "What colors ...")
  with hand-written reference answers per image;
* visual shifts (synthetic benchmark): the paper's own transforms, ``imagecorruptions``' ``defocus_blur`` and
  ``frost`` at the split's severity, through :mod:`lmms_emi.shifts` (the code of ``lmms-emi make-shifts``),
  seeded per photo;
* text shifts (synthetic): ``KeyboardAug_{1,3}`` = ``nlpaug``'s KeyboardAug typos, ``sr_{4,7}`` = ``nlpaug``'s
  SynonymAug over offline WordNet 3.0, lower-cased without punctuation (the real ``sr`` splits look like
  that), both through :mod:`lmms_emi.shifts`, seeded per question;
* natural benchmark: the language splits are fixed hand translations of the three templates followed by
  "; Please answer in English." (as in the real files); the ``in_the_wild`` splits use the same photos with a
  per-image "in-the-wild" restyling (crop, rotation, colour cast) whose strength decides the easy / hard
  halves;
  ``normal`` holds every in-the-wild row.

Everything is deterministic for a given ``seed``. ``question_id`` is a stable int per (image, question),
identical across the scenarios of one visual source (COCO-like or in-the-wild), exactly as in the reference
response files.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lmms_emi import scenarios as sc
from lmms_emi._io import atomic_write_text
from lmms_emi.shifts.family import row_seed
from lmms_emi.shifts.text import TextShift, letters_only
from lmms_emi.shifts.visual import apply_corruption

__all__ = [
    "IMAGE_POOL",
    "QUESTION_TEMPLATES",
    "build_demo_dataset",
    "defocus_blur",
    "frost",
    "keyboard_typos",
    "shift_strength",
    "synonym_rewrite",
    "write_demo_responses",
]

IMAGE_SIDE = 224
DEMO_MODEL = "demo-model"

# ---------------------------------------------------------------------------------------------------------
# Content: photos from skimage.data, question templates, reference answers
# ---------------------------------------------------------------------------------------------------------

QUESTION_TEMPLATES: tuple[str, ...] = (
    "What is the main subject of this image?",
    "Describe the image in detail.",
    "What colors stand out in this image?",
)

# Hand translations of the templates; the real natural benchmark appends the same English instruction.
_TRANSLATIONS: dict[str, tuple[str, ...]] = {
    "English": QUESTION_TEMPLATES,
    "German": (
        "Was ist das Hauptmotiv dieses Bildes?",
        "Beschreibe das Bild ausführlich.",
        "Welche Farben fallen in diesem Bild auf?",
    ),
    "Chinese": ("这张图片的主要内容是什么？", "请详细描述这张图片。", "这张图片中哪些颜色最突出？"),
    "Korean": (
        "이 이미지의 주요 대상은 무엇입니까?",
        "이 이미지를 자세히 설명해 주세요.",
        "이 이미지에서 눈에 띄는 색은 무엇입니까?",
    ),
    "Greek": (
        "Ποιο είναι το κύριο θέμα αυτής της εικόνας;",
        "Περιγράψτε την εικόνα λεπτομερώς.",
        "Ποια χρώματα ξεχωρίζουν σε αυτή την εικόνα;",
    ),
    "Arabic": (
        "ما هو الموضوع الرئيسي لهذه الصورة؟",
        "صف الصورة بالتفصيل.",
        "ما الألوان البارزة في هذه الصورة؟",
    ),
    "Hindi": (
        "इस चित्र का मुख्य विषय क्या है?",
        "चित्र का विस्तार से वर्णन करें।",
        "इस चित्र में कौन से रंग सबसे अलग दिखते हैं?",
    ),
}
_ANSWER_IN_ENGLISH = "; Please answer in English."


@dataclass(frozen=True)
class _Photo:
    name: str  # skimage.data loader name
    answers: tuple[str, str, str]  # reference answers to QUESTION_TEMPLATES


IMAGE_POOL: tuple[_Photo, ...] = (
    _Photo(
        "astronaut",
        (
            "The main subject is a smiling astronaut in an orange spacesuit.",
            "A smiling astronaut in an orange flight suit poses before an American flag, with a model of "
            "a space shuttle behind her and a black helmet in the lower right corner.",
            "Orange from the spacesuit, red, white and blue from the flag, and a black helmet.",
        ),
    ),
    _Photo(
        "chelsea",
        (
            "The main subject is the face of a tabby cat.",
            "A close-up of a brown tabby cat's face with big yellow-green eyes, a pink nose and long white "
            "whiskers, looking at the camera.",
            "Brown and beige fur, yellow-green eyes and a pink nose.",
        ),
    ),
    _Photo(
        "coffee",
        (
            "The main subject is a cup of coffee on a saucer.",
            "A white cup of coffee with a thin layer of crema sits on a red saucer with a spoon, on a wooden "
            "table seen from above.",
            "Red saucer, white cup, brown coffee and a wooden table.",
        ),
    ),
    _Photo(
        "rocket",
        (
            "The main subject is a rocket on a launch pad.",
            "A tall white rocket stands on its launch pad between service towers at dusk, under a deep blue "
            "sky, with bright lights at the base.",
            "Deep blue sky, a white rocket and yellow lights.",
        ),
    ),
    _Photo(
        "camera",
        (
            "The main subject is a man operating a camera on a tripod.",
            "A black and white photo of a man in a dark coat looking through a camera on a tripod, on "
            "a lawn with buildings in the distance.",
            "It is a black and white photograph: grey tones and a dark coat.",
        ),
    ),
    _Photo(
        "coins",
        (
            "The main subject is a collection of old coins.",
            "A grayscale picture of about two dozen old coins of different sizes laid out in rows on a dark "
            "background.",
            "Only grey tones: bright coins on a dark background.",
        ),
    ),
    _Photo(
        "hubble_deep_field",
        (
            "The main subject is a field of distant galaxies seen by a space telescope.",
            "A deep space image filled with many small galaxies of different shapes, spirals and ellipses, "
            "scattered over a black background.",
            "Black space with orange, white and blue galaxies.",
        ),
    ),
    _Photo(
        "immunohistochemistry",
        (
            "The main subject is a microscope image of stained tissue.",
            "A microscope slide of tissue stained for immunohistochemistry: brown stained gland structures "
            "surrounded by small blue nuclei.",
            "Brown stain and pale blue nuclei on a light background.",
        ),
    ),
    _Photo(
        "moon",
        (
            "The main subject is the surface of the moon.",
            "A grayscale close view of the lunar surface with a few small craters and darker patches.",
            "Shades of grey.",
        ),
    ),
    _Photo(
        "clock",
        (
            "The main subject is a blurry round clock.",
            "A blurry grayscale photo of a small round clock face in the middle of a plain grey background.",
            "Grey tones with a lighter clock face.",
        ),
    ),
    _Photo(
        "retina",
        (
            "The main subject is a photograph of a human retina.",
            "A fundus photograph of the back of an eye showing the bright optic disc and branching blood "
            "vessels on an orange background.",
            "Orange and red, with a bright yellow optic disc.",
        ),
    ),
    _Photo(
        "page",
        (
            "The main subject is a page of printed text.",
            "A grayscale scan of a book page titled Region-based segmentation, with a paragraph of printed "
            "text and a line of code.",
            "Black text on a grey and white page.",
        ),
    ),
)

# ---------------------------------------------------------------------------------------------------------
# Deterministic randomness
# ---------------------------------------------------------------------------------------------------------


def _rng(seed: int, *keys: object) -> np.random.Generator:
    """A generator seeded from ``seed`` and a crc32 hash of ``keys`` (independent of PYTHONHASHSEED)."""
    digest = zlib.crc32("|".join(map(str, keys)).encode())
    return np.random.default_rng([seed, digest])


def _load_photo(name: str) -> Image.Image:
    import skimage.data

    arr = np.asarray(getattr(skimage.data, name)())
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    img = Image.fromarray(arr)
    img = img.convert("RGB")
    img.thumbnail((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.LANCZOS)
    return img


# ---------------------------------------------------------------------------------------------------------
# Visual shifts
# ---------------------------------------------------------------------------------------------------------


def _corrupt(image: Image.Image, corruption: str, severity: int, seed: int) -> Image.Image:
    array = apply_corruption(np.asarray(image.convert("RGB")), corruption, int(severity), seed)
    return Image.fromarray(array)


def defocus_blur(image: Image.Image, severity: int, *, seed: int = 0) -> Image.Image:
    """``imagecorruptions``' defocus blur (a disk kernel of radius 3/4/6/8/10 px by severity)."""
    return _corrupt(image, "defocus_blur", severity, row_seed(seed, "defocus_blur", 0))


def frost(image: Image.Image, severity: int, *, seed: int = 0) -> Image.Image:
    """``imagecorruptions``' frost (one of its frost photographs, blended by severity), seeded by ``seed``."""
    return _corrupt(image, "frost", severity, row_seed(seed, "frost", 0))


def _wild_restyle(image: Image.Image, strength: float, rng: np.random.Generator) -> Image.Image:
    """ "In-the-wild" restyling of strength s ∈ [0, 1]: crop, rotation, colour cast, contrast."""
    w, h = image.size
    crop = 1.0 - 0.35 * strength
    cw, ch = max(8, int(w * crop)), max(8, int(h * crop))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    img = image.crop((x0, y0, x0 + cw, y0 + ch)).rotate(
        float(rng.uniform(-25, 25) * strength), resample=Image.Resampling.BILINEAR, expand=False
    )
    arr = np.asarray(img, dtype=np.float32) / 255.0
    cast = 1.0 + strength * rng.uniform(-0.35, 0.35, size=3).astype(np.float32)
    contrast = 1.0 - 0.5 * strength
    arr = np.clip((arr - 0.5) * contrast + 0.5, 0, 1) * cast
    img = Image.fromarray((np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8))
    img.thumbnail((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.LANCZOS)
    return img


# ---------------------------------------------------------------------------------------------------------
# Text shifts
# ---------------------------------------------------------------------------------------------------------


def keyboard_typos(text: str, level: int, *, seed: int = 0, key: object = "") -> str:
    """``KeyboardAug_<level>``: ``nlpaug``'s KeyboardAug, at most ``level`` typo'd words; level 0: none."""
    if level == 0:
        return text
    return TextShift("KeyboardAug", level).apply(text, row_seed(seed, "KeyboardAug", key))


def synonym_rewrite(text: str, level: int, *, seed: int = 0, key: object = "") -> str:
    """``sr_<level>``: lower-case, letters only, a share ``level / 10`` of the words replaced by WordNet
    synonyms (``nlpaug``'s SynonymAug); level 0: the normalisation alone."""
    if level == 0:
        return letters_only(text)
    return TextShift("sr", level).apply(text, row_seed(seed, "sr", key))


# ---------------------------------------------------------------------------------------------------------
# Scenario parsing and strength
# ---------------------------------------------------------------------------------------------------------


_WILD_DIFFICULTY = {"easy": 0.35, "normal": 0.5, "hard": 0.7}
_LANG_DIFFICULTY = {
    "English": 0.0,
    "German": 0.1,
    "Chinese": 0.2,
    "Korean": 0.25,
    "Greek": 0.3,
    "Arabic": 0.35,
    "Hindi": 0.4,
}


def shift_strength(split: str) -> float:
    """A heuristic shift strength in [0, 1] of a scenario, used only by the demo model to degrade its answers.

    synthetic: ``0.08·severity + 0.06·level`` (severity, level ∈ {0, 1, 3, 4, 5, 7});
    natural: language difficulty + in-the-wild difficulty (easy < normal < hard), capped at 1;
    a split name of neither benchmark counts as a medium shift (0.5).
    """
    scenario = sc.parse_split(split)
    if scenario is None:
        return 0.5
    if scenario.benchmark == "synthetic":
        return min(1.0, 0.08 * scenario.severity + 0.06 * scenario.text_level)
    wild = _WILD_DIFFICULTY.get(scenario.wild_level or "", 0.0)
    return min(1.0, wild + _LANG_DIFFICULTY[scenario.language])


# ---------------------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------------------


def _wild_strengths(n_images: int, seed: int) -> np.ndarray:
    """Per-image restyling strength of the in-the-wild source; the lower half is 'easy', the upper 'hard'."""
    return _rng(seed, "wild-strengths", n_images).uniform(0.1, 1.0, size=n_images)


def _wild_halves(n_images: int, seed: int) -> tuple[list[int], list[int]]:
    order = np.argsort(_wild_strengths(n_images, seed), kind="stable")
    half = n_images // 2
    return sorted(order[:half].tolist()), sorted(order[half:].tolist())


def _rows_for(
    scenario: sc.Scenario,
    photos: Sequence[_Photo],
    base: Sequence[Image.Image],
    questions_per_image: int,
    seed: int,
) -> list[dict]:
    rows: list[dict] = []
    n_images = len(photos)
    image_ids: Sequence[int] = range(n_images)
    if scenario.wild_level in ("easy", "hard"):
        easy, hard = _wild_halves(n_images, seed)
        image_ids = easy if scenario.wild_level == "easy" else hard
    strengths = _wild_strengths(n_images, seed)
    for i in image_ids:
        photo, img = photos[i], base[i]
        if scenario.corruption is not None:  # the same code and seeds as make-shifts (row = photo)
            img = _corrupt(
                img, scenario.corruption, scenario.severity, row_seed(seed, scenario.corruption, i)
            )
        elif scenario.wild_level is not None:
            img = _wild_restyle(img, float(strengths[i]), _rng(seed, "wild", i))
        for q in range(questions_per_image):
            qid = i * questions_per_image + q
            question = QUESTION_TEMPLATES[q]
            if scenario.text_aug == "KeyboardAug":
                question = keyboard_typos(question, scenario.text_level, seed=seed, key=qid)
            elif scenario.text_aug == "sr":
                question = synonym_rewrite(question, scenario.text_level, seed=seed, key=qid)
            elif scenario.benchmark == "natural" and scenario.language != "English":
                question = _TRANSLATIONS[scenario.language][q] + _ANSWER_IN_ENGLISH
            rows.append(
                {"question_id": qid, "image": img, "question": question, "reference_answer": photo.answers[q]}
            )
    return rows


def build_demo_dataset(
    out_dir: str | Path,
    *,
    benchmark: str = "synthetic",
    scenarios: Sequence[str] | None = None,
    n_images: int = 6,
    questions_per_image: int = 2,
    seed: int = 0,
) -> Path:
    """Build the demo dataset and save it with ``DatasetDict.save_to_disk(out_dir)``; return ``out_dir``.

    One split per scenario, named as the real split (``lmms_emi.scenarios``); ``scenarios`` (split or task
    names) restricts which are written. Columns: ``question_id`` (int), ``image`` (``datasets.Image``),
    ``question``, ``reference_answer``. Size per split: ``n_images * questions_per_image`` rows (half the
    images for the natural in-the-wild easy / hard splits).
    """
    import datasets

    if not 1 <= n_images <= len(IMAGE_POOL):
        raise ValueError(f"n_images must be in [1, {len(IMAGE_POOL)}], got {n_images}")
    if not 1 <= questions_per_image <= len(QUESTION_TEMPLATES):
        raise ValueError(
            f"questions_per_image must be in [1, {len(QUESTION_TEMPLATES)}], got {questions_per_image}"
        )
    chosen = sc.select_scenarios(benchmark, scenarios)
    photos = IMAGE_POOL[:n_images]
    base = [_load_photo(p.name) for p in photos]
    features = datasets.Features(
        {
            "question_id": datasets.Value("int64"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "reference_answer": datasets.Value("string"),
        }
    )
    splits = {}
    for scenario in chosen:
        rows = _rows_for(scenario, photos, base, questions_per_image, seed)
        columns = {name: [row[name] for row in rows] for name in features}
        splits[scenario.split] = datasets.Dataset.from_dict(columns, features=features)
    out = Path(out_dir)
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one bar per split is noise here
    try:
        datasets.DatasetDict(splits).save_to_disk(str(out))
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
    meta = {
        "benchmark": benchmark,
        "n_images": n_images,
        "questions_per_image": questions_per_image,
        "seed": seed,
    }
    atomic_write_text(out / _META_FILE, json.dumps(meta, indent=1))
    return out


# ---------------------------------------------------------------------------------------------------------
# Demo responses
# ---------------------------------------------------------------------------------------------------------

_BASE_ERROR = 0.1  # the demo model's error level without any shift
_FILLER = (
    "I am not sure what is shown here.",
    "The image appears to contain some objects.",
    "It is hard to tell from this picture.",
)


def _demo_answer(reference: str, other: str, strength: float, rng: np.random.Generator) -> str:
    """Degrade ``reference`` by shift strength s: w.p. s use another image's answer; drop ~s/2 of words."""
    strength = _BASE_ERROR + (1.0 - _BASE_ERROR) * strength  # even in-distribution answers are imperfect
    if rng.random() < strength:
        base = other
    else:
        base = reference
    words = base.split()
    keep = [w for w in words if rng.random() >= strength / 2] or words[:1]
    answer = " ".join(keep)
    if rng.random() < strength:
        answer = _FILLER[int(rng.integers(len(_FILLER)))] + " " + answer
    return answer


def _write_jsonl(path: Path, records: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_demo_responses(
    dataset_dir: str | Path,
    out_dir: str | Path,
    model_name: str = DEMO_MODEL,
    seed: int = 0,
    *,
    combined_wild: bool = False,
) -> list[Path]:
    """Write ``<split>_<model_name>.jsonl`` response files of a fake model for every split in ``dataset_dir``.

    The fake model answers with the reference, degraded by :func:`shift_strength` of the split on top of a
    small base error (it drifts to another image's answer, drops words and adds hedging filler), so EMI
    falls as the shift grows. Each line:
    ``question_id``, ``prompt``, ``text``, ``answer_id``, ``model_id``, ``metadata`` (as the reference files).

    ``combined_wild=True`` writes the natural in-the-wild splits the way the paper's files are laid out:
    one ``llava_bench_in_the_wild_<lang>_<model>.jsonl`` with every question (from the ``normal`` split) plus
    ``lbwild_split_idx.json`` holding the easy / hard row positions (``easy_ood_fst_cd_new``,
    ``hard_ood_fst_cd_new``); it needs the ``normal`` splits in the dataset.
    """
    import datasets

    dd = datasets.load_from_disk(str(dataset_dir))
    if not isinstance(dd, datasets.DatasetDict):
        dd = datasets.DatasetDict({"train": dd})
    meta = _read_meta(Path(dataset_dir))
    if combined_wild:
        for split in dd:
            scenario = sc.parse_split(split)
            if scenario is None or scenario.wild_level is None:
                continue
            normal = f"{sc.WILD}_normal_{scenario.language}"
            if normal not in dd:
                raise ValueError(
                    f"combined_wild: {split} is in {dataset_dir} but {normal} is not; the combined "
                    "in-the-wild file holds every question, so build the dataset with the normal split too"
                )
    out = Path(out_dir)
    written: list[Path] = []
    wild_index: dict[str, list[int]] = {}
    for split, ds in dd.items():
        table = ds.select_columns([c for c in ds.column_names if c != "image"])
        qids = list(table["question_id"]) if "question_id" in table.column_names else list(range(len(table)))
        refs = list(table["reference_answer"])
        questions = list(table["question"])
        scenario = sc.parse_split(split)
        wild_combined = combined_wild and scenario is not None and scenario.wild_level is not None
        hard_qids: set[int] = set()
        if wild_combined:
            assert scenario is not None
            if scenario.wild_level != "normal":
                continue  # easy / hard rows are positions inside the combined (normal) file
            if meta is None:
                raise ValueError(f"{dataset_dir} has no {_META_FILE}: combined_wild needs a demo dataset")
            qpi = int(meta["questions_per_image"])
            easy_imgs, hard_imgs = _wild_halves(int(meta["n_images"]), int(meta["seed"]))
            hard_qids = {i * qpi + q for i in hard_imgs for q in range(qpi)}
            pos_of = {int(q): p for p, q in enumerate(qids)}
            wild_index = {
                "easy_ood_fst_cd_new": [pos_of[i * qpi + q] for i in easy_imgs for q in range(qpi)],
                "hard_ood_fst_cd_new": [pos_of[i * qpi + q] for i in hard_imgs for q in range(qpi)],
            }
            file_split = f"{sc.WILD}_{scenario.language}"
        else:
            file_split = split
        records = []
        for pos, (qid, ref, question) in enumerate(zip(qids, refs, questions, strict=True)):
            rng = _rng(seed, model_name, split, qid)
            strength = shift_strength(split)
            if wild_combined:  # the combined file answers each row as its easy / hard split would
                strength = shift_strength(
                    split.replace("_normal_", "_hard_" if qid in hard_qids else "_easy_")
                )
            other = refs[(pos + 1 + int(rng.integers(max(1, len(refs) - 1)))) % len(refs)]
            records.append(
                {
                    "question_id": int(qid),
                    "prompt": question,
                    "text": _demo_answer(ref, other, strength, rng),
                    "answer_id": f"{model_name}-{split}-{qid}",
                    "model_id": model_name,
                    "metadata": {"demo": True, "shift_strength": round(strength, 4)},
                }
            )
        path = out / f"{file_split}_{model_name}.jsonl"
        _write_jsonl(path, records)
        written.append(path)
    if wild_index:
        idx_path = out / "lbwild_split_idx.json"
        atomic_write_text(idx_path, json.dumps(wild_index, indent=1))
        written.append(idx_path)
    return written


_META_FILE = "lmms_emi_demo.json"


def _read_meta(dataset_dir: Path) -> dict | None:
    path = dataset_dir / _META_FILE
    return json.loads(path.read_text()) if path.is_file() else None

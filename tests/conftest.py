"""Shared fixtures. The paper's reference data lives in ../shared/reference beside the checkout (never copied
into the project); ``LMMS_EMI_REFERENCE_DIR`` overrides that location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def reference_dir() -> Path:
    return Path(os.environ.get("LMMS_EMI_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "reference"))


@pytest.fixture(scope="session", autouse=True)
def _no_estimator_download(tmp_path_factory) -> None:
    """No test downloads a registered estimator: a run whose encoders have one (the paper's) looks in an empty
    cache of this session, then at a mirror that refuses connections (subprocesses inherit both)."""
    for var, value in (
        ("LMMS_EMI_ESTIMATOR_CACHE", str(tmp_path_factory.mktemp("estimator_cache"))),
        ("LMMS_EMI_ESTIMATOR_MIRROR", "http://127.0.0.1:9/no-download-in-tests"),
    ):
        os.environ.setdefault(var, value)


@pytest.fixture(scope="session")
def reference_checkpoint() -> Path:
    """The paper's pre-trained CLUB state dict (``CLUB_global.pt``)."""
    path = reference_dir() / "CLUB_global.pt"
    if not path.is_file():
        pytest.skip(f"reference checkpoint not found at {path} (set LMMS_EMI_REFERENCE_DIR)")
    return path


@pytest.fixture(scope="session")
def reference_responses() -> Path:
    """Folder of real LLaVA-13B response files (``<scenario>_<model>.jsonl``)."""
    path = reference_dir() / "responses"
    if not path.is_dir():
        pytest.skip(f"reference responses not found at {path} (set LMMS_EMI_REFERENCE_DIR)")
    return path


DEMO_MODEL = "demo-model"
DEMO_NATURAL_SPLITS = (
    "llava_bench_coco_English",
    "llava_bench_coco_German",
    "llava_bench_in_the_wild_easy_English",
    "llava_bench_in_the_wild_normal_English",
    "llava_bench_in_the_wild_hard_English",
)


@pytest.fixture(scope="session")
def demo_natural(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The offline demo dataset of the natural benchmark, built once per session: the splits of
    ``DEMO_NATURAL_SPLITS`` (4 photos x 2 questions; the in-the-wild easy / hard splits half of that) and the
    demo model's responses (``DEMO_MODEL``) laid out as the paper's files (``combined_wild``).

    ``{"data": save_to_disk folder, "responses": folder}``. Shared by every test module: read it, never
    write into it (each module writes its outputs in its own ``tmp_path_factory.mktemp`` folder)."""
    from lmms_emi.demo_data import build_demo_dataset, write_demo_responses

    root = tmp_path_factory.mktemp("demo_natural")
    data = build_demo_dataset(
        root / "data", benchmark="natural", scenarios=DEMO_NATURAL_SPLITS, n_images=4, questions_per_image=2
    )
    write_demo_responses(data, root / "responses", model_name=DEMO_MODEL, combined_wild=True)
    return {"data": data, "responses": root / "responses"}

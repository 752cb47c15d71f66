"""Real LLaVA model classes end to end, offline: tiny random-weight LLaVA-1.5
(``LlavaForConditionalGeneration``) and LLaVA-NeXT (``LlavaNextForConditionalGeneration``) folders built on
the spot (``tests/tiny_llava.py``) and run through lmms-eval's own ``llava_hf`` model on three synthetic
LLaVA-Bench-shift tasks (the ID task, a visual and a text shift) of a small demo dataset.

For each family: plain ``lmms-eval ... --metrics emi`` and ``lmms-emi eval`` (the same options as flags) in
subprocesses give finite EMI per task, EMID and bounds in lmms-eval's results JSON, the same numbers as each
other, and ``lmms-emi analyze`` of the run folder gives them again. A ``sitecustomize`` on the subprocesses'
``PYTHONPATH`` logs what every ``generate`` call received: one call per sample, each with non-empty pixel
tensors of the image processor's size (the images reached the model).

Two things of the environment, not of lmms-emi, are worked around here (see ``tiny_llava.py``):
lmms-eval 0.7.3's ``llava_hf`` imports ``decord`` at import time without declaring it (a stub is put on the
path where it is missing), and its default ``device_map=""`` is refused by transformers 5
(``ValueError: When passing device_map as a string, the value needs to be a device name ... but found .``),
so the runs pass ``device_map=cpu``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_llava import FAMILIES, save_tiny_llava, write_probe  # tests/ is on sys.path (pytest rootdir)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCENARIOS = ("llava_bench_coco", "llava_bench_coco_frost_5", "llava_bench_coco_sr_7")
TASKS = ["lbshift_syn_" + s for s in SCENARIOS]
ID_TASK, OOD_TASKS = TASKS[0], TASKS[1:]
N_PER_TASK = 8  # 4 photos x 2 questions
IMAGE_SIZE = 32  # tiny_llava's vision config and image processor
MAX_NEW_TOKENS = 8
STEPS, BOOTSTRAP = "200", "50"
# the session's no-download guard (conftest) is kept; every other lmms-emi variable is cleared
KEEP_VARIABLES = ("LMMS_EMI_ESTIMATOR_CACHE", "LMMS_EMI_ESTIMATOR_MIRROR")


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def tiny_llava_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{"llava": folder, "llava_next": folder}``: tiny random-weight checkpoints (save_pretrained)."""
    root = tmp_path_factory.mktemp("tiny_llava")
    return {family: save_tiny_llava(root / family, family) for family in FAMILIES}


@pytest.fixture(scope="session")
def synthetic_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The offline demo dataset of three synthetic scenarios (save_to_disk folder); read only."""
    from lmms_emi.demo_data import build_demo_dataset

    root = tmp_path_factory.mktemp("synthetic_demo")
    return build_demo_dataset(
        root / "data", benchmark="synthetic", scenarios=SCENARIOS, n_images=4, questions_per_image=2
    )


@pytest.fixture(scope="session")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_probe(tmp_path_factory.mktemp("probe"))


def _env(probe: Path, log: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for name in list(env):
        if name.startswith("LMMS_EMI_") and name not in KEEP_VARIABLES:
            del env[name]
    env.pop("RANK", None)
    env.update(
        OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(probe), env.get("PYTHONPATH")])),
        LMMS_EMI_TEST_GENERATE_LOG=str(log),
    )  # fmt: skip
    env.update(extra)
    return env


def _model_args(folder: Path) -> list[str]:
    return [
        "--model", "llava_hf", "--model_args", f"pretrained={folder},device=cpu,device_map=cpu",
        "--tasks", ",".join(TASKS), "--gen_kwargs", f"max_new_tokens={MAX_NEW_TOKENS}", "--log_samples",
    ]  # fmt: skip


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc, seconds


def _results(out: Path, proc: subprocess.CompletedProcess[str]) -> tuple[dict, Path]:
    files = sorted(out.rglob("*_results.json"))
    assert len(files) == 1, (files, proc.stderr[-5000:])
    return json.loads(files[0].read_text()), files[0]


def _generate_calls(log: Path) -> list[dict]:
    assert log.is_file(), "the generate probe logged nothing: the model's generate was never called"
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module", params=FAMILIES)
def runs(
    request: pytest.FixtureRequest,
    tiny_llava_dirs: dict[str, Path],
    synthetic_demo: Path,
    probe: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict:
    """Per family: plain ``lmms-eval --metrics emi`` and ``lmms-emi eval``; what each generate call saw."""
    family = request.param
    root = tmp_path_factory.mktemp(f"real_{family}")
    folder = tiny_llava_dirs[family]
    got: dict = {"family": family, "root": root}

    plain_env = _env(
        probe, root / "generate_plain.jsonl",
        LMMS_EMI_DATA=f"synthetic={synthetic_demo}", LMMS_EMI_ENCODERS="offline", LMMS_EMI_BUILTIN_TASKS="0",
        LMMS_EMI_ESTIMATOR_STEPS=STEPS, LMMS_EMI_BOOTSTRAP=BOOTSTRAP, LMMS_EMI_EMBEDDING_CACHE="off",
        LMMS_EMI_DEVICE="cpu",
    )  # fmt: skip
    out = root / "plain"
    cmd = [str(BIN / "lmms-eval"), *_model_args(folder), "--metrics", "emi", "--output_path", str(out)]
    proc, seconds = _run(cmd, root, plain_env)
    results, path = _results(out, proc)
    got["plain"] = {"results": results, "file": path, "proc": proc, "seconds": seconds,
                    "calls": _generate_calls(root / "generate_plain.jsonl")}  # fmt: skip

    out = root / "launcher"
    cmd = [
        str(BIN / "lmms-emi"), "eval", *_model_args(folder), "--output_path", str(out),
        "--data", f"synthetic={synthetic_demo}", "--encoders", "offline", "--no_builtin_tasks",
        "--estimator_steps", STEPS, "--bootstrap", BOOTSTRAP, "--emi_cache", "off", "--emi_device", "cpu",
    ]  # fmt: skip
    proc, seconds = _run(cmd, root, _env(probe, root / "generate_launcher.jsonl"))
    results, path = _results(out, proc)
    got["launcher"] = {"results": results, "file": path, "proc": proc, "seconds": seconds,
                       "calls": _generate_calls(root / "generate_launcher.jsonl")}  # fmt: skip
    return got


def _numbers(results: dict) -> dict[tuple[str, str], float]:
    out = {}
    for task in TASKS:
        entry = results["results"][task]
        out[(task, "emi,none")] = entry["emi,none"]
        if task in OOD_TASKS:
            out[(task, "emid,none")] = entry["emid,none"]
            out[(task, "emid_bound,none")] = entry["emid_bound,none"]
    return out


# ------------------------------------------------------------------------------------------- fast check
@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_llava_generates_through_llava_hf(
    family: str, tiny_llava_dirs: dict[str, Path], probe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The class behind ``--model llava_hf`` (lmms-eval's chat ``LlavaHf``) loads the tiny folder and answers
    one image question through its own ``generate_until``; its pixel tensors have the processor's size."""
    import numpy as np
    from PIL import Image

    monkeypatch.syspath_prepend(str(probe))  # the decord stub, where decord is missing
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lmms_eval.api.instance import Instance
    from lmms_eval.models import get_model

    cls = get_model("llava_hf")
    lm = cls(pretrained=str(tiny_llava_dirs[family]), device="cpu", device_map="cpu")
    seen: list[tuple[int, ...]] = []
    inner = lm.model.generate

    def generate(*args, **kwargs):
        seen.append(tuple(kwargs["pixel_values"].shape))
        return inner(*args, **kwargs)

    monkeypatch.setattr(lm.model, "generate", generate)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    doc = {"question": "What is shown in the image?"}

    def doc_to_messages(d: dict) -> list[dict]:
        parts = [{"type": "image", "url": image}, {"type": "text", "text": d["question"]}]
        return [{"role": "user", "content": parts}]

    lm.task_dict = {"t": {"test": [doc]}}
    req = Instance(
        request_type="generate_until",
        arguments=(doc["question"], doc_to_messages, {"max_new_tokens": 4}, 0, "t", "test"),
        idx=0,
        metadata={"task": "t", "doc_id": 0, "repeats": 1},
    )
    out = lm.generate_until([req])
    text = getattr(out[0], "text", out[0])
    assert isinstance(text, str)
    assert len(seen) == 1 and seen[0][0] == 1 and seen[0][-2:] == (IMAGE_SIZE, IMAGE_SIZE), seen
    if family == "llava_next":  # anyres: the base image plus at least one tile
        assert len(seen[0]) == 5 and seen[0][1] >= 2, seen


# ------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_plain_lmms_eval_with_real_model_gives_finite_emi(runs: dict) -> None:
    results = runs["plain"]["results"]
    assert "lmms_emi" in results, runs["plain"]["proc"].stderr[-3000:]
    for (task, key), value in _numbers(results).items():
        assert isinstance(value, float) and math.isfinite(value), (runs["family"], task, key, value)
    for task in OOD_TASKS:
        entry = results["results"][task]
        id_emi = results["results"][ID_TASK]["emi,none"]
        assert entry["emid,none"] == pytest.approx(id_emi - entry["emi,none"])
        assert entry["emid_bound,none"] >= entry["emid_bound_partial,none"] >= 0
        assert entry["emi_n,none"] == N_PER_TASK
    print(f"{runs['family']}: plain lmms-eval {runs['plain']['seconds']:.1f} s")


@pytest.mark.slow
def test_images_reached_the_model(runs: dict) -> None:
    """One generate call per sample and run, each with a non-empty pixel tensor of the processor's size."""
    cls = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration"}
    for kind in ("plain", "launcher"):
        calls = runs[kind]["calls"]
        assert len(calls) == N_PER_TASK * len(TASKS), (kind, len(calls))
        for call in calls:
            shape = call["pixel_values"]
            assert call["class"] == cls[runs["family"]]
            assert shape and all(n > 0 for n in shape) and shape[0] == 1, call
            assert shape[-3:] == [3, IMAGE_SIZE, IMAGE_SIZE], call
            if runs["family"] == "llava_next":
                assert len(shape) == 5 and shape[1] >= 2, call
            assert call["pixel_std"] > 0, call  # a real image, not a blank tensor
        # the images differ between samples (frost_5 is a different image from the clean one)
        assert len({round(c["pixel_std"], 6) for c in calls}) > len(TASKS), kind


@pytest.mark.slow
def test_launcher_with_real_model_gives_the_same_numbers(runs: dict) -> None:
    plain, launched = _numbers(runs["plain"]["results"]), _numbers(runs["launcher"]["results"])
    for key, value in plain.items():
        assert math.isfinite(launched[key]), key
        assert launched[key] == pytest.approx(value, abs=1e-9), key
    print(f"{runs['family']}: lmms-emi eval {runs['launcher']['seconds']:.1f} s")


@pytest.mark.slow
def test_analyze_of_the_real_model_run_gives_the_same_numbers(runs: dict, probe: Path) -> None:
    """``lmms-emi analyze OUT/<model dir>`` re-scores the plain run from its --log_samples output."""
    run_dir = runs["plain"]["file"].parent
    out = runs["root"] / "analyze"
    cmd = [
        str(BIN / "lmms-emi"), "analyze", str(run_dir), "--encoders", "offline",
        "--estimator-steps", STEPS, "--bootstrap", BOOTSTRAP, "--emi-cache", "off", "--emi-device", "cpu",
        "--output-path", str(out),
    ]  # fmt: skip
    _run(cmd, runs["root"], _env(probe, runs["root"] / "generate_analyze.jsonl"))
    reports = sorted(out.glob("*_emi_report_synthetic.json"))
    assert len(reports) == 1, sorted(out.iterdir())
    rows = {row["task"]: row for row in json.loads(reports[0].read_text())["tasks"]}
    assert set(rows) == set(TASKS)
    for (task, key), value in _numbers(runs["plain"]["results"]).items():
        field = {"emi,none": "emi", "emid,none": "emid", "emid_bound,none": "bound"}[key]
        assert rows[task][field] == pytest.approx(value, abs=1e-9), (task, key)
    assert not (runs["root"] / "generate_analyze.jsonl").exists()  # analyze runs no model


# ------------------------------------------------------------------------------------------- GPU check script
@pytest.mark.slow
def test_gpu_check_tiny_runs_and_writes_its_json(tmp_path: Path) -> None:
    """``benchmarks/gpu_check.py --tiny``: the GPU check's whole path with a tiny LLaVA on the CPU."""
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    cmd = [
        sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--tiny", "--json", str(out),
        "--workdir", str(tmp_path / "work"),
    ]  # fmt: skip
    proc, seconds = _run(cmd, tmp_path, env)
    report = json.loads(out.read_text())
    assert report["ok"] and report["tiny"] and report["device"] == "cpu"
    gen, scoring = report["generation"], report["scoring"]
    assert gen["generate_calls"] == report["settings"]["limit"] * len(gen["tasks"]) == 18
    assert gen["generation_samples_per_s"] > 0 and gen["new_tokens"] > 0
    assert gen["pixel_values_shapes"] == [[1, 3, IMAGE_SIZE, IMAGE_SIZE]]
    id_task, *ood = gen["tasks"]
    assert math.isfinite(gen["per_task"][id_task]["emi"])
    for task in ood:
        assert all(math.isfinite(v) for v in gen["per_task"][task].values()), task
    for precision in ("fp32", "bf16"):
        assert scoring[precision]["embedding_samples_per_s"] > 0
        assert scoring[precision]["images_per_s"] > 0 and scoring[precision]["texts_per_s"] > 0
        assert set(scoring[precision]["per_task"]) == set(gen["tasks"])
    assert scoring["bf16"]["amp_dtype"] == "torch.bfloat16" and scoring["fp32"]["amp_dtype"] == "None"
    diffs = scoring["max_abs_diff_fp32_vs_bf16"]
    assert all(math.isfinite(v) for v in diffs.values()) and diffs["emi"] < 0.05, diffs
    # the run computed its numbers in fp32 on the CPU: re-scoring in fp32 in-process gives them again
    assert scoring["in_run_precision"] == "fp32" and scoring["max_abs_diff_in_run_vs_rescored"] < 1e-9
    assert "max |fp32 - bf16|" in proc.stdout and "samples/s" in proc.stdout
    print(f"gpu_check --tiny: {seconds:.1f} s")

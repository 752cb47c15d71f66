"""The ``lmms-emi`` CLI end to end on the demo dataset with tiny random-weight encoders; its error paths."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_analysis import artifact

from lmms_emi.cli import main
from lmms_emi.cli._commands import COMMANDS

SCENARIOS = [
    "llava_bench_coco",
    "llava_bench_coco_frost_5",
    "llava_bench_coco_sr_7",
    "llava_bench_coco_defocus_blur_3_KeyboardAug_3",
]
ID_TASK = "lbshift_syn_llava_bench_coco"
OFFLINE = ["--encoders", "offline"]  # the encoders are checked before the data: ones that load here
FAST = ["--emi-cache", "off", "--estimator-steps", "40", "--bootstrap", "20", "-q"]
LEGACY_FAST = ["--cache-dir", "off", "--steps", "40", "--bootstrap", "20", "-q"]  # the old spellings


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> list[str]:
    """CLI flags for tiny random-weight CLIP-vision / XLM-R encoders saved to disk (real loading code)."""
    from helpers_embed import save_tiny_clip_vision, save_tiny_xlmr, tiny_encoder_flags

    root = tmp_path_factory.mktemp("encoders")
    vision = save_tiny_clip_vision(root / "clip")
    text = save_tiny_xlmr(root / "xlmr")
    return tiny_encoder_flags(vision, text)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    args = [
        "demo-data",
        str(root),
        "--scenarios",
        *SCENARIOS,
        "--n-images",
        "3",
        "--questions-per-image",
        "2",
    ]
    assert main(args) == 0
    return root


@pytest.fixture(scope="module")
def scored(demo, encoders, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("score")
    args = ["score", "--dataset", str(demo / "dataset"), "--responses", str(demo / "responses")]
    assert main([*args, "--benchmark", "synthetic", *encoders, *FAST, "--output-path", str(out)]) == 0
    return out


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("lmms-emi") and ": error: " in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------------------------------- happy paths
def test_demo_data_layout(demo):
    assert (demo / "dataset" / "dataset_dict.json").is_file()
    names = sorted(p.name for p in (demo / "responses").iterdir())
    assert names == sorted(f"{s}_demo-model.jsonl" for s in SCENARIOS)


def test_score_end_to_end(scored):
    report = json.loads(artifact(scored, "emi_report_synthetic.json").read_text())
    assert report["id_task"] == ID_TASK
    assert report["tasks"][0]["task"] == ID_TASK and len(report["tasks"]) == 4
    assert report["metadata"]["model"] == "demo-model"  # the only model in the folder
    assert report["estimator"]["source"] == "fitted" and report["estimator"]["comparability"] == "run"
    assert report["settings"]["n_resamples"] == 20
    assert report["correlations"]["bound"]["n_tasks"] == 3
    for t in report["tasks"][1:]:
        assert t["emid"] is not None and t["bound"] is not None and t["partial_bound"] is not None
        assert t["emid"] == pytest.approx(report["tasks"][0]["emi"] - t["emi"])
    for name in (
        "emi_report_synthetic.csv",
        "emi_report_synthetic.md",
        "emi_report_synthetic.png",
        "club_fitted.safetensors",
    ):
        assert artifact(scored, name).is_file()
    assert artifact(scored, "emi_embeddings.safetensors").is_file()
    assert not [p for p in scored.iterdir() if p.name.startswith(".")]  # no temp files left


def test_score_is_deterministic(demo, encoders, scored, tmp_path):
    """Same command twice, the second with the old flag spellings (hidden aliases): the same report."""
    args = ["score", "--dataset", str(demo / "dataset"), "--responses", str(demo / "responses")]
    legacy = [{"--vision-encoder": "--vision", "--text-encoder": "--text"}.get(a, a) for a in encoders]
    assert main([*args, *legacy, *LEGACY_FAST, "--output", str(tmp_path)]) == 0
    a = json.loads(artifact(scored, "emi_report_synthetic.json").read_text())
    b = json.loads(artifact(tmp_path, "emi_report_synthetic.json").read_text())
    strip = lambda d: {k: v for k, v in d.items() if k != "estimator"}  # noqa: E731 (paths differ)
    assert strip(a) == strip(b)


def test_train_estimator_then_score_with_it(demo, encoders, scored, tmp_path, capsys):
    ckpt = tmp_path / "frozen.safetensors"
    code, out, _ = _run(
        ["train-estimator", str(scored), "--output-path", str(ckpt), "--estimator-steps", "30", "-q"], capsys
    )
    assert code == 0 and ckpt.is_file() and str(ckpt) in out
    from lmms_emi.estimators.club import CLUB

    club = CLUB.from_checkpoint(ckpt)
    assert club.manifest_.encoders["vision"]["name"].endswith("clip")
    args = ["score", "--dataset", str(demo / "dataset"), "--responses", str(demo / "responses")]
    out_dir = tmp_path / "frozen_report"
    assert main([*args, *encoders, *FAST, "--estimator", str(ckpt), "--output-path", str(out_dir)]) == 0
    report = json.loads(artifact(out_dir, "emi_report_synthetic.json").read_text())
    assert report["estimator"]["source"] == "checkpoint" and report["estimator"]["comparability"] == "global"
    assert report["estimator"]["path"] == str(ckpt)
    assert not list(out_dir.glob("*club_fitted.safetensors"))


def test_analyze_run_folder_matches_score(demo, encoders, scored, tmp_path):
    """A run folder in lmms-eval's --log_samples layout, records made by the harness's own make_record:
    `analyze` reads the images back from the dataset and reproduces `score`'s numbers."""
    import datasets

    from lmms_emi.harness import session

    dd = datasets.load_from_disk(str(demo / "dataset"))
    run = tmp_path / "run" / "emi_replay"
    run.mkdir(parents=True)
    date = "20260101_000000"
    configs = {}
    for split in SCENARIOS:
        task = f"lbshift_syn_{split}"
        rows = dd[split].remove_columns("image")
        answers = {
            json.loads(line)["question_id"]: json.loads(line)["text"]
            for line in open(demo / "responses" / f"{split}_demo-model.jsonl")
        }
        lines = []
        for i in reversed(range(len(rows))):  # any order: rank-major in real runs
            doc = {**rows[i], session.DOC_ID_COLUMN: i, session.TASK_COLUMN: task}
            rec = session.RunSession().add_record(
                task, doc, answers[doc["question_id"]], doc["question"], doc["reference_answer"]
            )
            lines.append(
                json.dumps({"doc_id": i, "doc": doc, "emi": rec, "emid": {"task": task, "doc_id": i}})
            )
        (run / f"{date}_samples_{task}.jsonl").write_text("\n".join(lines) + "\n")
        configs[task] = {
            "dataset_path": str(demo / "dataset"),
            "dataset_kwargs": {"load_from_disk": True},
            "test_split": split,
        }
    results = {"configs": configs, "config": {"model": "emi_replay", "model_args": "model_name=demo-model"}}
    (run / f"{date}_results.json").write_text(json.dumps(results))

    est = artifact(scored, "club_fitted.safetensors")
    out = tmp_path / "analysis"
    args = [
        "analyze",
        str(tmp_path / "run"),
        *encoders,
        *FAST,
        "--estimator",
        str(est),
        "--output-path",
        str(out),
    ]
    assert main(args) == 0
    got = json.loads(artifact(out, "emi_report_synthetic.json").read_text())
    want = json.loads(artifact(scored, "emi_report_synthetic.json").read_text())
    assert got["metadata"]["model"] == "demo-model"
    assert [t["task"] for t in got["tasks"]] == [t["task"] for t in want["tasks"]]
    for g, w in zip(got["tasks"], want["tasks"], strict=True):
        for key in ("emi", "emid", "bound", "partial_bound"):
            assert g[key] == w[key], (g["task"], key)  # same inputs, estimator and seed: equal


def test_score_from_parquet_copy(demo, encoders, scored, tmp_path):
    """A local parquet copy (files named after the splits) gives the same numbers as the save_to_disk copy."""
    import datasets

    dd = datasets.load_from_disk(str(demo / "dataset"))
    for split in SCENARIOS:
        dd[split].to_parquet(str(tmp_path / "pq" / f"{split}.parquet"))
    args = ["score", "--dataset", str(tmp_path / "pq"), "--responses", str(demo / "responses")]
    est = artifact(scored, "club_fitted.safetensors")
    assert (
        main([*args, *encoders, *FAST, "--estimator", str(est), "--output-path", str(tmp_path / "out")]) == 0
    )
    got = json.loads(artifact(tmp_path / "out", "emi_report_synthetic.json").read_text())
    want = json.loads(artifact(scored, "emi_report_synthetic.json").read_text())
    assert [t["emi"] for t in got["tasks"]] == [t["emi"] for t in want["tasks"]]
    assert [t["bound"] for t in got["tasks"]] == [t["bound"] for t in want["tasks"]]


def test_eval_forwards_to_the_harness(capsys):
    code, out, _ = _run(["eval", "--help"], capsys)
    assert code == 0 and "lmms-eval" in out


# ---------------------------------------------------------------------------------------------- error paths
def test_unknown_scenario(demo, capsys):
    args = ["score", "--dataset", str(demo / "dataset"), "--responses", str(demo / "responses")]
    code, _, err = _run([*args, "--output-path", "x", "--scenarios", "llava_bench_coco_fog_9"], capsys)
    assert code == 2
    assert "unknown synthetic scenario 'llava_bench_coco_fog_9'" in _one_error_line(err)


def test_checkpoint_encoder_mismatch(demo, reference_checkpoint, tmp_path, capsys):
    """The paper's checkpoint (CLIP + XLM-R) with the offline encoders: refused before any model is loaded."""
    args = ["score", "--dataset", str(demo / "dataset"), "--responses", str(demo / "responses")]
    args += [
        "--encoders",
        "offline",
        "--estimator",
        str(reference_checkpoint),
        "--output-path",
        str(tmp_path),
    ]
    code, _, err = _run(args, capsys)
    assert code == 2
    line = _one_error_line(err)
    assert "trained on other encoders" in line and "vision.name" in line


def test_checkpoint_missing(demo, tmp_path, capsys):
    args = ["score", "--dataset", str(demo / "dataset"), "--responses", str(demo / "responses")]
    code, _, err = _run(
        [*args, "--estimator", str(tmp_path / "nope.pt"), "--output-path", str(tmp_path)], capsys
    )
    assert code == 2 and f"--estimator {tmp_path / 'nope.pt'}: no such file" in _one_error_line(err)


def test_too_few_samples(tmp_path, capsys):
    assert (
        main(
            [
                "demo-data",
                str(tmp_path),
                "--scenarios",
                "llava_bench_coco",
                "llava_bench_coco_sr_4",
                "--n-images",
                "1",
                "--questions-per-image",
                "1",
            ]
        )
        == 0
    )
    capsys.readouterr()
    args = ["score", "--dataset", str(tmp_path / "dataset"), "--responses", str(tmp_path / "responses")]
    code, _, err = _run([*args, "--output-path", str(tmp_path / "out"), *OFFLINE], capsys)
    assert code == 2
    assert "task 'lbshift_syn_llava_bench_coco' has 1 sample(s)" in _one_error_line(err)


def test_missing_and_bad_response_files(demo, tmp_path, capsys):
    args = ["score", "--dataset", str(demo / "dataset"), "--output-path", str(tmp_path / "o"), *OFFLINE]
    code, _, err = _run([*args, "--responses", str(demo / "responses"), "--model", "other-model"], capsys)
    assert code == 2 and "no responses of model 'other-model'" in _one_error_line(err)

    bad = tmp_path / "bad"
    bad.mkdir()
    for f in (demo / "responses").iterdir():
        (bad / f.name).write_text(f.read_text())
    target = bad / "llava_bench_coco_frost_5_demo-model.jsonl"
    lines = target.read_text().splitlines()
    lines[2] = '{"question_id": 2, "text": '  # truncated line
    target.write_text("\n".join(lines) + "\n")
    code, _, err = _run([*args, "--responses", str(bad)], capsys)
    assert code == 2
    assert f"{target}:3: invalid JSON" in _one_error_line(err)

    lines[2] = '{"question_id": 2}'
    target.write_text("\n".join(lines) + "\n")
    code, _, err = _run([*args, "--responses", str(bad)], capsys)
    assert code == 2 and f"{target}:3: missing field(s) text" in _one_error_line(err)

    target.write_text("\n".join(lines[:2] + lines[3:]) + "\n")  # one response short
    code, _, err = _run([*args, "--responses", str(bad)], capsys)
    assert code == 2 and "no response for question_id 2" in _one_error_line(err)


def test_missing_split_in_local_dataset(demo, tmp_path, capsys):
    args = ["score", "--dataset", str(demo / "dataset"), "--responses", str(demo / "responses"), *OFFLINE]
    code, _, err = _run(
        [*args, "--output-path", str(tmp_path), "--scenarios", "llava_bench_coco_frost_1"], capsys
    )
    assert code == 2 and "has no split 'llava_bench_coco_frost_1'" in _one_error_line(err)


def test_analyze_errors(tmp_path, capsys):
    code, _, err = _run(["analyze", str(tmp_path / "none")], capsys)
    assert code == 2 and "no such file or folder" in _one_error_line(err)
    assert not (tmp_path / "none").exists()  # no report folder made for a run folder that is not there
    code, _, err = _run(["analyze", str(tmp_path), *OFFLINE], capsys)
    assert code == 2 and "--log_samples" in _one_error_line(err)


def test_train_estimator_errors(tmp_path, capsys):
    code, _, err = _run(
        ["train-estimator", str(tmp_path), "--output-path", str(tmp_path / "c.safetensors")], capsys
    )
    assert code == 2 and "emi_embeddings.safetensors" in _one_error_line(err)


def test_dataset_not_reachable_console_script(demo, tmp_path):
    """Through the installed console script, offline: one line naming the hub / local path, status 2."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "lmms_emi.cli",
        "score",
        "--responses",
        str(demo / "responses"),
        "--scenarios",
        "llava_bench_coco",
        "--output-path",
        str(tmp_path),
        *OFFLINE,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line(proc.stderr)
    assert "changdae/llavabench-shift-synthetic-v1" in line and "needs the Hugging Face hub" in line
    assert "local path" in line


# ------------------------------------------------------------------------------------------- response files
def test_reference_in_the_wild_layout(reference_responses):
    """The paper's files: in-the-wild easy / hard rows are positions of lbwild_split_idx.json in the
    combined per-language file; normal is the whole file."""
    from lmms_emi.sources.responses import load_split_responses, read_response_file, responses_for_rows

    idx = json.loads((reference_responses / "lbwild_split_idx.json").read_text())
    every = read_response_file(reference_responses / "llava_bench_in_the_wild_German_llava-v1.5-13b.jsonl")
    easy = load_split_responses(reference_responses, "llava_bench_in_the_wild_easy_German", "llava-v1.5-13b")
    assert [r.text for r in easy] == [every[i].text for i in idx["easy_ood_fst_cd_new"]]
    hard_ids = [every[i].question_id for i in idx["hard_ood_fst_cd_new"]]
    by_id = responses_for_rows(
        reference_responses,
        "llava_bench_in_the_wild_hard_German",
        "llava-v1.5-13b",
        question_ids=sorted(hard_ids),
    )
    assert by_id == [next(r.text for r in every if r.question_id == q) for q in sorted(hard_ids)]
    normal = responses_for_rows(
        reference_responses, "llava_bench_in_the_wild_normal_German", "llava-v1.5-13b", n_rows=60
    )
    assert normal == [r.text for r in every]
    coco = responses_for_rows(
        reference_responses,
        "llava_bench_coco_frost_5_sr_7",
        "llava-v1.6-vicuna-13b",
        question_ids=list(range(90)),
    )
    assert len(coco) == 90 and all(isinstance(t, str) for t in coco)


def test_demo_combined_wild_files_align_with_dataset(tmp_path):
    import datasets

    from lmms_emi.demo_data import build_demo_dataset, write_demo_responses
    from lmms_emi.sources.responses import load_split_responses, responses_for_rows

    splits = ["llava_bench_coco_English"] + [
        f"llava_bench_in_the_wild_{k}_Greek" for k in ("easy", "normal", "hard")
    ]
    ds_dir = build_demo_dataset(tmp_path / "d", benchmark="natural", scenarios=splits, n_images=4)
    write_demo_responses(ds_dir, tmp_path / "r", combined_wild=True)
    dd = datasets.load_from_disk(str(ds_dir))
    for split in splits:
        ids = list(dd[split]["question_id"])
        texts = responses_for_rows(tmp_path / "r", split, "demo-model", question_ids=ids)
        records = {r.question_id: r for r in load_split_responses(tmp_path / "r", split, "demo-model")}
        assert texts == [records[q].text for q in ids]
        assert [records[q].extra["prompt"] for q in ids] == list(dd[split]["question"])


def test_response_alignment_errors(tmp_path):
    from lmms_emi.sources.responses import (
        ResponseFileError,
        align_responses,
        read_response_file,
        responses_for_rows,
    )

    f = tmp_path / "llava_bench_coco_m.jsonl"
    f.write_text(
        '{"question_id": 0, "text": "a"}\n{"question_id": 1, "text": "b"}\n{"question_id": 0, "text": "c"}\n'
    )
    with pytest.raises(
        ResponseFileError, match=r"llava_bench_coco_m.jsonl:3: duplicate question_id 0 \(first on line 1\)"
    ):
        read_response_file(f)
    f.write_text('{"question_id": 0, "text": "a"}\n\n{"question_id": "1", "text": "b"}\n')
    records = read_response_file(f)
    assert [(r.question_id, r.line) for r in records] == [(0, 1), (1, 3)]
    assert align_responses(records, question_ids=[1, 0]) == ["b", "a"]
    assert responses_for_rows(tmp_path, "llava_bench_coco", "m", n_rows=2) == ["a", "b"]
    with pytest.raises(ResponseFileError, match=r":3: question_id 1 is not in the dataset split"):
        align_responses(records, question_ids=[0])
    with pytest.raises(ResponseFileError, match=r"2 responses but the dataset split has 3 rows"):
        responses_for_rows(tmp_path, "llava_bench_coco", "m", n_rows=3)
    f.write_text('{"question_id": 0, "text": 5}\n')
    with pytest.raises(ResponseFileError, match=r":1: text must be a string"):
        read_response_file(f)
    f.write_text("[1, 2]\n")
    with pytest.raises(ResponseFileError, match=r":1: expected a JSON object"):
        read_response_file(f)
    f.write_text("")
    with pytest.raises(ResponseFileError, match="is empty"):
        read_response_file(f)
    # in-the-wild: combined file present but no index file / index out of range
    (tmp_path / "llava_bench_in_the_wild_Hindi_m.jsonl").write_text('{"question_id": 0, "text": "a"}\n')
    with pytest.raises(ResponseFileError, match=r"lbwild_split_idx\.json is missing"):
        responses_for_rows(tmp_path, "llava_bench_in_the_wild_easy_Hindi", "m", n_rows=1)
    (tmp_path / "lbwild_split_idx.json").write_text(
        '{"easy_ood_fst_cd_new": [3], "hard_ood_fst_cd_new": [0]}'
    )
    with pytest.raises(ResponseFileError, match="index 3 is out of range"):
        responses_for_rows(tmp_path, "llava_bench_in_the_wild_easy_Hindi", "m", n_rows=1)
    assert responses_for_rows(tmp_path, "llava_bench_in_the_wild_hard_Hindi", "m", n_rows=1) == ["a"]
    with pytest.raises(ResponseFileError, match=r"neither .* nor .* exists"):
        responses_for_rows(tmp_path, "llava_bench_in_the_wild_hard_Arabic", "m", n_rows=1)


def test_encoders_not_reachable_console_script(demo, tmp_path):
    """The default 'paper' encoders offline: one line naming the hub, local copies or --encoders offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "lmms_emi.cli",
        "score",
        "--dataset",
        str(demo / "dataset"),
        "--responses",
        str(demo / "responses"),
        "--output-path",
        str(tmp_path),
        "-q",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line(proc.stderr)
    assert "openai/clip-vit-base-patch32" in line and "--encoders offline" in line


@pytest.mark.slow
def test_score_analyze_and_eval_give_the_same_report(encoders, tmp_path, capsys):
    """One pipeline behind every entry point: `lmms-emi eval --log_samples` (lmms-eval + replay model),
    `lmms-emi analyze` of its output folder and `lmms-emi score` of the same data and responses each fit
    their own estimator and write the same report JSON (the run's metadata and file paths aside)."""
    from lmms_emi.demo_data import build_demo_dataset, write_demo_responses

    splits = [
        "llava_bench_coco_English",
        "llava_bench_coco_German",
        "llava_bench_in_the_wild_easy_English",
        "llava_bench_in_the_wild_normal_English",
        "llava_bench_in_the_wild_hard_English",
    ]
    data = build_demo_dataset(tmp_path / "data", benchmark="natural", scenarios=splits, n_images=4)
    write_demo_responses(data, tmp_path / "responses", combined_wild=True)
    used = [s for s in splits if "normal" not in s]
    enc = dict(zip(encoders[0::2], encoders[1::2], strict=True))
    common = ["--bootstrap", "40", "--estimator-steps", "60", "--emi-cache", "off", "-q"]
    tasks = ",".join(f"lbshift_nat_{s}" for s in used)
    replay = f"responses={tmp_path / 'responses'},model_name=demo-model"
    cmd = [sys.executable, "-m", "lmms_emi.cli", "eval", "--tasks", tasks, "--model", "emi_replay",
           "--model_args", replay, "--data", f"natural={data}", "--output_path", str(tmp_path / "out"),
           "--log_samples", "--vision_encoder", enc["--vision-encoder"], "--text_encoder",
           enc["--text-encoder"], "--text_layer", "0", "--emi_device", "cpu", "--no_builtin_tasks",
           *common]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = next((tmp_path / "out").rglob("*_emi_report_natural.json")).parent
    assert (
        main(["analyze", str(tmp_path / "out"), *encoders, *common, "--output-path", str(tmp_path / "post")])
        == 0
    )
    score = [
        "score",
        "--dataset",
        str(data),
        "--responses",
        str(tmp_path / "responses"),
        "--benchmark",
        "natural",
    ]
    assert (
        main([*score, "--scenarios", *used, *encoders, *common, "--output-path", str(tmp_path / "sc")]) == 0
    )

    def comparable(folder: Path) -> dict:
        report = json.loads(artifact(folder, "emi_report_natural.json").read_text())
        report.pop("metadata")
        report["estimator"].pop("path")
        return report

    want = comparable(run_dir)
    assert want["summary"]["model"] == "demo-model"  # the user's name, not the class
    assert want["estimator"]["source"] == "fitted" and len(want["tasks"]) == 4
    assert comparable(tmp_path / "post") == want
    assert comparable(tmp_path / "sc") == want
    # the saved embeddings of the post-hoc report feed train-estimator
    ckpt = tmp_path / "frozen.safetensors"
    assert (
        main(
            [
                "train-estimator",
                str(tmp_path / "post"),
                "--output-path",
                str(ckpt),
                "--estimator-steps",
                "20",
                "-q",
            ]
        )
        == 0
    )
    assert ckpt.is_file()


# ------------------------------------------------------------------------------------------ start and exit
def test_a_saved_dataset_is_read_as_datasets_reads_it_without_importing_datasets(demo):
    """``load_splits`` on a save_to_disk folder gives the rows and columns ``datasets.load_from_disk`` gives
    (images as their stored {bytes, path} records), and does not import ``datasets`` (half a second)."""
    code = (
        "import json, sys; from lmms_emi.sources.datasets import load_splits, column_values; "
        f"s = load_splits({str(demo / 'dataset')!r}, 'synthetic', {SCENARIOS!r}); "
        "print(json.dumps({'datasets': 'datasets' in sys.modules, "
        "'type': type(s[SCEN[0]]).__name__, 'rows': [len(s[x]) for x in SCEN]}))"
    ).replace("SCEN", repr(SCENARIOS))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["datasets"] is False and seen["type"] == "Table"

    import datasets

    from lmms_emi.sources.datasets import column_values, encoded_images, load_splits

    tables = load_splits(str(demo / "dataset"), "synthetic", SCENARIOS)
    saved = datasets.load_from_disk(str(demo / "dataset"))
    for split in SCENARIOS:
        ds = saved[split].cast_column("image", datasets.Image(decode=False))
        assert tables[split].column_names == ds.column_names
        assert seen["rows"][SCENARIOS.index(split)] == len(ds) == len(tables[split])
        for column in ds.column_names:
            assert column_values(tables[split], column) == list(ds[column]), (split, column)
            assert column_values(saved[split], column, [2, 0]) == [ds[2][column], ds[0][column]]
        assert encoded_images(tables[split], "image") == list(ds["image"])
        assert all(isinstance(x["bytes"], bytes) for x in encoded_images(tables[split], "image"))


def test_a_saved_dataset_of_another_layout_is_read_by_datasets(demo, tmp_path):
    import shutil

    from lmms_emi.sources.datasets import column_values, saved_splits

    copy = tmp_path / "dataset"
    shutil.copytree(demo / "dataset", copy)
    state = copy / SCENARIOS[1] / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "_data_files": "not a list"}))
    with pytest.raises(Exception):  # noqa: B017 - datasets itself refuses this folder, as lmms-eval would
        saved_splits(copy, SCENARIOS)
    state.unlink()  # no state.json at all: handed to datasets, which refuses it too
    with pytest.raises(FileNotFoundError):
        saved_splits(copy, SCENARIOS)
    first = saved_splits(copy, SCENARIOS[:1])[SCENARIOS[0]]  # the intact split still reads directly
    assert column_values(first, "question")


def test_the_console_script_runs_exit_handlers_flushes_and_waits_for_threads(tmp_path):
    """The console script skips the interpreter's teardown, but not what a normal exit promises: exit
    handlers run, buffered output reaches its pipe, the exit status is kept, and a running non-daemon thread
    is waited for."""
    marker = tmp_path / "thread_done"
    code = f"""
import atexit, sys, threading, time
atexit.register(lambda: print("handler ran"))
def late():
    time.sleep(0.5)
    open({str(marker)!r}, "w").close()
threading.Thread(target=late).start()
sys.stdout.write("buffered, no newline")
sys.argv = ["lmms-emi", "tasks-path"]
from lmms_emi.cli import console_main
console_main()
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("buffered, no newline") and "tasks" in proc.stdout
    assert proc.stdout.rstrip().endswith("handler ran")
    assert marker.is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "lmms_emi.cli", "score", "--responses", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "error:" in bad.stderr


@pytest.mark.parametrize(
    "args",
    [["--help"], ["tasks-path"], ["estimators"], *([name, "--help"] for name in COMMANDS)],
)
def test_light_commands_import_no_heavy_library(args):
    """``lmms-emi --help``, every subcommand's ``--help``, and the subcommands without encoders or
    estimators import no torch, scipy, datasets, matplotlib or lmms-eval: they answer at once."""
    heavy = ("torch", "scipy.stats", "datasets", "matplotlib", "transformers", "lmms_eval")
    code = (
        "import sys\nfrom lmms_emi.cli import main\ntry:\n    main(sys.argv[1:])\nfinally:\n"
        f"    print('HEAVY', [m for m in {heavy!r} if m in sys.modules])"
    )
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("HEAVY"))
    assert line == "HEAVY []", line
    assert "score" in proc.stdout or args != ["--help"]


def _recorded_run(folder: Path, estimator: dict, options: dict | None = None) -> Path:
    """A run folder as lmms-eval leaves it: ``<model>/<id>_results.json`` with the plugin's section."""
    model_dir = folder / "demo-model"
    model_dir.mkdir(parents=True)
    recorded = {"encoders": "offline", "seed": 7, "bootstrap": 123, "device": "cuda:3", "data": ["x=y"]}
    section = {"options": {**recorded, **(options or {})}, "estimator": estimator}
    (model_dir / "20261206_000000_results.json").write_text(json.dumps({"lmms_emi": section}))
    return model_dir


def test_analyze_starts_from_what_the_run_recorded(tmp_path, monkeypatch):
    """``analyze RUN`` takes the run's encoders, seed, bootstrap and estimator (by sha256) unless told
    otherwise; machine settings (device, data paths) are not replayed; a changed checkpoint is one line."""
    from lmms_emi.cli._options import add_emi_options, config_from
    from lmms_emi.config import OPTIONS_VAR, EMIConfig
    from lmms_emi.errors import UsageError
    from lmms_emi.estimator_registry import file_sha256
    from lmms_emi.sources.run_folder import recorded_options

    for var in [v for v in os.environ if v.startswith("LMMS_EMI_") and v != "LMMS_EMI_REFERENCE_DIR"]:
        monkeypatch.delenv(var)
    ckpt = tmp_path / "club.safetensors"
    ckpt.write_bytes(b"weights")
    _recorded_run(tmp_path / "run", {"source": "checkpoint", "path": str(ckpt), "sha256": file_sha256(ckpt)})
    recorded = recorded_options(tmp_path / "run")
    assert recorded == {"encoders": "offline", "seed": 7, "bootstrap": 123, "estimator": str(ckpt)}
    base = EMIConfig.from_sources(environ={OPTIONS_VAR: json.dumps(recorded)})
    parser = argparse.ArgumentParser()
    add_emi_options(parser, EMIConfig.GROUPS)
    config = config_from(parser.parse_args(["--bootstrap", "9"]), base=base)
    assert (config.encoders, config.seed, config.bootstrap, config.device) == ("offline", 7, 9, None)
    assert config.estimator.kind == "file" and config.estimator.path == ckpt

    # a checkpoint recorded by a path relative to another folder is found beside the results JSON
    moved = {"source": "checkpoint", "path": "elsewhere/" + ckpt.name, "sha256": file_sha256(ckpt)}
    beside = _recorded_run(tmp_path / "run2", moved) / ckpt.name
    beside.write_bytes(b"weights")
    assert recorded_options(tmp_path / "run2")["estimator"] == str(beside)
    # an estimator fitted on the run is fitted again (same seed and method: the same estimator)
    _recorded_run(tmp_path / "run3", {"source": "fitted", "path": "x.safetensors", "sha256": "ab" * 32})
    assert recorded_options(tmp_path / "run3")["estimator"] == "fit"
    # a registered one by its name
    _recorded_run(tmp_path / "run4", {"source": "registry", "name": "paper-global", "sha256": "cd" * 32})
    assert recorded_options(tmp_path / "run4")["estimator"] == "paper-global"

    ckpt.write_bytes(b"changed")  # the checkpoint the run used was replaced
    with pytest.raises(UsageError, match=r"the run used the estimator .*club\.safetensors \(sha256 \w{12}\)"):
        recorded_options(tmp_path / "run")
    assert recorded_options(tmp_path / "nothing") is None

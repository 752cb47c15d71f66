"""End to end through the real lmms-eval evaluator, offline: a small LLaVA-Bench-shift-shaped dataset
(``lmms_emi.demo_data``), ``lmms-emi eval`` with the replay model, tiny random-weight encoders loaded by path,
and assertions on lmms-eval's results file and the reports written beside it.

The natural benchmark's visual subgroup is run (3 in-the-wild OOD splits; the launcher adds the ID split), so
the results carry per-task EMI, per-OOD-task EMID and bounds, and a group entry with the Pearson correlation.
"""

from __future__ import annotations

import csv
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
MODEL = "demo-model"  # conftest.DEMO_MODEL
SPLITS = [  # the visual subgroup's splits of the session's demo dataset (conftest.demo_natural)
    "llava_bench_coco_English",
    "llava_bench_in_the_wild_easy_English",
    "llava_bench_in_the_wild_normal_English",
    "llava_bench_in_the_wild_hard_English",
]
TASKS = ["lbshift_nat_" + s for s in SPLITS]
ID_TASK, OOD_TASKS = TASKS[0], TASKS[1:]
GROUP = "llavabench_shift_natural_visual"


@pytest.fixture(scope="module")
def setup(demo_natural: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The session's demo dataset and responses (read only), tiny encoders, and this module's output root."""
    from helpers_embed import save_tiny_clip_vision, save_tiny_xlmr

    root = tmp_path_factory.mktemp("e2e")
    return {
        "root": root,
        "data": demo_natural["data"],
        "responses": demo_natural["responses"],
        "clip": save_tiny_clip_vision(root / "clip"),
        "xlmr": save_tiny_xlmr(root / "xlmr"),
    }


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"
    )
    env.update(extra)
    return env


def _emi_args(s: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "--model", "emi_replay",
        "--model_args", f"responses={s['responses']},model_name={MODEL}",
        "--data", f"natural={s['data']}",
        "--output_path", str(out),
        "--vision_encoder", f"hf-clip:{s['clip']}",
        "--text_encoder", f"hf-text:{s['xlmr']}",
        "--text_layer", "0",
        "--bootstrap", "40",
        "--estimator_steps", "60",
        "--emi_cache", "off",
        "--emi_device", "cpu",
        *extra,
    ]  # fmt: skip


def _cli() -> list[str]:
    """``lmms-emi eval`` when the CLI is installed, else the launcher module it calls."""
    script = Path(sys.executable).parent / "lmms-emi"
    try:
        import lmms_emi.cli  # noqa: F401

        if script.is_file():
            return [str(script), "eval"]
    except ImportError:
        pass
    return [sys.executable, "-m", "lmms_emi.cli", "eval"]


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=900)
    return proc


def _results(out: Path) -> tuple[Path, dict]:
    files = sorted(out.rglob("*_results.json"))
    assert len(files) == 1, files
    return files[0], json.loads(files[0].read_text())


def _error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [x for x in proc.stderr.splitlines() if x.startswith("lmms-emi eval: error:")]


@pytest.fixture(scope="module")
def single(setup: dict[str, Path]) -> dict:
    """One process, through ``lmms-emi eval`` with lmms-eval's full task index (the user's path)."""
    out = setup["root"] / "out1"
    proc = _run([*_cli(), "--tasks", GROUP, *_emi_args(setup, out)], cwd=setup["root"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    path, results = _results(out)
    return {"path": path, "results": results, "proc": proc, "out": out}


def test_results_file_has_emi_per_task(single: dict) -> None:
    results = single["results"]
    for task in TASKS:
        entry = results["results"][task]
        n = results["n-samples"][task]["effective"]
        assert entry["emi_n,none"] == n and n >= 4
        assert math.isfinite(entry["emi,none"])
        if n >= 5:
            assert entry["emi_ci_low,none"] <= entry["emi_ci_high,none"]
        else:  # too few samples for a bootstrap interval: None, and said so
            assert entry["emi_ci_low,none"] is None and "no bootstrap interval" in entry["emi_warnings"][0]
    assert results["results"][ID_TASK]["emid,none"] is None
    for task in OOD_TASKS:
        entry = results["results"][task]
        for key in ("emid,none", "emid_bound,none", "emid_bound_partial,none"):
            assert math.isfinite(entry[key]), (task, key)
        assert entry["emid_bound,none"] >= entry["emid_bound_partial,none"] >= 0
        assert entry["emid,none"] == pytest.approx(
            results["results"][ID_TASK]["emi,none"] - entry["emi,none"], abs=1e-9
        )
    assert "lmms-emi: adding the ID task lbshift_nat_llava_bench_coco_English" in single["proc"].stderr


def test_group_entry_has_emid_bound_and_pearson(single: dict) -> None:
    results = single["results"]
    group = results["groups"][GROUP]
    assert group == results["results"][GROUP] | group  # same numbers in both sections
    assert group["emid_pairs"] == 3 and group["emid_id_task"] == ID_TASK
    assert set(group["emid_by_task"]) == set(OOD_TASKS)
    for task, row in group["emid_by_task"].items():
        assert row["emid"] == pytest.approx(results["results"][task]["emid,none"])
        assert row["emid_bound"] == pytest.approx(results["results"][task]["emid_bound,none"])
    r = group["emid_pearson,none"]
    assert r is None or -1.0 <= r <= 1.0
    assert group["emid,none"] == pytest.approx(sum(results["results"][t]["emid,none"] for t in OOD_TASKS) / 3)
    est = results["lmms_emi"]["estimator"]
    assert est["source"] == "fitted" and est["comparability"] == "run"
    assert "comparable only within this run" in single["proc"].stdout


def test_reports_written_and_consistent(single: dict) -> None:
    folder = single["path"].parent
    stem = Path(single["results"]["lmms_emi"]["reports"]["emi_report_natural"]["json"]).with_suffix("")
    assert stem.parent == folder and stem.name.endswith("emi_report_natural")
    for suffix in (".json", ".csv", ".md", ".png"):
        assert stem.with_suffix(suffix).is_file() and stem.with_suffix(suffix).stat().st_size > 0, suffix
    fitted = Path(single["results"]["lmms_emi"]["estimator"]["path"])
    assert fitted.parent == folder and fitted.name.endswith("club_fitted.safetensors") and fitted.is_file()
    report = json.loads(stem.with_suffix(".json").read_text())
    results = single["results"]["results"]
    assert report["id_task"] == ID_TASK
    assert "comparable only within this run" in report["estimator"]["note"]
    by_task = {t["task"]: t for t in report["tasks"]}
    assert set(by_task) == set(TASKS)
    for task in TASKS:
        assert by_task[task]["emi"] == pytest.approx(results[task]["emi,none"])
        assert by_task[task]["n"] == results[task]["emi_n,none"]
    for task in OOD_TASKS:
        assert by_task[task]["emid"] == pytest.approx(results[task]["emid,none"])
        assert by_task[task]["bound"] == pytest.approx(results[task]["emid_bound,none"])
    with stem.with_suffix(".csv").open() as fh:
        assert {row["task"] for row in csv.DictReader(fh)} == set(TASKS)
    assert ID_TASK in stem.with_suffix(".md").read_text()


def test_numbers_match_the_library(single: dict, setup: dict[str, Path]) -> None:
    """Recompute EMI / EMID / bound from the dataset, the response files and the saved estimator with the
    library functions directly, without lmms-eval."""
    import datasets

    from lmms_emi import emi as emi_lib
    from lmms_emi.embed import Embedder
    from lmms_emi.estimators.club import CLUB
    from lmms_emi.sources.responses import responses_for_rows

    embedder = Embedder(
        vision=f"hf-clip:{setup['clip']}", text=f"hf-text:{setup['xlmr']}", text_layer=0, cache_dir=False,
        device="cpu", progress=False,
    )  # fmt: skip
    club = CLUB.from_checkpoint(
        single["results"]["lmms_emi"]["estimator"]["path"], encoders=embedder.encoder_spec()
    )
    dd = datasets.load_from_disk(str(setup["data"]))
    emb = {}
    for split, task in zip(SPLITS, TASKS, strict=True):
        ds = dd[split].cast_column("image", datasets.Image(decode=False))
        answers = responses_for_rows(setup["responses"], split, MODEL, question_ids=list(ds["question_id"]))
        emb[task] = embedder.embed_task(
            list(ds["image"]), list(ds["question"]), answers, list(ds["reference_answer"])
        )
    results = single["results"]["results"]
    for task in TASKS:
        expected = emi_lib.effective_mutual_information(club, *emb[task]).emi
        assert results[task]["emi,none"] == pytest.approx(expected, abs=1e-5), task
    for task in OOD_TASKS:
        bound = emi_lib.emid_upper_bound(emb[ID_TASK], emb[task])
        assert results[task]["emid_bound,none"] == pytest.approx(bound.value, rel=1e-4, abs=1e-6), task
        partial = emi_lib.partial_upper_bound(emb[ID_TASK], emb[task])
        assert results[task]["emid_bound_partial,none"] == pytest.approx(partial.value, rel=1e-4, abs=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_processes_give_the_same_numbers(single: dict, setup: dict[str, Path]) -> None:
    out = setup["root"] / "out2"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(_free_port()), "-m", "lmms_emi.cli", "eval",
        "--tasks", GROUP, *_emi_args(setup, out, "--no_builtin_tasks"),
    ]  # fmt: skip
    proc = _run(cmd, cwd=setup["root"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _, two = _results(out)
    one = single["results"]
    keys = ("emi,none", "emi_ci_low,none", "emi_ci_high,none", "emid,none", "emid_bound,none", "emi_n,none")
    worst = 0.0
    for task in TASKS:
        for key in keys:
            a, b = one["results"][task][key], two["results"][task][key]
            assert (a is None) == (b is None), (task, key)
            if a is not None:
                worst = max(worst, abs(a - b))
    print(f"2 processes vs 1: max |difference| of EMI, EMID and bounds = {worst:.3g}")
    assert worst <= 1e-6
    # the process count: recorded in the results JSON and said in the summary (rank 0 only)
    assert one["lmms_emi"]["world_size"] == 1 and one["lmms_emi"]["sample_ranks"] == [0]
    assert two["lmms_emi"]["world_size"] == 2 and two["lmms_emi"]["sample_ranks"] == [0, 1]
    assert two["lmms_emi"]["requested_processes"] == 2
    assert proc.stdout.count("lmms-emi: 2 processes; samples from rank(s) 0, 1") == 1
    assert "processes were asked for" not in proc.stderr
    assert two["groups"][GROUP]["emid_pearson,none"] == pytest.approx(
        one["groups"][GROUP]["emid_pearson,none"]
    )


def test_task_with_one_sample_is_a_clear_error(setup: dict[str, Path]) -> None:
    out = setup["root"] / "out_limit"
    args = [
        "--tasks",
        "lbshift_nat_llava_bench_in_the_wild_easy_English",
        "--limit",
        "1",
        "--no_builtin_tasks",
    ]
    proc = _run([*_cli(), *args, *_emi_args(setup, out)], cwd=setup["root"])
    assert proc.returncode != 0
    (line,) = _error_lines(proc)
    assert "has 1 sample(s)" in line and "at least 2" in line


def test_unreachable_dataset_is_a_clear_error(setup: dict[str, Path]) -> None:
    out = setup["root"] / "out_hub"
    args = [a for a in _emi_args(setup, out) if a not in ("--data", f"natural={setup['data']}")]
    proc = _run([*_cli(), "--tasks", ID_TASK, "--no_builtin_tasks", *args], cwd=setup["root"])
    assert proc.returncode != 0
    (line,) = _error_lines(proc)
    assert "changdae/llavabench-shift-natural-v1" in line and "--data natural=PATH" in line and "hub" in line


def test_unknown_task_is_a_clear_error(setup: dict[str, Path]) -> None:
    proc = _run(
        [
            *_cli(),
            "--tasks",
            "no_such_task_xyz",
            "--no_builtin_tasks",
            *_emi_args(setup, setup["root"] / "o"),
        ],
        cwd=setup["root"],
    )
    assert proc.returncode != 0
    (line,) = _error_lines(proc)
    assert "unknown task(s): no_such_task_xyz" in line


def test_estimator_encoder_mismatch_is_a_clear_error(
    setup: dict[str, Path], reference_checkpoint: Path
) -> None:
    """The paper's estimator (768-dim, CLIP + XLM-R) does not fit the tiny test encoders: refused before the
    evaluation starts."""
    out = setup["root"] / "out_ckpt"
    args = ["--tasks", GROUP, "--estimator", str(reference_checkpoint), "--no_builtin_tasks"]
    proc = _run([*_cli(), *args, *_emi_args(setup, out)], cwd=setup["root"])
    assert proc.returncode == 2
    (line,) = _error_lines(proc)
    assert str(reference_checkpoint) in line
    assert not out.exists() or not any(out.iterdir())  # nothing written


def test_metrics_emi_scores_another_task_without_a_judge(setup: dict[str, Path]) -> None:
    """``--metrics emi`` adds EMI to a non-plugin task beside its own (built-in) metric; the task keeps its
    name and its metric its value (the dummy's answer is no reference: exact_match 0)."""
    include = setup["root"] / "my_tasks"
    include.mkdir(exist_ok=True)
    (include / "my_vqa.yaml").write_text(
        "task: my_vqa_emi_e2e\n"
        f"dataset_path: {setup['data']}\n"
        "dataset_kwargs:\n  load_from_disk: true\n"
        "test_split: llava_bench_coco_English\n"
        "output_type: generate_until\n"
        "doc_to_visual: !function lmms_emi.harness.task_utils.doc_to_visual\n"
        'doc_to_text: "{{question}}"\n'
        "doc_to_target: reference_answer\n"
        "generation_kwargs:\n  max_new_tokens: 16\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    out = setup["root"] / "out_foreign"
    args = [a for a in _emi_args(setup, out) if not a.startswith(("responses=", "emi_replay"))]
    args = [a for a in args if a not in ("--model", "--model_args")]
    proc = _run(
        [*_cli(), "--tasks", "my_vqa_emi_e2e", "--metrics", "emi", "--include_path", str(include),
         "--model", "dummy", "--model_args", "response=a plain answer", "--no_builtin_tasks", *args],
        cwd=setup["root"],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    path, results = _results(out)
    entry = results["results"]["my_vqa_emi_e2e"]
    assert math.isfinite(entry["emi,none"]) and entry["emi_n,none"] == 8
    assert entry["exact_match,none"] == 0.0
    report = Path(results["lmms_emi"]["reports"]["emi_report_my_vqa_emi_e2e"]["json"])
    assert report.parent == path.parent and report.is_file()


def test_given_estimator_numbers_inside_lmms_eval(single: dict, setup: dict[str, Path]) -> None:
    """With ``--estimator`` (the checkpoint the first run fitted) nothing is trained: the per-task aggregation
    inside lmms-eval already returns EMI / EMID / bound (lmms-eval's printed table), equal to the final
    ones."""
    ckpt = Path(single["results"]["lmms_emi"]["estimator"]["path"])
    out = setup["root"] / "out_ckpt_ok"
    args = ["--tasks", GROUP, "--estimator", str(ckpt), "--no_builtin_tasks"]
    proc = _run([*_cli(), *args, *_emi_args(setup, out)], cwd=setup["root"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _, results = _results(out)
    est = results["lmms_emi"]["estimator"]
    assert est["source"] == "checkpoint" and est["comparability"] == "global" and est["path"] == str(ckpt)
    assert not list(out.rglob("*club_fitted*"))
    table = {}  # lmms-eval's own table, printed before the launcher rewrites the results file
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = cells[0].lstrip(" -")  # subtasks of a group are indented as " - task"
        if len(cells) >= 6 and name in TASKS:
            table[(name, cells[3])] = cells[5]
    for task in TASKS:
        for key in ("emi", "emid", "emid_bound"):
            final = single["results"]["results"][task][f"{key},none"]
            got = results["results"][task][f"{key},none"]
            assert got == final if final is None else got == pytest.approx(final, rel=1e-6, abs=1e-9)
            shown = table[(task, key)]
            assert shown == ("N/A" if final is None else f"{final:.4f}"), (task, key, shown)


def _run_files(results_file: Path, results: dict) -> list[Path]:
    """Every file the run's results JSON points at."""
    files = [Path(p) for r in results["lmms_emi"]["reports"].values() for p in r.values()]
    return [*files, results_file]


def test_runs_sharing_an_output_folder_never_touch_each_others_files(setup: dict[str, Path]) -> None:
    """Two runs at once into one --output_path (then a third after them): every run gets its own results
    file (lmms-eval's one-second date id is claimed exclusively) and its own prefixed artifacts, each
    results JSON points at files holding its own numbers, and a later run changes no earlier file."""
    import hashlib

    out = setup["root"] / "out_shared"
    args = ["--tasks", ID_TASK, "--no_builtin_tasks"]
    procs = [
        subprocess.Popen(
            [*_cli(), *args, *_emi_args(setup, out, "--bootstrap", str(n))],
            cwd=setup["root"],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in (30, 31)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
    first = sorted(out.rglob("*_results.json"))
    assert len(first) == 2, first

    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    before = {p: digest(p) for p in out.rglob("*") if p.is_file()}
    seen: set[Path] = set()
    for path in first:
        results = json.loads(path.read_text())
        n = results["lmms_emi"]["options"]["bootstrap"]
        date_id = path.name[: -len("_results.json")]
        files = _run_files(path, results)
        assert all(f.is_file() and f.name.startswith(date_id + "_") for f in files), files
        assert not seen & set(files)
        seen |= set(files)
        report = json.loads(Path(results["lmms_emi"]["reports"]["emi_report_natural"]["json"]).read_text())
        assert report["settings"]["n_resamples"] == n  # the file holds this run's numbers
    third = _run([*_cli(), *args, *_emi_args(setup, out, "--bootstrap", "32")], cwd=setup["root"])
    assert third.returncode == 0, third.stderr[-3000:]
    assert len(sorted(out.rglob("*_results.json"))) == 3
    assert {p: digest(p) for p in before} == before  # nothing of the first two runs changed
    assert not [p for p in out.rglob(".*")]  # no staging folder or temp file left


def test_a_killed_runs_task_folder_is_removed_by_the_next_run(tmp_path: Path) -> None:
    """A run killed with SIGKILL cannot remove its private task-folder copy; the next run does."""
    import tempfile

    from lmms_emi._io import scratch_dir
    from lmms_emi.harness.launch import SCRATCH_PREFIX

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = Path(tempfile.gettempdir()) / f"{SCRATCH_PREFIX}{dead.pid}_x1"
    stale.mkdir()
    mine = scratch_dir(SCRATCH_PREFIX)
    try:
        assert not stale.exists()
        assert mine.is_dir() and mine.name.startswith(f"{SCRATCH_PREFIX}{os.getpid()}_")
        assert scratch_dir(SCRATCH_PREFIX) != mine and mine.is_dir()  # a live process's folder is kept
    finally:
        import shutil

        for p in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}{os.getpid()}_*"):
            shutil.rmtree(p)

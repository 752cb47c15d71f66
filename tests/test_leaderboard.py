"""``lmms-emi leaderboard``: one real ``lmms-emi eval`` of the offline demo (4 synthetic tasks: the ID task
and one visual, one text, one joint shift; a frozen estimator, so the run is comparable) made once, plus
copies of its results JSON with edited values standing for other models / other estimators. Every table value
is checked against values read directly from lmms-eval's per-task results (``results[<task>]``)."""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from scipy import stats

from lmms_emi import scenarios as sc
from lmms_emi.cli import main
from lmms_emi.errors import UsageError
from lmms_emi.leaderboard import COLUMNS, SCHEMA, build_leaderboard

MODEL = "model-a"
SPLITS = [
    "llava_bench_coco",
    "llava_bench_coco_defocus_blur_1",
    "llava_bench_coco_sr_4",
    "llava_bench_coco_defocus_blur_1_sr_4",
]
TASKS = ["lbshift_syn_" + s for s in SPLITS]
ID_TASK, OOD_TASKS = TASKS[0], TASKS[1:]


def _eval_cmd() -> list[str]:
    script = Path(sys.executable).parent / "lmms-emi"
    return [str(script), "eval"] if script.is_file() else [sys.executable, "-m", "lmms_emi.cli", "eval"]


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One real demo eval through lmms-eval with a frozen (saved, random-init) estimator."""
    from lmms_emi.demo_data import build_demo_dataset, write_demo_responses
    from lmms_emi.embed import Embedder
    from lmms_emi.estimators.club import CLUB

    root = tmp_path_factory.mktemp("leaderboard")
    data = build_demo_dataset(root / "data", benchmark="synthetic", scenarios=SPLITS, n_images=3)
    write_demo_responses(data, root / "responses", model_name=MODEL)
    club = CLUB(384, 384, 500)
    club.reset_parameters(7)
    club.load_state_dict(club.state_dict())  # a frozen estimator: fitted state, saved with its encoders
    ckpt = club.save(
        root / "frozen.safetensors", club.make_manifest(Embedder.from_profile("offline").encoder_spec())
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [*_eval_cmd(), "--model", "lmms_emi_replay",
         "--model_args", f"responses={root / 'responses'},model_name={MODEL}",
         "--tasks", ",".join(OOD_TASKS), "--data", f"synthetic={data}", "--encoders", "offline",
         "--estimator", str(ckpt), "--output_path", str(root / "runs" / "a"), "--no_builtin_tasks",
         "--bootstrap", "50", "--emi-cache", "off"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (path,) = sorted((root / "runs" / "a").rglob("*_results.json"))
    results = json.loads(path.read_text())
    assert results["lmms_emi"]["estimator"]["comparability"] == "global"
    return {"root": root, "path": path, "results": results}


def _copy(real_run: dict[str, Any], name: str, edit: Any = None, *, model: str | None = None) -> Path:
    """A copy of the real results JSON under ``root/runs/<name>/``; ``model`` renames the model, ``edit``
    changes the dict in place."""
    data = copy.deepcopy(real_run["results"])
    if model is not None:
        data["model_name"] = model
        for analysis in data["lmms_emi"]["benchmarks"].values():
            analysis["metadata"]["model"] = model
    if edit is not None:
        edit(data)
    out = real_run["root"] / "runs" / name / f"{model or MODEL}" / "20260101_000000_results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data))
    return out


def _shift_emid(delta: float) -> Any:
    """Add ``delta`` to every OOD task's EMID, in the analysis and in lmms-eval's per-task results alike."""

    def edit(data: dict) -> None:
        for analysis in data["lmms_emi"]["benchmarks"].values():
            for t in analysis["tasks"]:
                if t["task"] != ID_TASK:
                    t["emid"] += delta
        for task in OOD_TASKS:
            data["results"][task]["emid,none"] += delta

    return edit


def _expected(results: dict) -> dict[str, Any]:
    """The table's values computed directly from lmms-eval's per-task results of one run."""
    res = results["results"]
    emid = {t: res[t]["emid,none"] for t in OOD_TASKS}
    bound = [res[t]["emid_bound,none"] for t in OOD_TASKS]
    by_kind: dict[str, list[float]] = {}
    for t in OOD_TASKS:
        by_kind.setdefault(sc.scenario_for_task(t).shift_kind, []).append(emid[t])
    worst = max(emid, key=emid.__getitem__)
    return {
        "id_task": ID_TASK,
        "n_ood_tasks": 3,
        "n_samples": sum(res[t]["emi_n,none"] for t in TASKS),
        "emi_id": res[ID_TASK]["emi,none"],
        "emi_id_ci_low": res[ID_TASK]["emi_ci_low,none"],
        "emi_id_ci_high": res[ID_TASK]["emi_ci_high,none"],
        "emid_mean": sum(emid.values()) / len(emid),
        "emid_worst": emid[worst],
        "emid_worst_task": worst,
        "bound_mean": sum(bound) / len(bound),
        "r_emid_bound": stats.pearsonr(list(emid.values()), bound).statistic,
        **{f"emid_{k}": sum(v) / len(v) for k, v in by_kind.items()},
    }


def _cli(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
    code = main(["leaderboard", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def _error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("lmms-emi leaderboard: error: ")
    return lines[0]


# ------------------------------------------------------------------------------------ a hand-written table
def _handmade_run(folder: Path, model: str, *, emid: float | None = 0.25, text_encoder: str = "t") -> Path:
    """A small results JSON in lmms-eval's layout with an EMI section, written by hand (no lmms-eval run):
    the ID task and one visual-shift task, whose EMID may be missing."""
    estimator = {
        "name": "frozen-x",
        "sha256": "ab" * 32,
        "comparability": "global",
        "encoders": {"vision": {"name": "enc-v", "dim": 8}, "text": {"name": text_encoder, "dim": 8}},
    }
    tasks = [
        {"task": "t_id", "shift_kind": "id", "n": 10, "emi": 0.5, "emi_ci": [0.25, 0.75]},
        {"task": "t_vis", "shift_kind": "visual", "n": 10, "emi": 0.25, "emid": emid, "bound": 1.5},
    ]
    analysis = {
        "id_task": "t_id",
        "tasks": tasks,
        "settings": {"confidence_level": 0.95},
        "correlations": {},
        "metadata": {"model": model},
    }
    data = {
        "results": {"t_id": {"emi,none": 0.5}, "t_vis": {"emi,none": 0.25, "emid,none": emid}},
        "config": {"model": "replay"},
        "lmms_emi": {"estimator": estimator, "benchmarks": {"bench": analysis}},
    }
    path = folder / f"{model}_results.json"
    path.write_text(json.dumps(data))
    return path


def test_renderings_of_a_handwritten_table(tmp_path: Path) -> None:
    """Numbers to three decimals, the interval in brackets, a missing value as "–" (Markdown) or an empty
    cell (CSV, full precision otherwise), null in JSON; encoders that differ are named field by field with
    both runs."""
    a = _handmade_run(tmp_path, "model-a")
    b = _handmade_run(tmp_path, "model-b", emid=None)
    board = build_leaderboard([a, b])
    head = (
        "| rank | model | run | ID EMI [95% CI] | mean EMID | worst EMID | mean bound | r(EMID, bound) | "
        "EMID visual | EMID text | EMID joint |"
    )
    md = board.to_markdown().splitlines()
    i = md.index(head)
    assert md[i + 1 : i + 4] == [
        "|---|---|---|---|---|---|---|---|---|---|---|",
        "| 1 | model-a | model-a | 0.500 [0.250, 0.750] | 0.250 | 0.250 | 1.500 | – | 0.250 | – | – |",
        "| – | model-b | model-b | 0.500 [0.250, 0.750] | – | – | 1.500 | – | – | – | – |",
    ]
    rows = list(csv.DictReader(io.StringIO(board.to_csv())))
    assert [(r["model"], r["rank"], r["emid_mean"], r["emi_id_ci_low"]) for r in rows] == [
        ("model-a", "1", "0.25", "0.25"),
        ("model-b", "", "", "0.25"),
    ]
    assert [r["emid_mean"] for r in json.loads(board.to_json())["rows"]] == [0.25, None]

    other = _handmade_run(tmp_path, "model-c", text_encoder="other-t")
    with pytest.raises(UsageError) as info:
        build_leaderboard([a, other])
    assert (
        f"encoders differ: encoders.text.name: {a} (model model-a) 't', {other} (model model-c) 'other-t'"
        in str(info.value)
    )


# ------------------------------------------------------------------------------------------------ values
@pytest.mark.slow
def test_table_values_equal_the_results_json(real_run: dict[str, Any]) -> None:
    worse = _copy(real_run, "b", _shift_emid(0.25), model="model-b")
    board = build_leaderboard([real_run["path"].parent.parent, worse])  # a folder and a file
    assert board.comparable and [r["model"] for r in board.rows] == [MODEL, "model-b"]
    expected = {MODEL: _expected(real_run["results"]), "model-b": _expected(json.loads(worse.read_text()))}
    for row in board.rows:
        want = expected[row["model"]]
        assert row["benchmark"] == "synthetic" and row["bound_form"] == "scale-adjusted"
        for key, value in want.items():
            got = row[key]
            if isinstance(value, float):
                assert got == pytest.approx(value, rel=1e-9, abs=1e-12), key
            else:
                assert got == value, key
    a, b = board.rows
    assert (a["rank"], b["rank"]) == (1, 2)  # lower mean EMID ranks first
    assert b["emid_mean"] - a["emid_mean"] == pytest.approx(0.25)
    assert b["emi_id"] == a["emi_id"] and not a["flag"]
    # ranking by ID EMI (higher is better): the two share the value, hence the rank
    assert [r["rank"] for r in build_leaderboard([real_run["path"], worse], sort="emi_id").rows] == [1, 1]


@pytest.mark.slow
def test_other_metrics_become_columns_averaged_over_tasks(real_run: dict[str, Any]) -> None:
    """A judge's ``winrate,none`` (issue 10) is one more column: the mean over the benchmark's tasks."""
    winrates = {ID_TASK: 0.5, OOD_TASKS[0]: 0.25, OOD_TASKS[1]: 0.125, OOD_TASKS[2]: None}

    def edit(data: dict) -> None:
        for task, value in winrates.items():
            data["results"][task]["winrate,none"] = value
            data["results"][task]["winrate_stderr,none"] = "N/A"
            data["higher_is_better"].setdefault(task, {})["winrate"] = True

    judged = _copy(real_run, "judged", edit, model="model-j")
    board = build_leaderboard([real_run["path"], judged], sort="winrate")
    assert board.extra_columns == ["winrate"]
    assert board.columns == [*COLUMNS[:19], "winrate", *COLUMNS[19:]]
    rows = {r["model"]: r for r in board.rows}
    assert rows["model-j"]["winrate"] == pytest.approx((0.5 + 0.25 + 0.125) / 3)
    assert rows[MODEL]["winrate"] is None and rows[MODEL]["rank"] is None
    assert rows["model-j"]["rank"] == 1
    assert "| winrate |" in board.to_markdown()


# --------------------------------------------------------------------------------------- comparability
def _other_estimator(data: dict) -> None:
    est = data["lmms_emi"]["estimator"]
    est.update(name="paper-global", sha256="99ab0626" + "0" * 56, path="/cache/CLUB_global.pt")
    est["manifest"] = None


def _other_encoders(data: dict) -> None:
    data["lmms_emi"]["estimator"]["encoders"]["text"]["name"] = "xlm-roberta-base"


def _fitted(data: dict) -> None:
    data["lmms_emi"]["estimator"].update(source="fitted", comparability="run")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (_other_estimator, ["estimator differs", "paper-global (sha256 99ab06260000)", "frozen.safetensors"]),
        (_other_encoders, ["encoders differ", "encoders.text.name", "'xlm-roberta-base'"]),
        (_fitted, ["fitted on its own run"]),
    ],
    ids=["estimator", "encoders", "fitted"],
)
def test_incomparable_runs_are_refused_naming_the_difference(
    real_run: dict[str, Any], capsys: pytest.CaptureFixture[str], edit: Any, words: list[str]
) -> None:
    other = _copy(real_run, f"x_{edit.__name__}", edit, model="model-x")
    out_dir = real_run["root"] / f"out_refused_{edit.__name__}"
    code, out, err = _cli(capsys, real_run["path"], other, "--output-path", out_dir)
    assert code == 2 and out == "" and not out_dir.exists()
    line = _error_line(err)
    assert "cannot rank these runs" in line and "--force" in line and str(other) in line
    for word in words:
        assert word in line

    code, out, err = _cli(capsys, real_run["path"], other, "--force", "--format", "json")
    assert code == 0 and "NOT comparable" in err
    board = json.loads(out)
    assert board["schema"] == SCHEMA and board["comparable"] is False and board["forced"] is True
    flags = {r["model"]: r["flag"] for r in board["rows"]}
    assert flags["model-x"].startswith("not comparable:") and all(w in flags["model-x"] for w in words)
    assert flags[MODEL] is None
    md = build_leaderboard([real_run["path"], other], force=True).to_markdown()
    assert "**NOT COMPARABLE**" in md and "| ⚠ " in md


@pytest.mark.slow
def test_one_fitted_run_alone_is_shown(real_run: dict[str, Any]) -> None:
    """An estimator fitted on its run makes EMI comparable within that run: one such run is a valid table."""
    board = build_leaderboard([_copy(real_run, "alone", _fitted)])
    assert board.comparable and len(board.rows) == 1


@pytest.mark.slow
def test_a_task_analysed_alone_is_a_row_of_its_own(real_run: dict[str, Any]) -> None:
    """``--metrics emi`` on a user's task without an ID task: one row, EMI only, unranked by EMID."""

    def edit(data: dict) -> None:
        analysis = data["lmms_emi"]["benchmarks"].pop("synthetic")
        (id_entry,) = [t for t in analysis["tasks"] if t["task"] == ID_TASK]
        analysis.update(id_task="my_vqa", tasks=[{**id_entry, "task": "my_vqa"}])
        analysis["correlations"] = {}
        data["lmms_emi"]["tasks"] = {"my_vqa": analysis}

    (row,) = build_leaderboard([_copy(real_run, "single", edit)]).rows
    emi = real_run["results"]["results"][ID_TASK]
    assert (row["benchmark"], row["id_task"], row["n_ood_tasks"]) == ("my_vqa", "my_vqa", 0)
    assert (row["emi_id"], row["emi_id_ci_low"]) == (emi["emi,none"], emi["emi_ci_low,none"])
    assert row["emid_mean"] is None and row["emid_worst"] is None and row["rank"] is None


@pytest.mark.slow
def test_a_run_without_a_recorded_estimator_is_not_ranked(real_run: dict[str, Any]) -> None:
    def edit(data: dict) -> None:
        data["lmms_emi"]["estimator"] = {"source": "checkpoint", "comparability": "global"}

    with pytest.raises(UsageError, match="does not record its estimator"):
        build_leaderboard([real_run["path"], _copy(real_run, "noest", edit, model="model-n")])


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.slow
def test_bad_inputs_are_one_line_errors(real_run: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    root = real_run["root"]
    (report,) = real_run["path"].parent.glob("*emi_report_synthetic.json")  # ours, not lmms-eval's results
    garbage = root / "bad" / "x_results.json"
    garbage.parent.mkdir(exist_ok=True)
    garbage.write_text("{not json")
    no_emi = _copy(real_run, "noemi", lambda d: d.pop("lmms_emi"))
    empty = root / "empty_folder"
    empty.mkdir(exist_ok=True)
    out_dir = root / "out_bad"
    cases = [
        ([], "no runs given"),
        ([report], "not an lmms-eval results JSON"),
        ([garbage], "not an lmms-eval results JSON"),
        ([real_run["path"], no_emi], "has no EMI"),
        ([empty], "no *_results.json file"),
        ([root / "missing.json"], "no such file or folder"),
        ([real_run["path"], "--sort", "nonsense"], "cannot sort by 'nonsense'"),
    ]
    for args, words in cases:
        code, out, err = _cli(capsys, *args, "--output-path", out_dir)
        assert code == 2 and out == "", (args, err)
        assert words in _error_line(err), (args, err)
        assert not out_dir.exists()


# ---------------------------------------------------------------------------------------------- outputs
@pytest.mark.slow
def test_all_four_files_written_and_never_overwritten(
    real_run: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    worse = _copy(real_run, "w", _shift_emid(0.1), model="model-w")
    out_dir = real_run["root"] / "board"
    code, out, err = _cli(capsys, real_run["path"], worse, "--output-path", out_dir)
    assert code == 0 and out.startswith("# EMI leaderboard")
    files = {p.name: p for p in out_dir.iterdir()}
    assert sorted(files) == ["leaderboard.csv", "leaderboard.json", "leaderboard.md", "leaderboard.png"]
    assert files["leaderboard.md"].read_text() == out
    board = json.loads(files["leaderboard.json"].read_text())
    assert board["columns"] == list(COLUMNS) and board["comparable"] is True
    rows = list(csv.DictReader(io.StringIO(files["leaderboard.csv"].read_text())))
    assert [r["model"] for r in rows] == [r["model"] for r in board["rows"]] == [MODEL, "model-w"]
    for row_csv, row_json in zip(rows, board["rows"], strict=True):
        for col in ("emi_id", "emid_mean", "emid_worst", "bound_mean", "r_emid_bound", "emid_joint"):
            assert math.isclose(float(row_csv[col]), row_json[col], rel_tol=1e-12), col
    assert files["leaderboard.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert files["leaderboard.png"].stat().st_size > 5000

    before = {n: p.read_bytes() for n, p in files.items()}
    code, out, err = _cli(capsys, worse, "--output-path", out_dir)  # another table, same folder
    assert code == 2 and "already exist" in _error_line(err)
    assert {n: p.read_bytes() for n, p in files.items()} == before
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(files)  # no temp file left
    code, out, err = _cli(capsys, worse, "--output-path", out_dir, "--overwrite", "--format", "csv")
    assert code == 0 and files["leaderboard.csv"].read_text() == out
    assert len(json.loads(files["leaderboard.json"].read_text())["rows"]) == 1

"""``lmms-emi leaderboard``.

Fast tier: runs built in the test, by the pipeline itself on synthetic embeddings (``_write_run``: the
embeddings file, a fitted estimator file when the run fitted one, and lmms-eval's results JSON with the EMI
section the harness merges in), and results JSON written by hand. Slow tier: one real ``lmms-emi eval`` of the
offline demo (4 synthetic tasks: the ID task and one visual, one text, one joint shift; a frozen estimator,
so the run is comparable) made once, plus copies of its results JSON with edited values standing for other
models / other estimators, every table value checked against lmms-eval's per-task results
(``results[<task>]``); and real ``lmms-emi score`` runs of the demo model and three degraded copies of its
answers, ranked on a board re-scored with one common estimator."""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import shutil
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

_AT = COLUMNS.index("estimator")  # where metric columns go

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
        "emi_ood_mean": sum(res[t]["emi,none"] for t in OOD_TASKS) / len(OOD_TASKS),
        "emi_ood_ci_low": sum(res[t]["emi_ci_low,none"] for t in OOD_TASKS) / len(OOD_TASKS),
        "emi_ood_ci_high": sum(res[t]["emi_ci_high,none"] for t in OOD_TASKS) / len(OOD_TASKS),
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
def _handmade_run(
    folder: Path,
    model: str,
    *,
    emid: float | None = 0.25,
    text_encoder: str = "t",
    emi: tuple[float, float] = (0.5, 0.25),
    ci: tuple[tuple[float, float] | None, tuple[float, float] | None] = ((0.25, 0.75), None),
    name: str | None = None,
    estimator: dict[str, Any] | None = None,
) -> Path:
    """A small results JSON in lmms-eval's layout with an EMI section, written by hand (no lmms-eval run):
    the ID task and one visual-shift task, whose EMID may be missing; ``name``: the file's run id."""
    estimator = estimator or {
        "name": "frozen-x",
        "sha256": "ab" * 32,
        "comparability": "global",
        "encoders": {"vision": {"name": "enc-v", "dim": 8}, "text": {"name": text_encoder, "dim": 8}},
    }
    tasks = [
        {"task": "t_id", "shift_kind": "id", "n": 10, "emi": emi[0], "emi_ci": ci[0]},
        {"task": "t_vis", "shift_kind": "visual", "n": 10, "emi": emi[1], "emi_ci": ci[1], "emid": emid,
         "bound": 1.5},
    ]  # fmt: skip
    analysis = {
        "id_task": "t_id",
        "tasks": tasks,
        "settings": {"confidence_level": 0.95},
        "correlations": {},
        "metadata": {"model": model},
    }
    data = {
        "results": {"t_id": {"emi,none": emi[0]}, "t_vis": {"emi,none": emi[1], "emid,none": emid}},
        "config": {"model": "replay"},
        "lmms_emi": {"estimator": estimator, "benchmarks": {"bench": analysis}},
    }
    path = folder / f"{name or model}_results.json"
    path.write_text(json.dumps(data))
    return path


def test_renderings_of_a_handwritten_table(tmp_path: Path) -> None:
    """Numbers to three decimals, the interval in brackets, a missing value as "–" (Markdown) or an empty
    cell (CSV, full precision otherwise), null in JSON; encoders that differ are named field by field with
    both runs."""
    a = _handmade_run(tmp_path, "model-a", ci=((0.25, 0.75), (0.125, 0.375)))
    b = _handmade_run(tmp_path, "model-b", emid=None, emi=(0.5, 0.125))
    board = build_leaderboard([a, b])
    head = (
        "| rank | model | run | EMI under shift [95% CI] | ID EMI [95% CI] | mean EMID | worst EMID | "
        "mean bound | r(EMID, bound) | EMID visual | EMID text | EMID joint |"
    )
    md = board.to_markdown().splitlines()
    i = md.index(head)
    assert md[i + 1 : i + 4] == [
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        "| 1 | model-a | model-a | 0.250 [0.125, 0.375] | 0.500 [0.250, 0.750] | 0.250 | 0.250 | 1.500 | – | "
        "0.250 | – | – |",
        "| 2 | model-b | model-b | 0.125 | 0.500 [0.250, 0.750] | – | – | 1.500 | – | – | – | – |",
    ]
    rows = list(csv.DictReader(io.StringIO(board.to_csv())))
    assert [
        (r["model"], r["rank"], r["emid_mean"], r["emi_id_ci_low"], r["emi_ood_ci_low"]) for r in rows
    ] == [
        ("model-a", "1", "0.25", "0.25", "0.125"),
        ("model-b", "2", "", "0.25", ""),
    ]
    payload = json.loads(board.to_json())
    assert payload["sort"] == "emi_ood_mean" and payload["version"] == 2
    assert [r["emid_mean"] for r in payload["rows"]] == [0.25, None]

    other = _handmade_run(tmp_path, "model-c", text_encoder="other-t")
    with pytest.raises(UsageError) as info:
        build_leaderboard([a, other])
    assert (
        f"encoders differ: encoders.text.name: {a} (model model-a) 't', {other} (model model-c) 'other-t'"
        in str(info.value)
    )


def _figure_labels(board: Any) -> list[str]:
    """The model names on the PNG's first panel, top to bottom (as drawn, read back from the figure)."""
    ax = board.figure().axes[0]
    ticks = sorted(zip(ax.get_yticks(), (t.get_text() for t in ax.get_yticklabels()), strict=True))
    return [label.split(". ", 1)[1] for _, label in reversed(ticks)]


def test_a_model_worse_everywhere_does_not_win_by_losing_little(tmp_path: Path) -> None:
    """The user's two models (issue 19): the demo model, and its answers cut to 5 words, far lower in EMI
    (ID −0.996 vs −0.306) but with a smaller drop. Ranked by mean EMID the cut model came first; the
    default ranks by EMI under shift, so the demo model is first, in the table and in the PNG."""
    demo = _handmade_run(
        tmp_path, "demo", emi=(-0.306, -0.5), emid=0.194, ci=((-0.588, -0.018), (-0.8, -0.2))
    )
    cut = _handmade_run(
        tmp_path, "cut5", emi=(-0.996, -1.05), emid=0.054, ci=((-1.122, -0.697), (-1.2, -0.9))
    )
    board = build_leaderboard([cut, demo])
    assert board.sort == "emi_ood_mean"
    assert [(r["model"], r["rank"]) for r in board.rows] == [("demo", 1), ("cut5", 2)]
    assert [r["model"] for r in json.loads(board.to_json())["rows"]] == ["demo", "cut5"]
    assert _figure_labels(board) == ["demo", "cut5"]
    # the drop alone would put the cut model first: it is still there, beside the headline
    by_emid = build_leaderboard([cut, demo], sort="emid_mean")
    assert [r["model"] for r in by_emid.rows] == ["cut5", "demo"]
    assert _figure_labels(by_emid) == ["cut5", "demo"]
    row = board.rows[0]
    assert (row["emi_ood_mean"], row["emi_ood_ci_low"], row["emi_ood_ci_high"]) == (-0.5, -0.8, -0.2)
    assert (row["emi_id"], row["emi_id_ci_low"], row["emi_id_ci_high"]) == (-0.306, -0.588, -0.018)


def test_the_png_shows_both_emi_with_intervals_and_both_emid(tmp_path: Path) -> None:
    """The figure: model names on the y axis, labelled x axes, EMI under shift and ID EMI as points with
    their intervals as capped bars (error bars from the interval's ends), mean and worst EMID beside; PNG
    bytes."""
    demo = _handmade_run(
        tmp_path, "demo", emi=(-0.306, -0.5), emid=0.194, ci=((-0.588, -0.018), (-0.8, -0.2))
    )
    board = build_leaderboard([demo])
    fig = board.figure()
    left, right = fig.axes[:2]
    assert "EMI" in left.get_xlabel() and "higher" in left.get_xlabel()
    assert "EMID" in right.get_xlabel() and "lower" in right.get_xlabel()
    assert [t.get_text() for t in left.get_yticklabels()] == ["1. demo"]
    legend = [t.get_text() for t in left.get_legend().get_texts()]
    assert legend == ["EMI under shift (95% CI)", "ID EMI (95% CI)"]
    bars = list(left.collections)  # one bar per interval, from its low to its high end
    assert len(bars) == 2
    segments = sorted(tuple(round(float(x), 3) for x in seg[:, 0]) for c in bars for seg in c.get_segments())
    assert segments == [(-0.8, -0.2), (-0.588, -0.018)]
    assert [t.get_text() for t in right.get_legend().get_texts()] == ["mean EMID", "worst EMID"]
    assert board.to_png()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_second_runs_keep_their_own_labels(tmp_path: Path) -> None:
    """Two runs of one model in one second: ``<id>_results.json`` and ``<id>-2_results.json``; each row is
    labelled with its own file's id (and its numbers are its own)."""
    run_id = "20260101_120000"
    first = _handmade_run(tmp_path, "m", name=run_id, emi=(0.5, 0.25))
    second = _handmade_run(tmp_path, "m", name=f"{run_id}-2", emi=(0.5, 0.125), emid=0.375)
    for path in (first, second):  # lmms-eval's `date` is the same second in both
        data = json.loads(path.read_text())
        data["date"] = run_id
        path.write_text(json.dumps(data))
    board = build_leaderboard([tmp_path])
    got = {r["run"]: (r["emi_ood_mean"], r["results_file"]) for r in board.rows}
    assert got == {run_id: (0.25, str(first)), f"{run_id}-2": (0.125, str(second))}
    assert _figure_labels(board) == [f"m ({run_id})", f"m ({run_id}-2)"]


def test_a_results_file_without_emi_in_a_folder_is_skipped_with_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A killed or failed run leaves a results JSON without EMI: skipped with one note naming it, the rest of
    the folder ranked. Named on its own it is still an error."""
    _handmade_run(tmp_path, "model-a")
    _handmade_run(tmp_path, "model-b", emi=(0.5, 0.125))
    killed = tmp_path / "killed_results.json"
    killed.write_text(json.dumps({"results": {"t_id": {}}, "config": {"model": "replay"}}))
    board = build_leaderboard([tmp_path])
    assert [r["model"] for r in board.rows] == ["model-a", "model-b"]
    assert [n for n in board.notes if str(killed) in n] == [
        f"skipped {killed}: " + board.notes[0].split(": ", 1)[1]
    ]
    assert "no EMI" in board.notes[0]
    code, out, err = _cli(capsys, tmp_path)
    assert code == 0 and f"note: skipped {killed}" in err and "model-b" in out
    assert len([x for x in err.splitlines() if "skipped" in x]) == 1
    code, out, err = _cli(capsys, killed, tmp_path / "model-a_results.json")
    assert code == 2 and "has no EMI" in _error_line(err)


# ------------------------------------------------------------------------------- comparable by content
def _estimator_record(**keys: Any) -> dict[str, Any]:
    enc = {"vision": {"name": "enc-v", "dim": 8}, "text": {"name": "t", "dim": 8}}
    return {"comparability": "global", "encoders": enc, **keys}


def test_estimators_are_compared_by_content_whatever_their_source(tmp_path: Path) -> None:
    """Two runs that each fitted their estimator, bit-identical (same tensors sha256), are comparable; a
    registered estimator and the same file given by path are too; only content that differs is refused,
    naming it."""
    tensors = "cd" * 32
    fitted = {"source": "fitted", "comparability": "run", "manifest": {"tensors_sha256": tensors}}
    a = _handmade_run(tmp_path, "a", estimator=_estimator_record(**fitted, sha256="01" * 32, path="/x/a.st"))
    b = _handmade_run(tmp_path, "b", estimator=_estimator_record(**fitted, sha256="02" * 32, path="/y/b.st"))
    assert build_leaderboard([a, b]).comparable  # same tensors, other files (their manifests differ)
    reg = _handmade_run(
        tmp_path, "r", estimator=_estimator_record(source="registry", name="paper-global", sha256="99" * 32)
    )
    by_path = _handmade_run(
        tmp_path, "p", estimator=_estimator_record(source="checkpoint", path="/c/CLUB.pt", sha256="99" * 32)
    )
    assert build_leaderboard([reg, by_path]).comparable
    other = {**fitted, "manifest": {"tensors_sha256": "ef" * 32}}
    c = _handmade_run(tmp_path, "c", estimator=_estimator_record(**other, sha256="03" * 32))
    with pytest.raises(UsageError) as info:
        build_leaderboard([a, c])
    message = str(info.value)
    assert "estimator differs (tensors sha256 differs)" in message and "fitted on its run" in message
    assert "--common-estimator" in message and str(c) in message


# ------------------------------------------------------------------------ runs built by the pipeline
SPEC = {"vision": {"name": "syn-v", "dim": 16}, "text": {"name": "syn-t", "dim": 16}}


class _SpecEmbedder:
    """What the pipeline asks of an embedder when every task comes as embeddings: the encoder spec."""

    def encoder_spec(self) -> dict[str, Any]:
        return copy.deepcopy(SPEC)


def synthetic_models(n: int = 30, d: int = 16, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Embeddings of four "models" on the ID task and one visual, one text and one joint shift (the same
    questions, drifted): ``demo`` answers each question (a fixed map of its query plus noise that grows
    under shift), ``cut`` keeps a third of that answer, ``shuffled`` gives demo's answers to other
    questions, ``empty`` gives one answer to every question. References: the map of the query, less noise."""
    import torch

    from lmms_emi.emi import TaskEmbeddings, query_embedding

    gen = torch.Generator().manual_seed(seed)

    def unit(*shape: int) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.randn(*shape, generator=gen), dim=-1)

    base_v, base_t = unit(n, d), unit(n, d)
    mix = torch.randn(d, d, generator=gen) / d**0.5
    blank = unit(1, d).expand(n, d).clone()
    drift = {
        ID_TASK: (0.0, 0.0),
        OOD_TASKS[0]: (0.6, 0.0),
        OOD_TASKS[1]: (0.0, 0.6),
        OOD_TASKS[2]: (0.6, 0.6),
    }
    models: dict[str, dict[str, Any]] = {m: {} for m in ("demo", "cut", "shuffled", "empty")}
    for task, (dv, dt) in drift.items():
        z_v = torch.nn.functional.normalize(base_v + dv * unit(n, d), dim=-1)
        z_t = torch.nn.functional.normalize(base_t + dt * unit(n, d), dim=-1)
        signal = torch.nn.functional.normalize(query_embedding(z_v, z_t) @ mix, dim=-1)
        ref = torch.nn.functional.normalize(signal + 0.3 * unit(n, d), dim=-1)
        demo = torch.nn.functional.normalize(signal + (0.2 + dv + dt) * unit(n, d), dim=-1)
        cut = torch.nn.functional.normalize(0.35 * demo + unit(n, d), dim=-1)
        perm = torch.randperm(n, generator=gen)
        for name, z_model in (("demo", demo), ("cut", cut), ("shuffled", demo[perm]), ("empty", blank)):
            models[name][task] = TaskEmbeddings(z_v, z_t, z_model, ref)
    return models


def fit_estimator(tasks: Any, *, seed: int = 0) -> Any:
    from lmms_emi.pipeline.estimator import fit_pooled_estimator

    return fit_pooled_estimator(tasks, seed=seed, steps=300, hidden_size=32, progress=False, patience=None)


def write_run(
    folder: Path,
    model: str,
    run_id: str,
    tasks: Any,
    club: Any,
    *,
    frozen: Path | None = None,
    n_resamples: int = 40,
) -> Path:
    """A run as ``lmms-emi eval`` leaves it, made by the pipeline on the embeddings ``tasks``: its embeddings
    file, lmms-eval's results JSON with the EMI section merged in, and, without ``frozen`` (the checkpoint
    the run was given), its fitted estimator ``club`` saved as the report writer saves it."""
    from dataclasses import asdict, replace

    from lmms_emi.embed.store import save_embeddings
    from lmms_emi.estimator_registry import file_sha256
    from lmms_emi.harness.results import update_results
    from lmms_emi.pipeline.estimator import EstimatorInfo, EstimatorPolicy, fixed_estimator
    from lmms_emi.pipeline.run import analyze_run
    from lmms_emi.pipeline.shift import AnalysisSettings

    folder.mkdir(parents=True, exist_ok=True)
    embeddings = save_embeddings(tasks, folder / f"{run_id}_emi_embeddings.safetensors", encoders=SPEC)
    files = {"embeddings": embeddings}
    if frozen is not None:
        club, info = fixed_estimator(EstimatorPolicy(str(frozen), progress=False), SPEC)
    else:
        saved = club.save(folder / f"{run_id}_club_fitted.safetensors", club.make_manifest(SPEC))
        manifest = asdict(club.make_manifest(SPEC))  # as the pipeline records it (no tensors checksum)
        info = EstimatorInfo("fitted", str(saved), "run", SPEC, manifest, "fitted", None, file_sha256(saved))
        files["estimator"] = saved
    run = analyze_run(
        {}, embedder=_SpecEmbedder(), policy=EstimatorPolicy(progress=False),
        settings=AnalysisSettings(n_resamples=n_resamples, seed=0), metadata={"model": model},
        embeddings=tasks, estimator=(club, info),
    )  # fmt: skip
    run.estimator = replace(info)
    results = {
        "results": {t: {"alias": t} for t in tasks},
        "config": {"model": "lmms_emi_replay"},
        "higher_is_better": {},
        "date": run_id.split("-")[0],
    }
    final = update_results(results, run, extra={}, reports={"run": files})
    path = folder / f"{run_id}_results.json"
    path.write_text(json.dumps(final, default=str))
    return path


@pytest.fixture(scope="module")
def models() -> dict[str, dict[str, Any]]:
    return synthetic_models()


@pytest.fixture(scope="module")
def frozen(models: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One frozen estimator, fitted on every model's pairs."""
    pooled = {f"{m}:{t}": e for m, tasks in models.items() for t, e in tasks.items()}
    club = fit_estimator(pooled)
    return club.save(tmp_path_factory.mktemp("frozen") / "frozen.safetensors", club.make_manifest(SPEC))


def test_the_demo_model_ranks_above_its_degraded_answers(
    models: dict[str, Any], frozen: Path, tmp_path: Path
) -> None:
    """Issue 19, on runs the pipeline scored with one frozen estimator: under the default sort the demo
    model ranks above its answers cut short, shuffled across questions, and empty, in the table and in the
    PNG; ranked by mean EMID alone, a degraded model would come first."""
    for i, (name, tasks) in enumerate(models.items()):
        write_run(tmp_path / name, name, f"20260101_00000{i}", tasks, None, frozen=frozen)
    board = build_leaderboard([tmp_path])
    assert board.comparable
    order = [r["model"] for r in board.rows]
    assert order[0] == "demo" and set(order) == set(models), order
    assert [r["model"] for r in json.loads(board.to_json())["rows"]] == order
    assert _figure_labels(board) == order
    emid_first = build_leaderboard([tmp_path], sort="emid_mean").rows[0]["model"]
    assert emid_first != "demo"  # what the old default ranked first


def _numbers(board: Any) -> dict[str, tuple]:
    keys = ("emi_ood_mean", "emi_ood_ci_low", "emi_ood_ci_high", "emi_id", "emi_id_ci_low", "emi_id_ci_high",
            "emid_mean", "emid_worst", "bound_mean", "r_emid_bound")  # fmt: skip
    return {r["model"]: tuple(r[k] for k in keys) for r in board.rows}


def test_common_estimator_rescores_runs_that_each_fitted_their_own(
    models: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Runs that each fitted their own estimator are refused (naming it, pointing at --common-estimator);
    ``--common-estimator`` fits one on their pooled, de-duplicated saved embeddings (no encoder), saves it
    beside the board and records it there, and every number equals a run scored with that file given as
    its estimator (the path of ``lmms-emi score ... --estimator FILE``)."""
    runs = tmp_path / "runs"
    for i, name in enumerate(("demo", "cut", "shuffled")):
        write_run(runs / name, name, f"20260101_00000{i}", models[name], fit_estimator(models[name], seed=i))
    with pytest.raises(UsageError) as info:
        build_leaderboard([runs])
    assert "fitted on its run" in str(info.value) and "--common-estimator" in str(info.value)

    out = tmp_path / "board"
    flags = ("--common-estimator", "--output-path", out, "--estimator-steps", "300", "--quiet")
    code, stdout, err = _cli(capsys, runs, *flags, "--format", "json")
    assert code == 0, err
    saved = out / "leaderboard_club.safetensors"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["leaderboard.md", "leaderboard.csv", "leaderboard.json", "leaderboard.png", saved.name]
    )
    board = json.loads(stdout)
    assert board == json.loads((out / "leaderboard.json").read_text())
    from lmms_emi.estimator_registry import file_sha256

    sha = file_sha256(saved)
    assert board["comparable"] and board["common_estimator"]["sha256"] == sha
    assert board["common_estimator"]["path"] == str(saved) and board["estimator"]["sha256"] == sha
    from lmms_emi.embed.pool import sample_fingerprints

    unique = {
        fp for m in ("demo", "cut", "shuffled") for e in models[m].values() for fp in sample_fingerprints(e)
    }
    assert board["common_estimator"]["n_pairs"] == 2 * len(
        unique
    )  # a shuffled answer on its own question: once
    assert all(r["rescored"] for r in board["runs"]) and all(
        sha[:12] in r["estimator"] for r in board["rows"]
    )
    assert "re-scored every run with one estimator" in " ".join(board["notes"]) and "note: re-scored" in err

    # the same data scored with that file as the run's estimator: the same numbers, bit for bit
    scored = tmp_path / "scored"
    for i, name in enumerate(("demo", "cut", "shuffled")):
        write_run(scored / name, name, f"20260101_00000{i}", models[name], None, frozen=saved)
    direct = build_leaderboard([scored])
    rescored = build_leaderboard([runs], common_estimator=_common(tmp_path / "again"))
    assert _numbers(rescored) == _numbers(direct)
    assert {r["model"]: r["rank"] for r in board["rows"]} == {r["model"]: r["rank"] for r in direct.rows}
    assert [r["emi_id"] for r in board["rows"]] == [r["emi_id"] for r in rescored.rows]

    # a run named twice (a copy of its folder) adds no sample: the same estimator
    shutil.copytree(runs / "demo", runs / "zz_copy")
    again = _common(tmp_path / "dup")
    build_leaderboard([runs], common_estimator=again)
    assert again.file_bytes == saved.read_bytes()

    code, _, err = _cli(capsys, runs, "--common-estimator")
    assert code == 2 and "--common-estimator needs --output-path" in _error_line(err)


def test_bit_identical_fitted_estimators_are_comparable_though_their_files_differ(
    models: dict[str, Any], tmp_path: Path
) -> None:
    """Two runs that each fitted an estimator with the same tensors, saved with manifests that differ (so
    their files' sha256 differ, and the runs record no tensors checksum, as the pipeline records a fit):
    the checksum in each file's own manifest decides, and they are ranked together."""
    from dataclasses import replace

    club = fit_estimator(models["demo"])
    a = write_run(tmp_path / "a", "demo", "20260101_000000", models["demo"], club)
    b = write_run(tmp_path / "b", "cut", "20260101_000001", models["cut"], club)
    b_file = tmp_path / "b" / "20260101_000001_club_fitted.safetensors"
    club.save(b_file, replace(club.make_manifest(SPEC), data_fingerprint="another fit's data"))
    data = json.loads(b.read_text())
    from lmms_emi.estimator_registry import file_sha256

    data["lmms_emi"]["estimator"]["sha256"] = file_sha256(b_file)
    b.write_text(json.dumps(data))
    assert file_sha256(b_file) != json.loads(a.read_text())["lmms_emi"]["estimator"]["sha256"]
    assert not json.loads(a.read_text())["lmms_emi"]["estimator"]["manifest"]["tensors_sha256"]
    board = build_leaderboard([a, b])
    assert board.comparable and [r["model"] for r in board.rows] == ["demo", "cut"]
    other = write_run(tmp_path / "c", "cut", "20260101_000002", models["cut"], fit_estimator(models["cut"]))
    with pytest.raises(UsageError, match=r"estimator differs \(tensors sha256 differs\)"):
        build_leaderboard([a, other])


def _common(out: Path) -> Any:
    from lmms_emi.leaderboard.rescore import CommonEstimator

    return CommonEstimator(out, steps=300, patience=5, seed=0)


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
    assert (a["rank"], b["rank"]) == (1, 1)  # the same EMI under shift (only the EMIDs were edited)
    a, b = build_leaderboard([real_run["path"], worse], sort="emid_mean").rows
    assert (a["model"], a["rank"], b["rank"]) == (MODEL, 1, 2)  # lower mean EMID ranks first
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
    assert board.columns == [*COLUMNS[:_AT], "winrate", *COLUMNS[_AT:]]
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
    """An estimator fitted on its own run (other tensors than the frozen one)."""
    data["lmms_emi"]["estimator"].update(
        source="fitted", comparability="run", sha256="12" * 32, path="/elsewhere/x_club_fitted.safetensors"
    )
    data["lmms_emi"]["estimator"]["manifest"]["tensors_sha256"] = "34" * 32


def _fitted_same_content(data: dict) -> None:
    """The frozen estimator's very tensors, recorded as fitted on the run: comparable."""
    data["lmms_emi"]["estimator"].update(source="fitted", comparability="run")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (_other_estimator, ["estimator differs", "paper-global (sha256 99ab06260000)", "frozen.safetensors"]),
        (_other_encoders, ["encoders differ", "encoders.text.name", "'xlm-roberta-base'"]),
        (_fitted, ["estimator differs (tensors sha256 differs)", "fitted on its run", "--common-estimator"]),
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
    """An estimator fitted on its run makes EMI comparable within that run: one such run is a valid table;
    one recorded as fitted whose tensors are those of the other run's estimator is comparable with it."""
    board = build_leaderboard([_copy(real_run, "alone", _fitted)])
    assert board.comparable and len(board.rows) == 1
    same = _copy(real_run, "same", _fitted_same_content, model="model-s")
    assert build_leaderboard([real_run["path"], same]).comparable  # identical by content


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


# ------------------------------------------------------------------- real runs of the demo model (issue 19)
def _degraded_responses(folder: Path) -> list[str]:
    """Beside the demo model's answers, three degraded copies: cut to their first 5 words, shuffled across
    the questions of each split, and empty."""
    import random

    for f in sorted(folder.glob("*_demo-model.jsonl")):
        lines = [json.loads(x) for x in f.read_text().splitlines()]
        texts = [line["text"] for line in lines]
        perm = list(range(len(texts)))
        random.Random(0).shuffle(perm)
        variants = {
            "cut5": [" ".join(t.split()[:5]) for t in texts],
            "shuffled": [texts[j] for j in perm],
            "empty": ["" for _ in texts],
        }
        for model, answers in variants.items():
            out = f.with_name(f.name.replace("_demo-model.jsonl", f"_{model}.jsonl"))
            rows = [{**line, "text": a, "model_id": model} for line, a in zip(lines, answers, strict=True)]
            out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["demo-model", "cut5", "shuffled", "empty"]


def _as_results_json(report_dir: Path) -> Path:
    """The lmms-eval results JSON a ``score`` run would sit beside if it had been an lmms-eval run: its
    analysis under ``lmms_emi.benchmarks``, with the run's id."""
    (report,) = report_dir.glob("*_emi_report_synthetic.json")
    analysis = json.loads(report.read_text())
    run_id = report.name.removesuffix("_emi_report_synthetic.json")
    data = {
        "results": {t["task"]: {"emi,none": t["emi"]} for t in analysis["tasks"]},
        "config": {"model": "score"},
        "lmms_emi": {"estimator": analysis["estimator"], "benchmarks": {"synthetic": analysis}},
    }
    path = report_dir / f"{run_id}_results.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.slow
def test_real_runs_rank_the_demo_model_above_its_degraded_answers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 19 end to end with real encoders: ``lmms-emi score`` runs of the demo model and of its answers
    cut to 5 words, shuffled across questions and empty, each fitting its own estimator, are refused as they
    are; ``--common-estimator`` re-scores them with one, the demo model ranks first in the table and the
    PNG (by mean EMID alone it would not), the numbers equal ``lmms-emi score ... --estimator`` that file,
    and ``lmms-emi compare`` finds the demo model's EMI under shift significantly higher than each."""
    from lmms_emi.demo_data import build_demo_dataset, write_demo_responses

    data = build_demo_dataset(tmp_path / "data", benchmark="synthetic", scenarios=SPLITS)
    write_demo_responses(data, tmp_path / "responses", model_name="demo-model")
    names = _degraded_responses(tmp_path / "responses")
    common = ["--dataset", str(data), "--responses", str(tmp_path / "responses"), "--benchmark", "synthetic",
              "--encoders", "offline", "--bootstrap", "100", "--emi-cache", str(tmp_path / "cache"),
              "--quiet"]  # fmt: skip
    runs = tmp_path / "runs"
    results = {}
    for name in names:
        args = [
            "score",
            *common,
            "--model",
            name,
            "--output-path",
            str(runs / name),
            "--estimator-steps",
            "300",
        ]
        assert main(args) == 0, capsys.readouterr().err
        results[name] = _as_results_json(runs / name)
    capsys.readouterr()
    with pytest.raises(UsageError, match="--common-estimator"):
        build_leaderboard([runs])

    out = tmp_path / "board"
    code, stdout, err = _cli(
        capsys, runs, "--common-estimator", "--output-path", out, "--quiet", "--format", "json"
    )
    assert code == 0, err
    board = json.loads(stdout)
    order = [r["model"] for r in board["rows"]]
    assert order[0] == "demo-model" and sorted(order) == sorted(names), order
    from lmms_emi.leaderboard import load_run
    from lmms_emi.leaderboard.render import Leaderboard

    png = Leaderboard(board["rows"], board["columns"], [load_run(results[names[0]])], board["sort"])
    assert _figure_labels(png) == order
    by_emid = sorted(board["rows"], key=lambda r: r["emid_mean"])
    assert by_emid[0]["model"] != "demo-model"  # the old default: a model worse everywhere came first

    saved = out / "leaderboard_club.safetensors"
    assert main(["score", *common, "--model", "demo-model", "--output-path", str(tmp_path / "check"),
                 "--estimator", str(saved)]) == 0  # fmt: skip
    capsys.readouterr()
    (report,) = (tmp_path / "check").glob("*_emi_report_synthetic.json")
    analysis = json.loads(report.read_text())
    row = board["rows"][0]
    tasks = {t["task"]: t for t in analysis["tasks"]}
    assert (row["emi_id"], row["emi_id_ci_low"], row["emi_id_ci_high"]) == (
        tasks[ID_TASK]["emi"],
        *tasks[ID_TASK]["emi_ci"],
    )
    assert row["emi_ood_mean"] == sum(tasks[t]["emi"] for t in OOD_TASKS) / len(OOD_TASKS)
    assert row["emid_mean"] == pytest.approx(sum(tasks[t]["emid"] for t in OOD_TASKS) / 3, rel=1e-12)
    assert analysis["estimator"]["sha256"] == board["common_estimator"]["sha256"]

    from lmms_emi.leaderboard.paired import compare_runs

    for name in names[1:]:
        result = compare_runs(results["demo-model"], results[name], estimator=str(saved), n_resamples=500)
        (shifted,) = [d for d in result.differences if d.quantity == "EMI under shift"]
        assert shifted.diff > 0 and shifted.significant, (name, shifted)

"""Plain ``lmms-eval`` with lmms-emi installed (the ``lmms_eval.models`` entry-point hook), offline.

The real ``lmms-eval`` console script of this venv runs in a subprocess on a small LLaVA-Bench-shift-shaped
dataset (``lmms_emi.demo_data``, read through ``$LMMS_EMI_DATA``) with the replay model and the offline
encoders, and must give the same numbers as ``lmms-emi eval`` on the same data, in one process and in two
(``torchrun``, gloo on CPU; ``OMP_NUM_THREADS=1`` on both sides for bit-identical floats). A task run alone
with a frozen estimator gives the same EMI and interval as inside its group. The guards: the hook off
(``LMMS_EMI_HOOK=0``), an untested lmms-eval version (one warning, nothing patched), a second install (no
second patch), and a run that names no lmms-emi task (the same results JSON as with the hook off).
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmms_emi.cli import main
from lmms_emi.errors import UsageError
from lmms_emi.pipeline.run import plan_run

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
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
EMI_OPTIONS = {"profile": "offline", "train_steps": 60, "bootstrap": 40, "cache_dir": "off", "device": "cpu"}
KEYS = ("emi,none", "emi_ci_low,none", "emi_ci_high,none", "emid,none", "emid_ci_low,none", "emid_bound,none")


# ------------------------------------------------------------------------------------------- fast checks
def test_plan_run_explicit_id_task() -> None:
    plan = plan_run(["a", "b", OOD_TASKS[0], "c"], "b")  # the plugin task keeps its own rule
    assert plan.groups == {"b": ("b", ("b", "a", "c"))} and plan.singles == (OOD_TASKS[0],)
    assert plan_run(["a", "b"]).singles == ("a", "b") and not plan_run(["a", "b"]).groups
    assert "not in this run" in plan_run(["a", "b"], "x").warnings[0]
    with pytest.raises(UsageError, match="benchmark's ID task"):
        plan_run(["a"], ID_TASK)


def test_eval_emi_id_task_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    """``lmms-emi eval --emi-id-task``: a plugin task, or own tasks without ``--metrics emi``, are refused
    before lmms-eval runs."""
    cases = [
        (["--tasks", "own_b", "--emi-id-task", OOD_TASKS[0], "--metrics", "emi"], "benchmark's ID task"),
        (["--tasks", "own_b", "--emi-id-task", "own_a"], "add --metrics emi"),
    ]
    for argv, message in cases:
        assert main(["eval", "--model", "dummy", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("lmms-emi eval: error:") and message in err[0], err


def test_tasks_path(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["tasks-path"]) == 0
    folder = Path(capsys.readouterr().out.strip())
    assert (folder / "llavabench_shift" / "natural" / f"{GROUP}.yaml").is_file()
    assert main(["tasks-path", "--data", str(tmp_path / "nope")]) == 2
    assert "--dest" in capsys.readouterr().err


# One fresh process runs the hook's cases in order (the hook's once-per-process latch reset between them):
# an idle command first (what it imports, how long it takes), then off, untested, a user error, active.
_GUARD = """
import contextlib, io, json, sys, time
t = time.perf_counter()
from lmms_emi.harness import hook
from lmms_emi import lmms_eval_compat
out = {}

def case(name, tasks, *extra, env=None, version=None):
    import os
    os.environ.update(env or {})
    hook._status = None
    if version:
        lmms_eval_compat.installed_version = lambda: version
    argv = ["lmms-eval", "--model", "dummy", "--tasks", tasks, *extra]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            status = [hook.install(argv, in_cli=True), hook.install(argv, in_cli=True)]
        except SystemExit as exc:
            status = ["exit", exc.code]
    for key in (env or {}):
        del os.environ[key]
    from lmms_eval.tasks import TaskManager
    from lmms_eval.loggers.evaluation_tracker import EvaluationTracker
    mark = "__lmms_emi_patch__"
    out[name] = {
        "status": status, "argv": argv, "stderr": err.getvalue().splitlines(),
        "patched": [hasattr(TaskManager.__init__, mark),
                    hasattr(EvaluationTracker.save_results_aggregated, mark)],
    }

hook.install(["lmms-eval", "--model", "dummy", "--tasks", "mme,ocrbench"], in_cli=True)
out["idle_seconds"] = time.perf_counter() - t
out["idle_imports"] = [m for m in ("torch", "lmms_emi.harness.launch", "lmms_emi.embed") if m in sys.modules]
case("idle", "mme,ocrbench")
case("off", GROUP, "--metrics", "emi", env={"LMMS_EMI_HOOK": "0"})
case("untested", GROUP, "--metrics", "emi", version="9.9.9")
lmms_eval_compat.installed_version = lambda: "0.7.3"
case("error", "lbshift_nat_nope")
case("active", OOD, "--metrics", "emi", env={"LMMS_EMI_ENCODERS": "offline"})
from lmms_emi.harness import launch
from lmms_eval.tasks import TaskManager
launch.install_patches(); launch.install_patches()
out["double_wrapped"] = hasattr(TaskManager.__init__.__wrapped__, "__lmms_emi_patch__")
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def guard() -> dict:
    code = _GUARD.replace("GROUP", repr(GROUP)).replace("OOD", repr(OOD_TASKS[0]))
    proc = subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT")), None)
    assert proc.returncode == 0 and line, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(line[len("RESULT") :])


def test_hook_idle_on_other_tasks_is_cheap(guard: dict) -> None:
    """A command naming no lmms-emi task: nothing patched, nothing heavy imported, well under a second."""
    assert guard["idle"]["status"] == ["idle", "again"] and guard["idle"]["patched"] == [False, False]
    assert guard["idle_imports"] == [], "the hook imported heavy modules for an idle run"
    assert guard["idle_seconds"] < 0.5, guard["idle_seconds"]
    assert guard["idle"]["stderr"] == []


def test_hook_off_by_environment(guard: dict) -> None:
    got = guard["off"]
    assert got["status"] == ["off", "again"] and got["patched"] == [False, False]
    assert "--metrics" in got["argv"] and got["stderr"] == []


def test_hook_untested_lmms_eval_version_warns_once_and_patches_nothing(guard: dict) -> None:
    got = guard["untested"]
    assert got["status"] == ["untested", "again"] and got["patched"] == [False, False]
    assert len(got["stderr"]) == 1 and "lmms-eval 9.9.9" in got["stderr"][0]
    assert "LMMS_EMI_HOOK=force" in got["stderr"][0] and "--metrics" in got["argv"]


def test_hook_user_error_is_one_line(guard: dict) -> None:
    got = guard["error"]
    assert got["status"] == ["exit", 2] and got["patched"] == [False, False]
    assert len(got["stderr"]) == 1
    assert got["stderr"][0].startswith("lmms-emi: error: unknown task 'lbshift_nat_nope'")


def test_hook_plans_the_run_and_patches_once(guard: dict) -> None:
    """Active: argv planned as by ``lmms-emi eval``; installing twice (and the patches twice) wraps each
    lmms-eval method once."""
    got = guard["active"]
    assert got["status"] == ["active", "again"] and got["patched"] == [True, True]
    assert not guard["double_wrapped"]
    argv = got["argv"]
    assert "--metrics" not in argv and "emi_results" in argv
    assert f"{OOD_TASKS[0]},{ID_TASK}" in argv
    assert any("adding the ID task" in line for line in got["stderr"])


# ------------------------------------------------------------------------------------------- end to end
def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("LMMS_EMI_OPTIONS", "LMMS_EMI_DATA", "LMMS_EMI_ESTIMATOR", "LMMS_EMI_ID_TASK", "RANK"):
        env.pop(name, None)
    env.update(
        OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"
    )
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def demo(demo_natural: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The session's demo dataset and responses (read only) and this module's output root."""
    return {"root": tmp_path_factory.mktemp("plain"), **demo_natural}


def _model_args(demo: dict[str, Path]) -> list[str]:
    return ["--model", "lmms_emi_replay", "--model_args", f"responses={demo['responses']},model_name={MODEL}"]


def _plain_env(demo: dict[str, Path], **extra: str) -> dict[str, str]:
    return _env(
        LMMS_EMI_DATA=f"natural={demo['data']}",
        LMMS_EMI_OPTIONS=json.dumps(EMI_OPTIONS),
        LMMS_EMI_BUILTIN_TASKS="0",
        **extra,
    )


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, time.perf_counter() - started


def _results(out: Path) -> dict:
    files = sorted(out.rglob("*_results.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def _same(a: dict, b: dict, tasks: list[str], keys: tuple[str, ...] = KEYS) -> None:
    for task in tasks:
        for key in keys:
            assert a["results"][task].get(key) == b["results"][task].get(key), (task, key)


@pytest.fixture(scope="module")
def plain(demo: dict[str, Path]) -> dict:
    """``lmms-eval --tasks <visual subgroup> --metrics emi``, one process: the ID task is added."""
    out = demo["root"] / "plain1"
    cmd = [str(BIN / "lmms-eval"), *_model_args(demo), "--tasks", GROUP, "--metrics", "emi"]
    proc, seconds = _run([*cmd, "--output_path", str(out)], demo["root"], _plain_env(demo))
    return {"results": _results(out), "proc": proc, "seconds": seconds, "out": out}


@pytest.mark.slow
def test_plain_lmms_eval_merges_emi_into_its_results(plain: dict) -> None:
    results, proc = plain["results"], plain["proc"]
    assert f"lmms-emi: adding the ID task {ID_TASK}" in proc.stderr
    for task in TASKS:
        assert math.isfinite(results["results"][task]["emi,none"]), task
    for task in OOD_TASKS:
        entry = results["results"][task]
        assert entry["emid,none"] == pytest.approx(
            results["results"][ID_TASK]["emi,none"] - entry["emi,none"], abs=1e-9
        )
        assert entry["emid_bound,none"] >= entry["emid_bound_partial,none"] >= 0
    group = results["groups"][GROUP]
    assert group["emid_pairs"] == 3 and group["emid_id_task"] == ID_TASK
    assert -1.0 <= group["emid_pearson,none"] <= 1.0
    meta = results["lmms_emi"]
    assert meta["version"] and meta["encoders"]["text"]["name"].endswith("all-MiniLM-L6-v2")
    assert meta["estimator"]["source"] == "fitted" and meta["estimator"]["sha256"]
    files = sorted(plain["out"].rglob("*_results.json"))
    assert meta["results_file"] == str(files[0])  # the tracker's own file, captured
    for kind, path in meta["reports"]["emi_report_natural"].items():
        assert Path(path).is_file(), kind
    # lmms-eval's own printed table shows the final numbers (merged before it prints)
    emid = f"{results['groups'][GROUP]['emid_pearson,none']:.4f}"
    lines = proc.stdout.splitlines()
    assert any(GROUP in line and "emid_pearson " in line and emid in line for line in lines)


@pytest.mark.slow
def test_launcher_gives_the_same_numbers(plain: dict, demo: dict[str, Path]) -> None:
    out = demo["root"] / "launcher"
    cmd = [
        str(BIN / "lmms-emi"), "eval", *_model_args(demo), "--tasks", GROUP,
        "--data", f"natural={demo['data']}", "--encoders", "offline", "--estimator_steps", "60",
        "--bootstrap", "40", "--emi_cache", "off", "--emi_device", "cpu", "--no_builtin_tasks",
        "--output_path", str(out),
    ]  # fmt: skip
    _, seconds = _run(cmd, demo["root"], _env())
    launched = _results(out)
    _same(plain["results"], launched, TASKS, (*KEYS, "emid_bound_partial,none", "emi_n,none"))
    assert (
        launched["groups"][GROUP]["emid_pearson,none"]
        == plain["results"]["groups"][GROUP]["emid_pearson,none"]
    )
    print(f"wall time: plain lmms-eval {plain['seconds']:.1f} s, lmms-emi eval {seconds:.1f} s")


@pytest.mark.slow
def test_two_processes_give_the_same_numbers(plain: dict, demo: dict[str, Path]) -> None:
    out = demo["root"] / "plain2"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(_free_port()), "-m", "lmms_eval", *_model_args(demo),
        "--tasks", GROUP, "--metrics", "emi", "--output_path", str(out),
    ]  # fmt: skip
    proc, _ = _run(cmd, demo["root"], _plain_env(demo))
    two = _results(out)
    _same(plain["results"], two, TASKS)
    assert proc.stderr.count("lmms-emi: adding the ID task") == 1  # rank 0 only
    assert two["lmms_emi"]["world_size"] == 2 and two["lmms_emi"]["sample_ranks"] == [0, 1]
    assert plain["results"]["lmms_emi"]["world_size"] == 1
    assert proc.stdout.count("lmms-emi: 2 processes; samples from rank(s) 0, 1") == 1


@pytest.mark.slow
def test_frozen_estimator_task_alone_equals_task_in_group(plain: dict, demo: dict[str, Path]) -> None:
    """With a frozen estimator (the checkpoint the group run fitted), one OOD task run alone (its ID task is
    added) has the same EMI, interval, EMID and bound as inside the full group."""
    ckpt = Path(plain["results"]["lmms_emi"]["estimator"]["path"])
    out = demo["root"] / "alone"
    task = OOD_TASKS[1]
    cmd = [str(BIN / "lmms-eval"), *_model_args(demo), "--tasks", task, "--output_path", str(out)]
    _run(cmd, demo["root"], _plain_env(demo, LMMS_EMI_ESTIMATOR=str(ckpt)))
    alone = _results(out)
    assert set(alone["results"]) == {task, ID_TASK}
    _same(plain["results"], alone, [task, ID_TASK])
    est = alone["lmms_emi"]["estimator"]
    assert est["source"] == "checkpoint" and est["comparability"] == "global"


@pytest.mark.slow
def test_explicit_id_task_gives_emid_between_own_tasks(demo: dict[str, Path]) -> None:
    """``LMMS_EMI_ID_TASK`` (``--emi-id-task``): EMID and bounds between two of the user's own tasks; the
    named ID task is added to the run."""
    include = demo["root"] / "own_tasks"
    include.mkdir(exist_ok=True)
    for name, split in (("own_id", SPLITS[0]), ("own_ood", SPLITS[3])):
        (include / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: {demo['data']}\ndataset_kwargs:\n  load_from_disk: true\n"
            f"test_split: {split}\noutput_type: generate_until\n"
            "doc_to_visual: !function lmms_emi.harness.task_utils.doc_to_visual\n"
            'doc_to_text: "{{question}}"\ndoc_to_target: reference_answer\n'
            "generation_kwargs:\n  max_new_tokens: 16\n"
            "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        )
    out = demo["root"] / "own"
    cmd = [
        str(BIN / "lmms-eval"), "--model", "dummy", "--model_args", "response=a plain answer",
        "--tasks", "own_ood", "--metrics", "emi",
        "--include_path", str(include), "--output_path", str(out),
    ]  # fmt: skip
    proc, _ = _run(cmd, demo["root"], _plain_env(demo, LMMS_EMI_ID_TASK="own_id"))
    results = _results(out)
    assert "adding the ID task own_id" in proc.stderr
    ood = results["results"]["own_ood"]
    assert ood["emid,none"] == pytest.approx(results["results"]["own_id"]["emi,none"] - ood["emi,none"])
    assert math.isfinite(ood["emid_bound,none"])
    own_id = results["results"]["own_id"]
    assert ood["exact_match,none"] == 0.0 == own_id["exact_match,none"]  # the tasks' own metric, kept
    assert results["lmms_emi"]["benchmarks"]["own_id"]["id_task"] == "own_id"


@pytest.mark.slow
def test_run_without_lmms_emi_tasks_is_unchanged(demo: dict[str, Path]) -> None:
    """A run naming no lmms-emi task writes the same results JSON with the hook as with it off."""
    include = demo["root"] / "plain_task"
    include.mkdir(exist_ok=True)
    (include / "plain_vqa.yaml").write_text(
        f"task: plain_vqa\ndataset_path: {demo['data']}\ndataset_kwargs:\n  load_from_disk: true\n"
        f"test_split: {SPLITS[0]}\noutput_type: generate_until\n"
        'doc_to_visual: !function lmms_emi.harness.task_utils.doc_to_visual\ndoc_to_text: "{{question}}"\n'
        "doc_to_target: reference_answer\ngeneration_kwargs:\n  max_new_tokens: 16\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    runs = {}
    for hook in ("1", "0"):
        out = demo["root"] / f"nohook{hook}"
        cmd = [
            str(BIN / "lmms-eval"), "--model", "dummy", "--model_args", "response=a",
            "--tasks", "plain_vqa", "--include_path", str(include), "--output_path", str(out),
        ]  # fmt: skip
        _run(cmd, demo["root"], _env(LMMS_EMI_HOOK=hook))
        runs[hook] = _results(out)
    assert "lmms_emi" not in runs["1"]
    volatile = ("date", "start_time", "end_time", "total_evaluation_time_seconds")
    for hook, run in runs.items():
        for key in volatile:
            run.pop(key)
        text = json.dumps(run, sort_keys=True).replace(str(demo["root"] / f"nohook{hook}"), "OUT")
        runs[hook] = re.sub(r" at 0x[0-9a-f]+", "", text)  # function reprs of the task config
    assert runs["1"] == runs["0"]


@pytest.mark.slow
def test_plain_run_failing_after_evaluation_is_one_line_and_nonzero(demo: dict[str, Path]) -> None:
    """A task with one sample: lmms-eval's own results are saved, then one error line and exit status 1."""
    out = demo["root"] / "limit1"
    cmd = [str(BIN / "lmms-eval"), *_model_args(demo), "--tasks", OOD_TASKS[1], "--limit", "1"]
    proc = subprocess.run(
        [*cmd, "--output_path", str(out)], cwd=demo["root"], env=_plain_env(demo),
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("lmms-emi: error:")]
    assert len(lines) == 1 and "has 1 sample(s)" in lines[0] and "Traceback" not in proc.stderr
    assert len(list(out.rglob("*_results.json"))) == 1

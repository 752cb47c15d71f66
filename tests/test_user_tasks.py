"""``--metrics emi`` on the user's own lmms-eval tasks, the process count of a run, and responses that survive
a failing EMI step.

A user task folder is written the way users write them: a ``utils.py`` beside the YAML with one-argument
``doc_to_visual`` / ``doc_to_text`` / ``doc_to_target`` and a ``process_results`` of its own scoring
``exact_match``, ``!function utils.<name>`` references, local parquet data (built here from the session's
demo dataset) and the folder given with ``--include_path``. EMI is added beside the task's own metric, which
keeps its value. Fast checks run in process (the real ``TaskManager`` / ``ConfigurableTask`` of lmms-eval,
the patches of :mod:`lmms_emi.harness.patches`); end-to-end ones (``slow``) run plain ``lmms-eval`` with its
``dummy`` model or the replay model in a subprocess.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from helpers_runs import offline_env, results_json

from lmms_emi.harness import launch, patches, session, task_utils
from lmms_emi.harness.session import ForeignTask

BIN = Path(sys.executable).parent
SPLITS = ("llava_bench_coco_English", "llava_bench_in_the_wild_hard_English")  # ID, OOD of the demo data
EMI_OPTIONS = {"profile": "offline", "train_steps": 60, "bootstrap": 40, "cache_dir": "off", "device": "cpu"}

UTILS_PY = """\
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def doc_to_text_prompted(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def doc_to_target(doc):
    return doc["reference_answer"]


def process_results(doc, results):
    prediction = results[0].strip() if results else ""
    return {"exact_match": float(prediction == doc["reference_answer"].strip())}
"""


def _task_yaml(name: str, parquet: Path, *, kwargs: bool = False, visual: str = "utils.doc_to_visual") -> str:
    text = (
        f"task: {name}\n"
        "dataset_path: parquet\n"
        f"dataset_kwargs:\n  data_files:\n    test: {parquet}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        f"doc_to_visual: !function {visual}\n"
        f"doc_to_text: !function utils.doc_to_text{'_prompted' if kwargs else ''}\n"
        "doc_to_target: !function utils.doc_to_target\n"
        "process_results: !function utils.process_results\n"
        "generation_kwargs:\n  max_new_tokens: 16\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    if kwargs:  # lmms-eval then calls doc_to_text(doc, lmms_eval_specific_kwargs)
        text += 'lmms_eval_specific_kwargs:\n  default:\n    pre_prompt: "Q: "\n    post_prompt: ""\n'
    return text


def write_user_tasks(folder: Path, data: Path) -> dict[str, Any]:
    """``folder/{utils.py, my_vqa_id.yaml, my_vqa_ood.yaml, my_vqa_noimage.yaml}`` over parquet copies of two
    splits of ``data`` (a ``save_to_disk`` folder); returns the task names and the first references."""
    import datasets

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "utils.py").write_text(UTILS_PY)
    (folder / "noimage.py").write_text("def doc_to_visual(doc):\n    return [doc['picture']]\n")
    full = datasets.load_from_disk(str(data))
    refs = {}
    for name, split, kwargs in (("my_vqa_id", SPLITS[0], True), ("my_vqa_ood", SPLITS[1], False)):
        parquet = folder / f"{name}.parquet"
        full[split].to_parquet(str(parquet))
        (folder / f"{name}.yaml").write_text(_task_yaml(name, parquet, kwargs=kwargs))
        refs[name] = list(full[split]["reference_answer"])
    (folder / "my_vqa_noimage.yaml").write_text(
        _task_yaml("my_vqa_noimage", folder / "my_vqa_id.parquet", visual="noimage.doc_to_visual")
    )
    return {"refs": refs}


@pytest.fixture(scope="module")
def user(demo_natural: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("user_tasks")
    folder = root / "my_tasks"  # outside tasks/: given with --include_path
    return {"root": root, "folder": folder, **write_user_tasks(folder, demo_natural["data"]), **demo_natural}


@pytest.fixture
def active_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """An active run scoring the given foreign tasks (what ``prepare_run`` + ``activate`` set up)."""

    def make(*foreign: str) -> session.RunSession:
        plan = SimpleNamespace(foreign=list(foreign), folder=tmp_path)
        prep = SimpleNamespace(
            plan=plan,
            include_paths=[],
            config=SimpleNamespace(builtin_tasks=False),
            task_manager_built=lambda manager: None,
        )
        monkeypatch.setattr(patches, "_ACTIVE", prep)
        return session.reset()

    yield make
    session.reset()


# ------------------------------------------------------------------------------------------- fast checks
def test_wrappers_add_emi_beside_the_tasks_own_metrics(active_run) -> None:
    run = active_run("my_vqa")
    run.register_foreign(
        ForeignTask("my_vqa", lambda d: [d["image"]], lambda d: d["question"], lambda d: d["answer"])
    )

    def own_results(self: Any, doc: dict, results: list) -> dict:
        return {"exact_match": float(results[0] == doc["answer"])}

    def own_agg(self: Any) -> dict:
        return {"exact_match": "mean-fn"}

    def own_hib(self: Any) -> dict:
        return {"exact_match": True}

    wrap = {
        name: make(fn, inspect.signature(fn))
        for name, make, fn in (
            ("pr", patches._process_results, own_results),
            ("agg", patches._aggregation, own_agg),
            ("hib", patches._higher_is_better, own_hib),
        )
    }
    mine, other = (
        SimpleNamespace(config=SimpleNamespace(task="my_vqa")),
        SimpleNamespace(config=SimpleNamespace(task="other")),
    )
    doc = {"question": "q?", "answer": "yes", session.TASK_COLUMN: "my_vqa", session.DOC_ID_COLUMN: 3}
    out = wrap["pr"](mine, doc, ["yes"])
    assert out["exact_match"] == 1.0 and set(task_utils.METRIC_NAMES) <= set(out)
    assert out["emi"]["question"] == "q?" and out["emi"]["reference"] == "yes" and out["emi"]["doc_id"] == 3
    assert wrap["pr"](other, doc, ["no"]) == {"exact_match": 0.0}  # not a --metrics emi task: untouched
    agg = wrap["agg"](mine)
    assert agg["exact_match"] == "mean-fn" and agg["emi"] is task_utils.agg_emi
    assert wrap["agg"](other) == {"exact_match": "mean-fn"}
    assert wrap["hib"](mine)["exact_match"] is True and "emid" in wrap["hib"](mine)


def test_user_task_folder_in_lmms_eval(user: dict[str, Any], active_run) -> None:
    """The real TaskManager and ConfigurableTask: one-argument functions register (with and without
    ``lmms_eval_specific_kwargs``), the run's one-task YAML merges over the user's config, the task keeps
    its ``exact_match`` (metric, aggregation, per-document value) and gains the EMI metrics."""
    from lmms_eval.tasks import TaskManager, get_task_dict

    from lmms_emi.harness import foreign, overrides

    patches.install_patches()
    run = active_run("my_vqa_id", "my_vqa_ood")
    manager = TaskManager(include_path=str(user["folder"]), include_defaults=False)
    for name, prompt in (("my_vqa_id", "Q: why?"), ("my_vqa_ood", "why?")):
        foreign.register(run, manager, name)  # one-argument doc_to_text (ood), two with the kwargs (id)
        assert run.foreign_task(name).doc_to_text({"question": "why?"}) == prompt
    merged = overrides.foreign_task_yaml("my_vqa_id")
    assert "metric_list" not in merged and "process_results" not in merged
    config = {"task": "my_vqa_id", "process_docs": task_utils.process_docs__my_vqa_id}
    task = get_task_dict([config], manager)["my_vqa_id"]
    assert set(task.aggregation()) == {"exact_match", *task_utils.METRIC_NAMES}
    assert task.higher_is_better()["exact_match"] is True
    doc = next(iter(task.test_docs()))
    ref = user["refs"]["my_vqa_id"][0]
    out = task.process_results({k: v for k, v in doc.items() if k != "image"}, [ref])
    assert out["exact_match"] == 1.0 and out["emi"]["reference"] == ref and out["emi"]["doc_id"] == 0


def test_task_without_an_image_is_one_line_before_generation(user: dict[str, Any], active_run) -> None:
    from lmms_eval.tasks import TaskManager, get_task_dict

    from lmms_emi.errors import UsageError
    from lmms_emi.harness import foreign

    patches.install_patches()
    run = active_run("my_vqa_noimage")
    stops: list[Exception] = []

    def stop(error: Exception) -> None:  # the launcher's: one line, then SystemExit past lmms-eval's handlers
        stops.append(error)
        raise SystemExit(2)

    run.on_stop(stop)
    manager = TaskManager(include_path=str(user["folder"]), include_defaults=False)
    foreign.register(run, manager, "my_vqa_noimage")
    config = {"task": "my_vqa_noimage", "process_docs": task_utils.process_docs__my_vqa_noimage}
    with pytest.raises(SystemExit):
        get_task_dict([config], manager)
    (error,) = stops  # no retry of the dataset download
    message = str(error)
    assert isinstance(error, UsageError) and "\n" not in message
    assert "my_vqa_noimage" in message and "an image (doc_to_visual)" in message and "'picture'" in message
    assert "question" not in message.split("missing", 1)[1].split("(its columns")[0]


def test_requested_processes_and_warning() -> None:
    assert launch.requested_processes({"WORLD_SIZE": "2"}, []) == (2, "WORLD_SIZE")
    got = launch.requested_processes({}, ["accelerate", "launch", "--cpu", "--num_processes", "2", "-m", "x"])
    assert got == (2, "the launcher's --num_processes")
    assert launch.requested_processes({}, ["torchrun", "--nproc_per_node=4"]) == (
        4,
        "the launcher's --nproc_per_node",
    )
    assert launch.requested_processes({}, ["bash"]) is None
    info = {"world_size": 1, "requested_processes": 2, "requested_by": "WORLD_SIZE", "sample_ranks": [0]}
    (warning,) = launch.process_warnings(info)
    assert "2 processes were asked for" in warning and "1 ran" in warning
    assert launch.process_warnings({**info, "world_size": 2}) == []
    assert launch.processes_line({**info, "world_size": 2, "sample_ranks": [0, 1]}) == (
        "2 processes; samples from rank(s) 0, 1"
    )


def test_sample_logs_written_for_analyze(tmp_path: Path, active_run) -> None:
    """Without ``--log_samples`` the EMI records go to ``<id>_samples_<task>.jsonl`` beside the results JSON,
    as ``lmms-emi analyze`` reads them; a log lmms-eval wrote is left alone."""
    from lmms_emi.sources.run_folder import read_run

    run = active_run()
    items = [
        run.add_record("t1", {session.DOC_ID_COLUMN: i}, f"answer {i}", f"q {i}", f"ref {i}") for i in (1, 0)
    ]
    run.register_samples(items)
    results = tmp_path / "20260101_000000_results.json"
    results.write_text(json.dumps({"configs": {"t1": {}}}))
    (written,) = launch.write_sample_logs(run, results)
    assert written.name == "20260101_000000_samples_t1.jsonl"
    records = read_run(tmp_path).records["t1"]
    assert [(r["doc_id"], r["response"], r["reference"]) for r in records] == [
        (0, "answer 0", "ref 0"),
        (1, "answer 1", "ref 1"),
    ]
    assert launch.write_sample_logs(run, results) == []  # already there


# ------------------------------------------------------------------------------------------- end to end
def _env(**extra: str) -> dict[str, str]:
    return offline_env(EMI_OPTIONS, **extra)


def _results(out: Path) -> dict:
    return results_json(out)


@pytest.mark.slow
def test_user_tasks_keep_their_metric_and_get_emid(user: dict[str, Any]) -> None:
    """Plain lmms-eval, ``--metrics emi`` with ``LMMS_EMI_ID_TASK`` on two tasks of the user's folder: each
    keeps its own ``exact_match`` (its value: the share of references equal to the dummy's answer) beside
    EMI; the OOD task gets EMID and the bounds."""
    answer = user["refs"]["my_vqa_ood"][0]
    out = user["root"] / "own"
    cmd = [
        str(BIN / "lmms-eval"), "--model", "dummy", "--model_args", f"response={answer}",
        "--tasks", "my_vqa_ood", "--metrics", "emi",
        "--include_path", str(user["folder"]), "--output_path", str(out),
    ]  # fmt: skip
    proc = subprocess.run(
        cmd,
        cwd=user["root"],
        env=_env(LMMS_EMI_ID_TASK="my_vqa_id"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = _results(out)
    for name in ("my_vqa_id", "my_vqa_ood"):
        entry, refs = results["results"][name], user["refs"][name]
        expected = sum(r.strip() == answer.strip() for r in refs) / len(refs)
        assert entry["exact_match,none"] == pytest.approx(expected), name
        assert math.isfinite(entry["emi,none"]), name
    ood = results["results"]["my_vqa_ood"]
    assert ood["exact_match,none"] > 0
    assert ood["emid,none"] == pytest.approx(results["results"]["my_vqa_id"]["emi,none"] - ood["emi,none"])
    assert math.isfinite(ood["emid_bound,none"])
    assert results["lmms_emi"]["world_size"] == 1 and results["lmms_emi"]["sample_ranks"] == [0]
    assert "lmms-emi: 1 process; samples from rank(s) 0" in proc.stdout


@pytest.mark.slow
def test_user_task_without_an_image_stops_before_generation(user: dict[str, Any]) -> None:
    out = user["root"] / "noimage"
    cmd = [
        str(BIN / "lmms-eval"), "--model", "dummy", "--model_args", "response=a",
        "--tasks", "my_vqa_noimage", "--metrics", "emi",
        "--include_path", str(user["folder"]), "--output_path", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=user["root"], env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("lmms-emi: error:")]
    assert len(lines) == 1 and "my_vqa_noimage" in lines[0] and "an image" in lines[0], proc.stderr[-2000:]
    assert not list(out.rglob("*_results.json"))


FAIL_HOOK = """\
import os

if os.environ.get("LMMS_EMI_TEST_FAIL_EMI") == "1":
    from lmms_emi.harness import session as _session

    def _broken(*args, **kwargs):
        raise RuntimeError("injected estimator failure")

    _session.analyze_run = _broken
"""


@pytest.mark.slow
@pytest.mark.parametrize("log_samples", [False, True], ids=["no-log-samples", "log-samples"])
def test_failing_emi_step_loses_no_generation(user: dict[str, Any], log_samples: bool) -> None:
    """The EMI step fails after generation (an injected estimator failure): exit non-zero with one line
    saying how to finish; ``lmms-emi analyze <folder>`` then gives the numbers of an uninterrupted run."""
    hook = user["root"] / "fail_hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(FAIL_HOOK)
    group = "llavabench_shift_natural_visual"
    base = [
        str(BIN / "lmms-eval"), "--model", "lmms_emi_replay",
        "--model_args", f"responses={user['responses']},model_name=demo-model", "--tasks", group,
    ]  # fmt: skip
    extra = ["--log_samples"] if log_samples else []
    env = _env(LMMS_EMI_DATA=f"natural={user['data']}")

    def lmms_eval(out: Path, environ: dict[str, str]) -> subprocess.CompletedProcess:
        args = [*base, *extra, "--output_path", str(out)]
        return subprocess.run(args, cwd=user["root"], env=environ, capture_output=True, text=True)

    whole = user["root"] / f"whole_{log_samples}"
    proc = lmms_eval(whole, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    expected = _results(whole)

    broken = user["root"] / f"broken_{log_samples}"
    failing = {
        **env,
        "LMMS_EMI_TEST_FAIL_EMI": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), env.get("PYTHONPATH")])),
    }
    proc = lmms_eval(broken, failing)
    assert proc.returncode != 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("lmms-emi: error:")]
    assert len(lines) == 1 and "injected estimator failure" in lines[0], proc.stderr[-3000:]
    assert "lmms-emi analyze" in lines[0]
    folder = lines[0].split("lmms-emi analyze ", 1)[1].split("`", 1)[0]
    samples = sorted(Path(folder).glob("*_samples_*.jsonl"))
    assert len(samples) == len([t for t in expected["results"] if t.startswith("lbshift_")])
    for path in samples:  # lmms-eval's own later write was skipped: one line per document
        ids = [json.loads(line)["doc_id"] for line in path.read_text().splitlines()]
        assert len(ids) == len(set(ids))

    analyzed = user["root"] / f"analyzed_{log_samples}"
    proc = subprocess.run(
        [str(BIN / "lmms-emi"), "analyze", folder, "--output", str(analyzed)],
        cwd=user["root"], env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = _analysis_numbers(analyzed)
    compared = 0
    for task, entry in expected["results"].items():
        if not task.startswith("lbshift_"):
            continue
        for key in ("emi", "emid"):
            want = entry.get(f"{key},none")
            if want is None:
                continue
            assert got[task][key] == pytest.approx(want, abs=1e-9), (task, key)
            compared += 1
    assert compared >= 7  # EMI of the 4 tasks, EMID of the 3 OOD ones


def _analysis_numbers(folder: Path) -> dict[str, dict[str, float]]:
    """Per task EMI / EMID of ``lmms-emi analyze``'s JSON report under ``folder``."""
    files = sorted(folder.rglob("*.json"))
    assert files, folder
    out: dict[str, dict[str, float]] = {}
    for path in files:
        data = json.loads(path.read_text())
        for analysis in _analyses(data):
            for t in analysis.get("tasks", []):
                out.setdefault(t["task"], {}).update(
                    {k: t[k] for k in ("emi", "emid") if t.get(k) is not None}
                )
    return out


def _analyses(data: Any) -> list[dict]:
    if isinstance(data, dict):
        if isinstance(data.get("tasks"), list) and data["tasks"] and isinstance(data["tasks"][0], dict):
            return [data]
        return [a for v in data.values() for a in _analyses(v)]
    if isinstance(data, list):
        return [a for v in data for a in _analyses(v)]
    return []


@pytest.mark.slow
def test_failing_emi_step_in_the_launcher_says_how_to_finish(user: dict[str, Any]) -> None:
    """``lmms-emi eval``: the same injected failure exits non-zero with one line naming ``lmms-emi analyze``
    and the folder holding the responses."""
    hook = user["root"] / "fail_hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(FAIL_HOOK)
    out = user["root"] / "broken_launcher"
    env = _env()
    env.update(
        LMMS_EMI_TEST_FAIL_EMI="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(hook), env.get("PYTHONPATH")])),
    )
    cmd = [
        str(BIN / "lmms-emi"), "eval", "--tasks", "llavabench_shift_natural_visual",
        "--model", "lmms_emi_replay", "--model_args", f"responses={user['responses']},model_name=demo-model",
        "--data", f"natural={user['data']}", "--output_path", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=user["root"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if "error:" in x and x.startswith("lmms-emi")]
    assert len(lines) == 1 and "injected estimator failure" in lines[0], proc.stderr[-3000:]
    folder = lines[0].split("lmms-emi analyze ", 1)[1].split("`", 1)[0]
    assert len(list(Path(folder).glob("*_samples_lbshift_*.jsonl"))) == 4

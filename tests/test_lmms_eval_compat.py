"""Contract tests of the lmms-eval boundary (:mod:`lmms_emi.lmms_eval_compat`): one test per touchpoint,
each failing with the touchpoint's name and the installed lmms-eval version."""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

from lmms_emi import lmms_eval_compat as compat
from lmms_emi import paths
from lmms_emi import scenarios as sc

VERSION = compat.installed_version()
CHECKED: set[str] = set()


@contextmanager
def contract(name: str) -> Iterator[None]:
    """Run a contract check of touchpoint ``name``; a failure names it and the lmms-eval version."""
    assert name in compat.TOUCHPOINTS, f"{name!r} is not a listed touchpoint"
    CHECKED.add(name)
    try:
        yield
    except Exception as exc:  # an AssertionError too: the message says which touchpoint moved
        pytest.fail(f"lmms-eval {VERSION}: touchpoint {name!r} broke: {type(exc).__name__}: {exc}")


def _parameters(fn: object) -> list[str]:
    return list(inspect.signature(fn).parameters)


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory: pytest.TempPathFactory) -> object:
    folder = tmp_path_factory.mktemp("user_tasks")
    (folder / "compat_probe.yaml").write_text(
        "task: compat_probe\ndataset_path: json\ntest_split: train\noutput_type: generate_until\n"
        "doc_to_text: '{{question}} (answer briefly)'\ndoc_to_target: answer\n",
        encoding="utf-8",
    )
    (folder / "compat_group.yaml").write_text("group: compat_group\ntask: [compat_probe]\n", encoding="utf-8")
    return compat.task_manager_class()(
        include_defaults=False, include_path=[str(folder), str(paths.tasks_dir())]
    )


def test_the_installed_version_is_the_tested_minor() -> None:
    assert compat.is_tested(), (
        f"lmms-eval {VERSION} installed; the touchpoints are tested on {compat.TESTED_MINOR}"
    )
    assert compat.is_tested("0.7.9") and not compat.is_tested("0.8.0") and not compat.is_tested("unknown")


def test_task_manager_init(task_manager: object) -> None:
    with contract("TaskManager.__init__"):
        assert {"include_path", "include_defaults"} <= set(_parameters(compat.task_manager_class().__init__))
        assert "compat_probe" in task_manager.all_tasks
        assert sc.id_scenario("synthetic").task in task_manager.all_tasks


def test_task_index_and_matching(task_manager: object) -> None:
    with contract("TaskManager.task_index/match_tasks"):
        assert compat.task_kind(task_manager, "compat_probe") == "task"
        assert compat.task_kind(task_manager, "compat_group") == "group"
        assert compat.task_kind(task_manager, "no_such_task") is None
        names = ["compat_probe", "compat_gr*", "no_such_task", "lbshift_syn_*"]
        assert compat.unknown_tasks(task_manager, names) == ["no_such_task"]


def test_task_config_resolves_includes_and_functions(task_manager: object) -> None:
    with contract("utils.load_yaml_config"):
        probe = compat.task_config(task_manager, "compat_probe")
        assert probe["doc_to_target"] == "answer" and probe["test_split"] == "train"
        plugin = compat.task_config(task_manager, sc.id_scenario("natural").task)
        assert callable(plugin["process_docs"]) and plugin["dataset_path"] == sc.NATURAL_DATASET


def test_render_template() -> None:
    with contract("utils.apply_template"):
        assert compat.render_template("{{question}} (answer briefly)", {"question": "Why?"}) == (
            "Why? (answer briefly)"
        )


def test_task_methods_wrapped_for_metrics_emi() -> None:
    with contract("ConfigurableTask.process_results/aggregation/higher_is_better/download"):
        task = compat.configurable_task_class()
        assert _parameters(task.process_results)[:3] == ["self", "doc", "results"]
        assert _parameters(task.aggregation) == ["self"] and _parameters(task.higher_is_better) == ["self"]
        assert _parameters(task.download)[0] == "self"


def test_a_local_copy_is_read_once_per_run_and_each_task_gets_its_own_dict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside a run, the tasks of one saved DatasetDict read it once (lmms-eval's download reads the whole
    folder for each task); each task still holds its own dict with its own processed split. Without a run
    every task reads it, as lmms-eval does."""
    import datasets
    from PIL import Image

    from lmms_emi.harness import overrides, patches

    splits = ["llava_bench_coco", "llava_bench_coco_sr_4"]
    text = datasets.Value("string")
    tiny = datasets.Dataset.from_dict(
        {
            "image": [Image.new("RGB", (8, 8))] * 3,
            "question": ["q0", "q1", "q2"],
            "reference_answer": list("abc"),
        },
        features=datasets.Features({"image": datasets.Image(), "question": text, "reference_answer": text}),
    )
    datasets.DatasetDict(dict.fromkeys(splits, tiny)).save_to_disk(str(tmp_path / "d"))
    include = overrides.build_include_dir(
        tmp_path / "run", overrides.parse_data_args([str(tmp_path / "d")]), paths.tasks_dir()
    )
    reads: list[str] = []
    real = datasets.load_from_disk

    def counted(*args: object, **kwargs: object) -> object:
        reads.append(str(kwargs.get("dataset_path", args[0] if args else "")))
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_from_disk", counted)
    names = [f"lbshift_syn_{split}" for split in splits]
    run = SimpleNamespace(
        include_paths=[], config=SimpleNamespace(builtin_tasks=False), task_manager_built=lambda manager: None
    )
    patches.install_patches()
    with contract("datasets.load_from_disk in ConfigurableTask.download"):
        monkeypatch.setattr(patches, "_ACTIVE", run)
        manager = compat.task_manager_class()(include_defaults=False, include_path=str(include))
        tasks = manager.load_task_or_group(names)
        assert len(reads) == 1 and Path(reads[0]).resolve() == (tmp_path / "d").resolve()
        first, second = (tasks[name] for name in names)
        assert first.dataset is not second.dataset  # each task's own dict
        assert first.test_docs()[1]["question"] == second.test_docs()[1]["question"] == "q1"
        assert datasets.load_from_disk is counted  # restored after each task's download
        monkeypatch.setattr(patches, "_ACTIVE", None)
        manager.load_task_or_group(names)
        assert len(reads) == 3
    with compat.loads_from_disk_shared({}):
        datasets.load_from_disk(str(tmp_path / "d"), keep_in_memory=False)  # other arguments: not shared
        datasets.load_from_disk(str(tmp_path / "d"), keep_in_memory=False)
    assert len(reads) == 5


def test_tracker_writes_the_results_file_where_compat_says(tmp_path: Path) -> None:
    tracker_class = compat.evaluation_tracker_class()
    with contract("EvaluationTracker.save_results_aggregated"):
        assert _parameters(tracker_class.save_results_aggregated) == [
            "self",
            "results",
            "samples",
            "datetime_str",
        ]
    with contract("EvaluationTracker.save_results_samples"):
        assert {"task_name", "samples"} <= set(_parameters(tracker_class.save_results_samples))
    with contract("EvaluationTracker.output_path/general_config_tracker/date_id"):
        tracker = tracker_class(output_path=str(tmp_path))
        tracker.general_config_tracker.model_name_sanitized = "probe_model"
        assert compat.tracker_date_id(tracker) is None
        tracker.save_results_aggregated(
            results={"results": {}}, samples={}, datetime_str="2026-12-06T08:00:00"
        )
        folder = compat.tracker_results_folder(tracker)
        assert folder == tmp_path / "probe_model"
        written = folder / f"{compat.tracker_date_id(tracker)}_results.json"
        assert json.loads(written.read_text(encoding="utf-8"))["results"] == {}
        assert compat.tracker_results_folder(tracker_class(output_path=None)) is None


def test_cli_hands_each_evaluation_to_cli_evaluate_single() -> None:
    seen: list[object] = []

    class Stop(BaseException):
        pass

    def around(evaluate: object, namespace: object) -> None:
        seen.append((evaluate, namespace))
        raise Stop  # no evaluation: the contract is the hand-over

    saved = list(sys.argv)
    with contract("__main__.cli_evaluate/cli_evaluate_single"):
        with pytest.raises(Stop):
            compat.call_cli(["--model", "dummy", "--tasks", "compat_probe", "--limit", "1"], around)
        ((evaluate, namespace),) = seen
        assert callable(evaluate) and namespace.tasks == "compat_probe" and namespace.model == "dummy"
        assert sys.argv == saved


# While lmms_eval.__main__ is imported, the model entry points run (the hook's moment): a fresh process
# spies on the entry point and records whether compat saw the CLI importing.
_ENTRY_POINT_PROBE = """
import json
from lmms_emi import lmms_eval_compat
from lmms_emi.harness import hook
seen = []
hook.model_manifests = lambda: seen.append(lmms_eval_compat.cli_is_importing()) or []
import lmms_eval.__main__
print("SEEN" + json.dumps(seen + [lmms_eval_compat.cli_is_importing()]))
"""


@pytest.mark.slow  # a fresh process imports lmms-eval's CLI (~10 s)
def test_entry_points_load_while_the_cli_imports() -> None:
    with contract("__main__ import order"):
        proc = subprocess.run(
            [sys.executable, "-c", _ENTRY_POINT_PROBE], capture_output=True, text=True, timeout=300
        )
        line = next((x for x in proc.stdout.splitlines() if x.startswith("SEEN")), None)
        assert line is not None, proc.stderr[-1500:]
        assert json.loads(line[4:]) == [True, False]  # once, during the import; not after it


def test_model_registry_and_manifests() -> None:
    from lmms_emi.harness.replay import REPLAY_MODEL, model_manifests

    with contract("models.MODEL_REGISTRY_V2/registry_v2.ModelManifest"):
        compat.register_model_manifests(model_manifests())
        assert REPLAY_MODEL in compat.registered_model_names()
        manifest = compat.model_manifest("probe", "lmms_emi.harness.replay_model.ReplayModel", ["probe2"])
        assert manifest.model_id == "probe" and tuple(manifest.aliases) == ("probe2",)


def test_model_api_and_request_layout() -> None:
    lmms, instance = compat.model_api()
    with contract("api.model.lmms/api.instance.Instance"):
        args = ("context", {"max_new_tokens": 8}, print, 3, "task_a", "test")
        request = instance(
            request_type="generate_until",
            arguments=args,
            idx=0,
            metadata={"task": "task_a", "doc_id": 3, "repeats": 1},
        )
        assert request.args == args and request.doc_id == 3 and request.task_name == "task_a"
        assert {"generate_until", "loglikelihood"} <= set(vars(lmms))


def test_judge_protocol() -> None:
    with contract("llm_judge (ServerConfig, build_sampling_kwargs, ResponseParser)"):
        sampling = compat.judge_sampling_kwargs("gpt-4o-mini", 64)
        assert isinstance(sampling, dict) and 64 in sampling.values()
        assert compat.parse_comparative_scores("8 6\nbecause") == (8.0, 6.0)
        assert compat.parse_comparative_scores("no scores here")[0] == -1


def test_judge_rule_file() -> None:
    from lmms_emi.judge import prompt

    with contract("tasks/llava-in-the-wild/rule.json"):
        path = compat.judge_rule_file()
        assert path is not None
        rule = json.loads(path.read_text(encoding="utf-8"))[prompt._RULE]
        assert {"role", "prompt"} <= set(rule)


@pytest.mark.slow
def test_results_json_layout(tmp_path: Path) -> None:
    """A real run of lmms-eval's CLI (dummy model, a two-row local task) writes the sections lmms-emi reads
    and writes: results / groups / group_subtasks / configs, metrics as ``<metric>,none``."""
    data = tmp_path / "rows.json"
    data.write_text(json.dumps([{"question": "q1", "answer": "a"}, {"question": "q2", "answer": "b"}]))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "compat_run.yaml").write_text(
        "task: compat_run\ndataset_path: json\ndataset_kwargs:\n  data_files: " + str(data) + "\n"
        "test_split: train\noutput_type: generate_until\ndoc_to_text: question\ndoc_to_target: answer\n"
        "doc_to_visual: !function probe_utils.no_images\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n",
        encoding="utf-8",
    )
    (tmp_path / "tasks" / "probe_utils.py").write_text("def no_images(doc):\n    return []\n")
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmms_eval",
            "--model",
            "dummy",
            "--tasks",
            "compat_run",
            "--include_path",
            str(tmp_path / "tasks"),
            "--output_path",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "LMMS_EMI_HOOK": "0"},
    )
    with contract("results JSON layout"):
        files = list(out.rglob("*_results.json"))
        assert len(files) == 1, proc.stderr[-2000:]
        data = json.loads(files[0].read_text(encoding="utf-8"))
        assert {"results", "configs", "group_subtasks"} <= set(data)
        assert "exact_match,none" in data["results"]["compat_run"]
        assert data["configs"]["compat_run"]["task"] == "compat_run"


def test_every_touchpoint_has_a_contract_test() -> None:
    names = {
        node.args[0].value
        for node in ast.walk(ast.parse(Path(__file__).read_text(encoding="utf-8")))
        if isinstance(node, ast.Call)
        and getattr(node.func, "id", None) == "contract"
        and node.args
        and isinstance(node.args[0], ast.Constant)
    }
    assert names == set(compat.TOUCHPOINTS)


def test_nothing_else_imports_lmms_eval() -> None:
    package = Path(compat.__file__).parent
    offenders = []
    for path in sorted(package.rglob("*.py")):
        if path == Path(compat.__file__):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            modules = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(m == "lmms_eval" or m.startswith("lmms_eval.") for m in modules):
                offenders.append(f"{path.relative_to(package)}:{node.lineno}")
    assert offenders == []

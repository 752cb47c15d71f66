"""Unit tests of the lmms-eval glue (``lmms_emi.harness``): task YAMLs, per-sample records, aggregation
helpers, task planning, dataset overrides, the replay model and the results post-processing. Fast: no
evaluation run (those are in ``test_e2e_harness.py``)."""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers_analysis import small_club

from lmms_emi import paths
from lmms_emi import scenarios as sc
from lmms_emi.cli import main
from lmms_emi.config import EMIConfig
from lmms_emi.emi import TaskEmbeddings
from lmms_emi.errors import EXIT_USAGE, DataPathError, UsageError
from lmms_emi.estimators.club import CLUB
from lmms_emi.harness import argv as lmms_argv
from lmms_emi.harness import launch, make_tasks, overrides, session, task_utils
from lmms_emi.metrics import TASK_METRICS
from lmms_emi.pipeline import AnalysisSettings, EstimatorInfo, RunAnalysis, ShiftAnalysis, analyze_shift
from lmms_emi.sources.datasets import local_dataset

datasets = pytest.importorskip("datasets")


@pytest.fixture(autouse=True)
def _fresh_session():
    session.reset(EMIConfig())
    yield
    session.reset()


# ------------------------------------------------------------------------------------------- task YAMLs
def test_task_yamls_match_generator(tmp_path: Path) -> None:
    """The committed YAMLs are exactly what make_tasks writes (63 tasks, 8 groups, 3 shared files)."""
    written = make_tasks.write_tasks(tmp_path)
    committed_root = paths.tasks_dir() / make_tasks.TASKS_SUBDIR
    generated_root = tmp_path / make_tasks.TASKS_SUBDIR
    rel = sorted(p.relative_to(generated_root) for p in written)
    on_disk = sorted(p.relative_to(committed_root) for p in committed_root.rglob("*.yaml"))
    assert rel == on_disk
    for r in rel:
        assert (committed_root / r).read_text() == (generated_root / r).read_text(), r
    assert len(rel) == 35 + 28 + 8 + 3


def test_task_index_and_configs() -> None:
    from lmms_emi.lmms_eval_compat import task_config, task_manager_class

    tm = task_manager_class()(include_defaults=False, include_path=str(paths.tasks_dir()))
    expected_tasks = {s.task for b in sc.TASK_PREFIX for s in sc.scenarios(b)}
    assert set(tm.all_subtasks) == expected_tasks
    assert set(tm.all_groups) == set(make_tasks.all_group_names())
    cfg = task_config(tm, "lbshift_nat_llava_bench_in_the_wild_hard_Korean")
    assert cfg["dataset_path"] == sc.NATURAL_DATASET
    assert cfg["test_split"] == "llava_bench_in_the_wild_hard_Korean"
    assert cfg["generation_kwargs"]["do_sample"] is False and cfg["generation_kwargs"]["max_new_tokens"] > 0
    assert cfg["process_docs"].__name__ == "process_docs__lbshift_nat_llava_bench_in_the_wild_hard_Korean"
    assert [m["metric"] for m in cfg["metric_list"]] == [m.name for m in TASK_METRICS]
    group = task_config(tm, "llavabench_shift_synthetic")
    assert group["task"][0] == sc.id_scenario("synthetic").task
    sub = task_config(tm, "llavabench_shift_synthetic_joint")
    assert len(sub["task"]) == 24 and all(sc.scenario_for_task(t).shift_kind == "joint" for t in sub["task"])


def test_names_do_not_collide_with_builtin_tasks() -> None:
    import lmms_eval

    root = Path(lmms_eval.__file__).parent / "tasks"
    ours = set(make_tasks.plugin_names())
    for path in root.rglob("*.yaml"):
        text = path.read_text(errors="ignore")
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("task", "group") and value.strip().strip("\"'") in ours:
                pytest.fail(f"{path} defines {value.strip()}")


# ------------------------------------------------------------------------------------------- per sample
def _docs(task: str, n: int) -> list[dict]:
    return [
        {
            session.TASK_COLUMN: task,
            session.DOC_ID_COLUMN: i,
            "question_id": 100 + i,
            "question": f"question {i}",
            "reference_answer": f"reference {i}",
        }
        for i in range(n)
    ]


def test_process_results_thread_safe_and_picklable() -> None:
    docs = _docs("lbshift_syn_llava_bench_coco", 200)
    serial = [task_utils.process_results(d, [f"  answer {d['emi_doc_id']}"]) for d in docs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(
            pool.map(lambda d: task_utils.process_results(d, [f"  answer {d['emi_doc_id']}"]), docs)
        )
    assert threaded == serial
    first = pickle.loads(pickle.dumps(serial[7]))
    assert set(first) == {m.name for m in TASK_METRICS}
    assert first["emi"] == {
        "task": "lbshift_syn_llava_bench_coco",
        "doc_id": 7,
        "question_id": 107,
        "question": "question 7",
        "response": "  answer 7",
        "reference": "reference 7",
        "rank": 0,
    }
    assert first["emid"] == {"task": "lbshift_syn_llava_bench_coco", "doc_id": 7}


def test_process_docs_binds_task_and_row_numbers() -> None:
    fn = task_utils.process_docs__lbshift_syn_llava_bench_coco_sr_7
    assert fn is task_utils.process_docs__lbshift_syn_llava_bench_coco_sr_7  # one object per task
    ds = datasets.Dataset.from_dict({"question": ["a", "b", "c"], "reference_answer": ["x", "y", "z"]})
    out = fn(ds)
    assert out[DOC := session.DOC_ID_COLUMN] == [0, 1, 2] and DOC in out.column_names
    assert out[session.TASK_COLUMN] == ["lbshift_syn_llava_bench_coco_sr_7"] * 3
    with pytest.raises(AttributeError):
        task_utils.not_a_function  # noqa: B018


def test_samples_sorted_by_doc_id_from_rank_major_order() -> None:
    task = "lbshift_syn_llava_bench_coco"
    records = [task_utils.process_results(d, ["r"])["emi"] for d in _docs(task, 9)]
    rank_major = records[0::2] + records[1::2]  # what gather_object gives with 2 ranks
    assert task_utils.agg_emi(rank_major) is None  # no estimator without training: filled in after the run
    assert [r["doc_id"] for r in session.current().records(task)] == list(range(9))
    assert task_utils.agg_emi_n(rank_major) == 9
    assert session.current().tasks() == [task]


def test_group_functions() -> None:
    assert task_utils.group_mean([1.0, None, float("nan"), 3.0], [5, 5, 5, 5]) == 2.0
    assert task_utils.group_mean([1.0, 4.0], [1, 3], True) == pytest.approx(13 / 4)
    assert task_utils.group_mean([None], [3]) is None
    assert task_utils.group_sum([3, 4], [3, 4]) == 7
    assert task_utils.group_none([1.0], [1]) is None


# ------------------------------------------------------------------------------------------- planning
def test_plan_adds_id_task_for_subgroups_only() -> None:
    plan = launch.select_tasks("llavabench_shift_natural_visual")
    assert plan.tasks == ["llavabench_shift_natural_visual", "lbshift_nat_llava_bench_coco_English"]
    assert plan.added == ["lbshift_nat_llava_bench_coco_English"]
    assert len(plan.leaves) == 4
    assert launch.select_tasks("llavabench_shift_synthetic").added == []
    plan = launch.select_tasks("lbshift_syn_llava_bench_coco,lbshift_syn_llava_bench_coco_frost_1,mme")
    assert plan.added == [] and plan.foreign == ["mme"]
    wild = launch.select_tasks("lbshift_syn_llava_bench_coco_frost_5*")
    assert set(wild.tasks) == {
        "lbshift_syn_llava_bench_coco_frost_5",
        "lbshift_syn_llava_bench_coco_frost_5_sr_4",
        "lbshift_syn_llava_bench_coco_frost_5_sr_7",
        "lbshift_syn_llava_bench_coco_frost_5_KeyboardAug_1",
        "lbshift_syn_llava_bench_coco_frost_5_KeyboardAug_3",
        "lbshift_syn_llava_bench_coco",
    }


def test_plan_unknown_plugin_task_suggests() -> None:
    with pytest.raises(UsageError, match="did you mean lbshift_syn_llava_bench_coco_frost_3"):
        launch.select_tasks("lbshift_syn_llava_bench_coco_frost3")


def test_set_arg() -> None:
    argv = ["--tasks", "a", "--include_path=x", "--model", "m"]
    assert lmms_argv.set_arg(argv, "--include_path", None) == ["--tasks", "a", "--model", "m"]
    assert lmms_argv.set_arg(argv, "--tasks", "b") == ["--include_path=x", "--model", "m", "--tasks", "b"]


def test_describe_error_messages() -> None:
    try:
        try:
            raise UsageError("task 'x' has no images")
        except UsageError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as exc:
        assert launch.describe_error(exc) == "task 'x' has no images"  # the user's error, found in the chain
    assert launch.describe_error(ValueError("task 'x' has 1 sample(s)")) == "task 'x' has 1 sample(s)"
    assert launch.describe_error(KeyError("k")) == "KeyError: 'k'"


# ------------------------------------------------------------------------------------------- datasets
def _tiny_split(n: int = 3) -> datasets.Dataset:
    from PIL import Image

    return datasets.Dataset.from_dict(
        {
            "image": [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(n)],
            "question": [f"q{i}" for i in range(n)],
            "reference_answer": [f"a{i}" for i in range(n)],
        },
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "question": datasets.Value("string"),
                "reference_answer": datasets.Value("string"),
            }
        ),
    )


def test_local_dataset_forms(tmp_path: Path) -> None:
    splits = ["llava_bench_coco_English", "llava_bench_coco_German"]
    saved = tmp_path / "saved"
    datasets.DatasetDict({s: _tiny_split() for s in splits}).save_to_disk(str(saved))
    local = local_dataset(saved)
    assert (local.path, local.splits) == (str(saved.resolve()), splits)
    assert local.kwargs == {"load_from_disk": True}
    pq = tmp_path / "pq" / "data"
    pq.mkdir(parents=True)
    for s in splits:
        _tiny_split().to_parquet(str(pq / f"{s}-00000-of-00001.parquet"))
    local = local_dataset(tmp_path / "pq")
    assert local.path == "parquet" and sorted(local.splits) == sorted(splits)
    assert local.kwargs["data_files"]["llava_bench_coco_German"][0].endswith(
        "llava_bench_coco_German-00000-of-00001.parquet"
    )
    assert set(overrides.parse_data_args([str(saved)])) == {"natural"}
    assert set(overrides.parse_data_args([f"synthetic={saved}"])) == {"synthetic"}
    with pytest.raises(DataPathError, match="no such file"):
        local_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataPathError, match="not a local copy"):
        local_dataset(tmp_path / "empty")


@pytest.mark.parametrize("form", ["saved", "parquet"])
def test_override_dir_loads_local_copy(tmp_path: Path, form: str) -> None:
    """The rewritten task tree makes lmms-eval load the split from disk, with the row/task columns added."""
    from lmms_eval.tasks import TaskManager

    split = "llava_bench_coco_sr_4"
    if form == "saved":
        datasets.DatasetDict({split: _tiny_split(4), "llava_bench_coco": _tiny_split(4)}).save_to_disk(
            str(tmp_path / "d")
        )
    else:
        (tmp_path / "d").mkdir()
        _tiny_split(4).to_parquet(str(tmp_path / "d" / f"{split}.parquet"))
    data = overrides.parse_data_args([str(tmp_path / "d")])
    include = overrides.build_include_dir(tmp_path / "run", data, paths.tasks_dir())
    assert (paths.tasks_dir() / "llavabench_shift" / "synthetic" / "_dataset.yaml").read_text() != (
        include / "llavabench_shift" / "synthetic" / "_dataset.yaml"
    ).read_text()
    tm = TaskManager(include_defaults=False, include_path=str(include))
    task = tm.load_task_or_group(["lbshift_syn_llava_bench_coco_sr_4"])["lbshift_syn_llava_bench_coco_sr_4"]
    docs = task.test_docs()
    assert len(docs) == 4 and docs[2][session.DOC_ID_COLUMN] == 2
    assert task.doc_to_text(docs[1]) == "q1"
    assert task_utils.doc_to_visual(task.dataset[split][0])[0].size == (8, 8)
    assert len(session.current().samples([])) == 0  # nothing aggregated yet, but the split is registered
    record = task_utils.process_results(docs[2], ["an answer"])["emi"]
    session.current().register_samples([record])
    (sample,) = session.current().samples()["lbshift_syn_llava_bench_coco_sr_4"]
    assert sample.doc_id == 2 and sample.image["bytes"] is not None  # the image read back from the split
    with pytest.raises(UsageError, match="split llava_bench_coco_frost_1 is not in the local copy"):
        launch.check_local_splits(launch.select_tasks("lbshift_syn_llava_bench_coco_frost_1"), data)


# ------------------------------------------------------------------------------------------- replay model
def _request(doc_id: int, task: str, split: str) -> SimpleNamespace:
    return SimpleNamespace(args=("prompt", {}, None, doc_id, task, split))


def test_replay_model_answers_reference_files(reference_responses: Path) -> None:
    from lmms_emi.harness.replay_model import ReplayError, ReplayModel

    lm = ReplayModel(responses=str(reference_responses), model_name="llava-v1.5-13b")
    lines = [json.loads(x) for x in (reference_responses / "llava_bench_coco_llava-v1.5-13b.jsonl").open()]
    task, split = "lbshift_syn_llava_bench_coco", "llava_bench_coco"
    ids = [r["question_id"] for r in lines]
    order = list(range(len(ids)))
    random.Random(0).shuffle(order)  # dataset rows in another order than the file: matched by question_id
    lm.task_dict = {task: {split: datasets.Dataset.from_dict({"question_id": [ids[i] for i in order]})}}
    got = lm.generate_until([_request(k, task, split) for k in (0, 5, 89)])
    assert got == [lines[order[k]]["text"] for k in (0, 5, 89)]

    # in-the-wild easy: rows of the combined file at the positions listed in lbwild_split_idx.json
    wild_task = "lbshift_nat_llava_bench_in_the_wild_easy_English"
    wild_split = "llava_bench_in_the_wild_easy_English"
    easy = json.loads((reference_responses / "lbwild_split_idx.json").read_text())["easy_ood_fst_cd_new"]
    combined = [
        json.loads(x)
        for x in (reference_responses / "llava_bench_in_the_wild_English_llava-v1.5-13b.jsonl").open()
    ]
    lm.task_dict[wild_task] = {wild_split: datasets.Dataset.from_dict({"row": list(range(len(easy)))})}
    assert lm.generate_until([_request(3, wild_task, wild_split)]) == [combined[easy[3]]["text"]]

    lm.task_dict[task] = {split: datasets.Dataset.from_dict({"question_id": [*ids, 12345]})}
    lm._answers.clear()
    with pytest.raises(ReplayError, match=r"lbshift_syn_llava_bench_coco.*12345"):
        lm.generate_until([_request(0, task, split)])


def test_replay_model_registered_through_entry_point() -> None:
    from importlib.metadata import entry_points

    from lmms_eval.models import get_model

    eps = [ep for ep in entry_points(group="lmms_eval.models") if ep.value.startswith("lmms_emi.")]
    assert eps, "lmms-emi is not installed (pip install -e .)"
    manifests = eps[0].load()()
    assert [m.model_id for m in manifests] == ["emi_replay"]
    from lmms_emi.harness.replay_model import ReplayModel

    assert get_model("emi_replay") is ReplayModel


# ------------------------------------------------------------------------------------------- results
def _run_of(result: ShiftAnalysis, club: CLUB) -> RunAnalysis:
    info = EstimatorInfo("checkpoint", "x.safetensors", "global")
    return RunAnalysis({"synthetic": result}, {}, info, club, {}, {}, AnalysisSettings(n_resamples=20))


def _fake_run() -> RunAnalysis:
    gen = torch.Generator().manual_seed(0)
    scen = sc.scenarios("synthetic")
    tasks = [scen[0].task, scen[1].task, scen[5].task, scen[6].task]
    emb = {
        t: TaskEmbeddings(*(torch.randn(12, 8, generator=gen) + 0.1 * i for _ in range(4)))
        for i, t in enumerate(tasks)
    }
    club = small_club(8)
    return _run_of(analyze_shift(emb, tasks[0], club, n_resamples=20), club)


def test_update_results_writes_task_and_group_entries(tmp_path: Path) -> None:
    from lmms_emi.harness.results import rewrite_results_file

    run = _fake_run()
    tasks = [t.task for t in run.benchmarks["synthetic"].tasks]
    results = {
        "results": {t: {"alias": t, "emi,none": None} for t in tasks} | {"grp": {"alias": "grp"}},
        "groups": {"grp": {"alias": "grp"}},
        "group_subtasks": {"grp": tasks[1:]} | {t: [] for t in tasks},
    }
    path = tmp_path / "r_results.json"
    path.write_text(json.dumps(results))
    out = rewrite_results_file(path, run, extra={"x": 1}, reports={})
    assert json.loads(path.read_text()) == json.loads(json.dumps(out))
    id_entry, ood = out["results"][tasks[0]], out["results"][tasks[2]]
    assert (
        id_entry["emid,none"] is None and math.isfinite(id_entry["emi,none"]) and id_entry["emi_n,none"] == 12
    )
    tr = run.benchmarks["synthetic"].task(tasks[2])
    assert ood["emid,none"] == pytest.approx(tr.emid) and ood["emid_bound,none"] == pytest.approx(tr.bound)
    assert ood["emid_bound_partial,none"] == pytest.approx(tr.partial_bound)
    assert ood["emi_ci_low,none"] <= ood["emi_ci_high,none"]
    group = out["groups"]["grp"]
    assert group["emid_pairs"] == 3 and set(group["emid_by_task"]) == set(tasks[1:])
    assert group["emid_pearson,none"] == pytest.approx(run.benchmarks["synthetic"].correlation.pearson_r)
    assert out["results"]["grp"]["emid_pearson,none"] == group["emid_pearson,none"]
    assert out["lmms_emi"]["x"] == 1 and "synthetic" in out["lmms_emi"]["benchmarks"]


def test_run_config_reaches_every_process_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    """The planning process exports the resolved config; a worker's session reads exactly it back, even
    where the worker's own environment holds other LMMS_EMI_* values (flags won in the planner)."""
    config = EMIConfig(
        encoders="offline", estimator="/x.pt", entropy_scale=2.0, bootstrap=7, embedding_cache="off"
    )
    with session.exported(config):
        monkeypatch.setenv("LMMS_EMI_ENCODERS", "paper")
        assert session.reset().config == config
    assert session.RUN_CONFIG_VAR not in os.environ
    assert config.embedder_kwargs()["cache_dir"] is False


def test_help_lists_emi_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--estimator", "--entropy-scale", "--bootstrap", "--emi-seed", "--data", "--metrics"):
        assert flag in out


def test_usage_errors_before_lmms_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        (["--tasks", "lbshift_syn_nope", "--model", "dummy"], "unknown task 'lbshift_syn_nope'"),
        (["--tasks", "lbshift_syn_llava_bench_coco", "--data", str(tmp_path / "nope")], "no such file"),
        (["--tasks", "lbshift_syn_llava_bench_coco", "--estimator", str(tmp_path / "x.pt")], "no such file"),
        (["--tasks", "mme", "--metrics", "bleu"], "only 'emi'"),
        (["--model", "dummy"], "give the tasks"),
        (
            ["--tasks", "lbshift_syn_llava_bench_coco", "--confidence", "1.5"],
            "--confidence must be in (0, 1)",
        ),
        (
            ["--tasks", "lbshift_syn_llava_bench_coco", "--estimator_steps", "0"],
            "--estimator-steps must be >= 1",
        ),
        (["--tasks", "lbshift_syn_llava_bench_coco", "--entropy-scale", "inf"], "finite number >= 0"),
        (["--tasks", "lbshift_syn_llava_bench_coco", "--bootstrap", "-1"], "--bootstrap must be >= 0"),
    ]
    for argv, message in cases:
        assert main(["eval", *argv]) == EXIT_USAGE
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("lmms-emi eval: error:") and message in err[0], err


def test_lmms_peek() -> None:
    ns = lmms_argv.peek(["--model", "m", "--tasks=a,b", "--output_path", "o", "--limit", "3"])
    assert isinstance(ns, argparse.Namespace) and (ns.model, ns.tasks, ns.output_path) == ("m", "a,b", "o")


def test_theorem_bound_used_with_an_entropy_scale() -> None:
    from lmms_emi.harness.results import update_results

    run = _fake_run()
    base = run.benchmarks["synthetic"]
    emb_run = _run_of(
        ShiftAnalysis(
            base.id_task,
            tuple(
                t if t.is_id else type(t)(**{**t.__dict__, "bound_theorem": 10 * t.bound}) for t in base.tasks
            ),
            base.correlations,
        ),
        run.club,
    )
    emb_run.settings = AnalysisSettings(entropy_scale=2.0)
    task = base.tasks[1].task
    results = {"results": {task: {}}, "group_subtasks": {task: []}}
    out = update_results(results, emb_run, extra={}, reports={})
    assert out["results"][task]["emid_bound,none"] == pytest.approx(10 * base.tasks[1].bound)


def test_plain_run_options_from_short_environment_variables():
    env = {
        "LMMS_EMI_OPTIONS": '{"bootstrap": 50, "estimator": "x.pt"}',
        "LMMS_EMI_ESTIMATOR": "paper-global",
        "LMMS_EMI_JUDGE": "yes",
        "LMMS_EMI_JUDGE_MODEL": "judge-1",
    }
    config = EMIConfig.from_sources(environ=env)
    got = (config.bootstrap, config.estimator.name, config.judge, config.judge_model)
    assert got == (50, "paper-global", True, "judge-1")
    assert EMIConfig.from_sources(environ={"LMMS_EMI_JUDGE": "0"}).judge is False

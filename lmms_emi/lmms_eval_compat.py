"""Every lmms-eval internal lmms-emi reaches, in one module: the boundary with lmms-eval (docs/LAYERS.md).

lmms-eval 0.7 offers plugins the ``lmms_eval.models`` entry point, ``--include_path`` and task YAMLs
(``metric_list``, ``process_results``, aggregation functions); lmms-emi uses those wherever they suffice.
What they cannot do (add ``--metrics emi`` to other tasks, finish a run once its results file exists, name
a results file no concurrent run uses) needs the touchpoints below. Each is listed in :data:`TOUCHPOINTS`
with why it is needed, each has a contract test in ``tests/test_lmms_eval_compat.py`` that names it and the
installed lmms-eval version when it breaks, and nothing else in lmms-emi imports ``lmms_eval``.

lmms-eval is imported lazily, inside the functions: the hook module imports this one while lmms-eval is
still building its model registry.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

__all__ = [
    "SWITCH_VAR",
    "TESTED_MINOR",
    "TOUCHPOINTS",
    "call_cli",
    "cli_is_importing",
    "configurable_task_class",
    "evaluation_tracker_class",
    "installed_version",
    "is_tested",
    "judge_rule_file",
    "judge_sampling_kwargs",
    "loads_from_disk_shared",
    "model_api",
    "model_manifest",
    "parse_comparative_scores",
    "register_model_manifests",
    "registered_model_names",
    "render_template",
    "task_config",
    "task_kind",
    "task_manager_class",
    "tracker_date_id",
    "tracker_results_folder",
    "unknown_tasks",
    "untested_message",
    "version_gate",
]

#: The lmms-eval minor version the touchpoints are tested with (pyproject bounds the dependency to it).
TESTED_MINOR = "0.7"
#: "0" turns the plain-lmms-eval hook off; "force" lets hook and launcher run on an untested lmms-eval.
SWITCH_VAR = "LMMS_EMI_HOOK"

#: touchpoint -> why lmms-emi needs it (docs/LAYERS.md lists the same; the contract tests use these names).
TOUCHPOINTS: dict[str, str] = {
    "TaskManager.__init__": "wrapped: the run's task folder appended to include_path (a plain `lmms-eval` "
    "command cannot be given a path otherwise) and --metrics emi tasks registered once the index exists",
    "TaskManager.task_index/match_tasks": "the run's task names checked against the index (one line for an "
    "unknown one); a task's kind (task / group / tag) and YAML path for --metrics emi",
    "utils.load_yaml_config": "a --metrics emi task's full config (its doc_to_* functions) from its YAML",
    "utils.apply_template": "a task's Jinja doc_to_text / doc_to_target rendered as lmms-eval renders it",
    "ConfigurableTask.process_results/aggregation/higher_is_better/download": "wrapped: EMI added beside the "
    "own metrics of a user's task (--metrics emi; a metric_list in its YAML would replace them), and a "
    "dataset that fails to load named with its task in one line",
    "datasets.load_from_disk in ConfigurableTask.download": "a local copy read once per run, not once per "
    "task: download loads the whole saved DatasetDict for each of its tasks (35 times for the 35 splits of "
    "the synthetic benchmark)",
    "EvaluationTracker.save_results_aggregated": "wrapped: a results file name no concurrent run uses, then "
    "the EMI step run with that very file (lmms-eval has no after-run hook)",
    "EvaluationTracker.save_results_samples": "wrapped: sample logs written before the EMI step, not after",
    "EvaluationTracker.output_path/general_config_tracker/date_id": "where the tracker wrote the results "
    "file",
    "__main__.cli_evaluate/cli_evaluate_single": "`lmms-emi eval` runs lmms-eval's own CLI in-process and "
    "keeps the results and the exception that cli_evaluate would swallow (it exits 0 on errors)",
    "__main__ import order": "the hook runs while lmms_eval.__main__ imports the model registry, before it "
    "parses argv: the only moment a plain `lmms-eval` command runs plugin code",
    "models.MODEL_REGISTRY_V2/registry_v2.ModelManifest": "the emi_replay model, registered from a checkout "
    "as the lmms_eval.models entry point registers it when installed",
    "api.model.lmms/api.instance.Instance": "the emi_replay model class: lmms-eval's model API, request "
    "arguments (context, gen_kwargs, doc_to_visual, doc_id, task, split)",
    "llm_judge (ServerConfig, build_sampling_kwargs, ResponseParser)": "the judge's request and score "
    "parsing exactly as lmms-eval's llava-in-the-wild judge does",
    "tasks/llava-in-the-wild/rule.json": "the LLaVA-Bench judge rule, read from lmms-eval's package data",
    "results JSON layout": "results / groups / group_subtasks / configs sections and `<metric>,none` keys "
    "(written into and read back by run folders and the leaderboard)",
}


# ------------------------------------------------------------------------------------------------ version
def installed_version() -> str:
    """The installed lmms-eval version ("unknown" when none is installed)."""
    try:
        return version("lmms_eval")
    except PackageNotFoundError:
        return "unknown"


def is_tested(found: str | None = None) -> bool:
    """Whether ``found`` (default: the installed version) is of the tested minor :data:`TESTED_MINOR`."""
    parts = (found or installed_version()).split(".")
    return ".".join(parts[:2]) == TESTED_MINOR


def version_gate(what: str) -> str | None:
    """The one check of the installed lmms-eval that the hook and the launcher share: None when it is of the
    tested minor or ``LMMS_EMI_HOOK=force`` is set, else the message saying so (the hook warns with it and
    patches nothing; ``lmms-emi eval`` refuses to start with it). ``what``: what the caller does then."""
    from lmms_emi.environment import getenv

    found = installed_version()
    if is_tested(found) or (getenv(SWITCH_VAR) or "").strip().lower() == "force":
        return None
    return untested_message(found, what)


def untested_message(found: str, what: str) -> str:
    """The one warning for an untested lmms-eval version; ``what`` says what is (not) done about it."""
    return (
        f"lmms-eval {found} is not the version lmms-emi is tested with ({TESTED_MINOR}.x): {what}; "
        f"install `lmms-eval>=0.7.3,<0.8`, or set {SWITCH_VAR}=force to try anyway"
    )


# ------------------------------------------------------------------------------------------ patched classes
def task_manager_class() -> type:
    from lmms_eval.tasks import TaskManager

    return TaskManager


def evaluation_tracker_class() -> type:
    from lmms_eval.loggers.evaluation_tracker import EvaluationTracker

    return EvaluationTracker


def configurable_task_class() -> type:
    from lmms_eval.api.task import ConfigurableTask

    return ConfigurableTask


@contextmanager
def loads_from_disk_shared(memo: dict[str, Any]) -> Iterator[None]:
    """While inside, ``datasets.load_from_disk`` reads a local folder once per ``memo``: ``ConfigurableTask.
    download`` calls it with the path alone (``dataset_kwargs: {load_from_disk: true}``) and keeps the whole
    ``DatasetDict`` for every task, so a benchmark of 35 tasks on one 35-split folder read it 35 times (0.1 s
    each on 2 cores). A later call for the same folder returns a new ``DatasetDict`` over the same splits:
    lmms-eval assigns its processed splits into that dict, which is the task's own, and modifies no split in
    place (``Dataset`` methods return new datasets). A call with other arguments, or for a path that is not a
    local folder, goes to ``datasets`` as it is. Nested use is a no-op."""
    import datasets

    original = datasets.load_from_disk
    if getattr(original, "_lmms_emi_shared", False):
        yield
        return

    def load_from_disk(*args: Any, **kwargs: Any) -> Any:
        path = kwargs["dataset_path"] if not args and set(kwargs) == {"dataset_path"} else None
        if len(args) == 1 and not kwargs:
            path = args[0]
        if path is None or not Path(str(path)).is_dir():
            return original(*args, **kwargs)
        key = str(Path(str(path)).resolve())
        if key not in memo:
            memo[key] = original(*args, **kwargs)
        loaded = memo[key]
        return datasets.DatasetDict(loaded) if isinstance(loaded, datasets.DatasetDict) else loaded

    load_from_disk._lmms_emi_shared = True  # type: ignore[attr-defined]
    datasets.load_from_disk = load_from_disk
    try:
        yield
    finally:
        datasets.load_from_disk = original


# ------------------------------------------------------------------------------------------ task index
def task_kind(task_manager: Any, name: str) -> str | None:
    """``"task"``, ``"group"``, ``"tag"`` or ``"python_task"`` for a name of ``task_manager``'s index; None
    when it is not indexed."""
    entry = task_manager.task_index.get(name)
    return None if entry is None else str(entry["type"])


def unknown_tasks(task_manager: Any, names: Iterable[str]) -> list[str]:
    """The names (task, group or tag names; ``*`` patterns) that match nothing in ``task_manager``'s index; a
    name that is an existing path (a task YAML or folder, as ``--tasks`` also takes) is not checked here."""
    return [name for name in names if not Path(name).exists() and not task_manager.match_tasks([name])]


def task_config(task_manager: Any, name: str) -> dict[str, Any]:
    """The full config of indexed task ``name`` (its YAML with includes and ``!function`` resolved)."""
    from lmms_eval.utils import load_yaml_config

    yaml_path = task_manager.task_index[name]["yaml_path"]
    return {} if yaml_path == -1 else load_yaml_config(yaml_path, mode="full")


def render_template(template: str, doc: Mapping[str, Any]) -> str:
    """``template`` (a task's Jinja field) rendered for ``doc`` as lmms-eval renders it."""
    from lmms_eval.utils import apply_template

    return apply_template(template, doc)


# ---------------------------------------------------------------------------------------- results tracker
def tracker_results_folder(tracker: Any) -> Path | None:
    """The folder an ``EvaluationTracker`` writes its results file into (None without an output path)."""
    if not tracker.output_path:
        return None
    return Path(tracker.output_path) / tracker.general_config_tracker.model_name_sanitized


def tracker_date_id(tracker: Any) -> str | None:
    """The date id of the results file ``tracker`` has written (None before it wrote one)."""
    return getattr(tracker, "date_id", None)


# ------------------------------------------------------------------------------------------------ the CLI
def cli_is_importing() -> bool:
    """True while ``lmms_eval.__main__`` is being imported (its CLI loads the model entry points then, before
    it parses argv)."""
    main = sys.modules.get("lmms_eval.__main__")
    return main is not None and not hasattr(main, "cli_evaluate")


def call_cli(args: list[str], around: Callable[[Callable[[Any], Any], Any], Any]) -> None:
    """Run lmms-eval's CLI (``cli_evaluate``) in this process on ``args``; each evaluation it starts goes
    through ``around(cli_evaluate_single, parsed_namespace)``, so the caller sees its results and exceptions
    (``cli_evaluate`` itself logs and swallows them). ``sys.argv`` is restored afterwards."""
    import lmms_eval.__main__ as lmms_main

    original = lmms_main.cli_evaluate_single
    saved_argv = sys.argv
    lmms_main.cli_evaluate_single = lambda namespace: around(original, namespace)
    sys.argv = ["lmms-eval", *args]
    try:
        lmms_main.cli_evaluate()
    finally:
        lmms_main.cli_evaluate_single = original
        sys.argv = saved_argv


# ------------------------------------------------------------------------------------------------- models
def model_manifest(model_id: str, class_path: str, aliases: Iterable[str] = ()) -> Any:
    """An lmms-eval ``ModelManifest`` for a simple model class at ``class_path``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=model_id, simple_class_path=class_path, aliases=tuple(aliases))


def registered_model_names() -> list[str]:
    from lmms_eval.models import MODEL_REGISTRY_V2

    return list(MODEL_REGISTRY_V2.list_model_names())


def register_model_manifests(manifests: Iterable[Any]) -> None:
    """Register ``manifests`` in this process's model registry (replacing same-named ones)."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    for manifest in manifests:
        MODEL_REGISTRY_V2.register_manifest(manifest, overwrite=True)


def model_api() -> tuple[type, type]:
    """(lmms-eval's model base class ``lmms``, its request class ``Instance``)."""
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms

    return lmms, Instance


# -------------------------------------------------------------------------------------------------- judge
def judge_sampling_kwargs(model: str, max_tokens: int) -> dict[str, Any]:
    """The sampling arguments lmms-eval's OpenAI judge provider sends for ``model``."""
    from lmms_eval.llm_judge.protocol import ServerConfig
    from lmms_eval.llm_judge.providers.openai import build_sampling_kwargs

    return dict(build_sampling_kwargs(ServerConfig(model_name=model, max_tokens=max_tokens)))


def parse_comparative_scores(text: str) -> tuple[float, float]:
    """(reference score, response score) parsed by lmms-eval's judge parser (-1, -1 when it finds none)."""
    from lmms_eval.llm_judge.utils import ResponseParser

    ref, model = ResponseParser.parse_comparative_response(text)
    return float(ref), float(model)


def judge_rule_file() -> Path | None:
    """lmms-eval's ``tasks/llava-in-the-wild/rule.json`` (the LLaVA-Bench judge rules), when installed."""
    spec = importlib.util.find_spec("lmms_eval")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "tasks" / "llava-in-the-wild" / "rule.json"
        if path.is_file():
            return path
    return None

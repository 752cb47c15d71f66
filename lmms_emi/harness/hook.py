"""Plain ``lmms-eval`` with lmms-emi installed: the plugin's tasks, ``--metrics emi``, and the EMI numbers in
lmms-eval's own results JSON and tables.

lmms-eval 0.7.3 has no task-plugin mechanism and no ``--metrics`` flag. The only code of an installed package
it runs before parsing its arguments and building its task index is the ``lmms_eval.models`` entry-point
group, loaded while ``lmms_eval.models`` is imported (``lmms_eval.__main__`` imports it at import time). The
entry point ``lmms_emi`` (pyproject) is :func:`model_manifests`: it registers the ``emi_replay`` model and, in
an ``lmms-eval`` command (``lmms-eval ...``, ``python -m lmms_eval``, ``torchrun|accelerate launch -m
lmms_eval``) that names a plugin task or group (wildcards too), a task listing, or ``--metrics emi``:

* takes ``--metrics emi`` out of the arguments (lmms-eval would refuse it);
* plans the run exactly as ``lmms-emi eval`` does (:func:`lmms_emi.harness.launch.prepare_run`: the ID task
  added to a shift group named without it, ``--metrics emi`` tasks, the default output path), rewriting
  ``sys.argv`` before lmms-eval parses it;
* activates the launcher's two class-level patches (:func:`lmms_emi.harness.launch.install_patches`): the
  task folder appended to every ``TaskManager``'s ``include_path`` (built-in names win), and the run finished
  right after lmms-eval saved its results JSON (EMID, bounds, Pearson r and the report files merged into it
  and into the printed tables).

Guards: a command naming no plugin task, no listing and no ``--metrics`` is left alone (nothing imported
beyond the task names, nothing patched); ``LMMS_EMI_HOOK=0`` turns the hook off; an lmms-eval version outside
:data:`lmms_emi.lmms_eval_compat.TESTED_MINOR` gets one warning and nothing patched (``lmms-emi eval``
refuses it the same way; ``LMMS_EMI_HOOK=force`` patches anyway); a second call in a process does nothing,
and the patches mark the wrapped methods so a second copy never wraps twice.

Options of a plain run come from the environment (:meth:`lmms_emi.config.EMIConfig.from_sources`): every
option as ``LMMS_EMI_<NAME>`` (e.g. ``LMMS_EMI_DATA="synthetic=PATH,natural=PATH"``, local dataset copies
as ``lmms-emi eval --data``; ``LMMS_EMI_BUILTIN_TASKS=0`` skips indexing lmms-eval's ~2000 built-in task
YAMLs, ~15 s) or all of them as JSON in ``$LMMS_EMI_OPTIONS``; a malformed value stops the command with one
line naming the variable.
"""

from __future__ import annotations

import atexit
import fnmatch
import shutil
import sys
from typing import Any

from lmms_emi import lmms_eval_compat as compat
from lmms_emi.environment import getenv
from lmms_emi.harness import argv as lmms_argv
from lmms_emi.harness import make_tasks, replay

__all__ = ["SWITCH_VAR", "install", "model_manifests"]

SWITCH_VAR = compat.SWITCH_VAR  # "0" off, "force" also on untested lmms-eval versions (hook and launcher)
_OFF = ("0", "off", "false", "no")

_status: str | None = None  # what the hook did in this process (None: not called yet)


def model_manifests() -> list[Any]:
    """Entry point ``lmms_eval.models: lmms_emi``: the hook (:func:`install`), then the plugin's models."""
    install()
    return replay.model_manifests()


def install(argv: list[str] | None = None, *, in_cli: bool | None = None) -> str:
    """Install the hook for this process once; return what it did: ``"off"``, ``"not-cli"`` (not an
    lmms-eval command), ``"launcher"`` (``lmms-emi eval`` drives the run), ``"idle"`` (nothing of lmms-emi
    named), ``"untested"`` (lmms-eval version; one warning), ``"active"``, or ``"again"`` (already called).

    ``argv`` (default ``sys.argv``) is rewritten in place for an active run; ``in_cli`` overrides the
    detection of an lmms-eval command (tests)."""
    global _status
    if _status is not None:
        return "again"
    in_cli = compat.cli_is_importing() if in_cli is None else in_cli
    _status = _install(sys.argv if argv is None else argv, in_cli)
    return _status


def _install(argv: list[str], in_cli: bool) -> str:
    switch = (getenv(SWITCH_VAR) or "1").strip().lower()
    if switch in _OFF:
        return "off"
    if not in_cli:
        return "not-cli"
    launcher = sys.modules.get("lmms_emi.harness.launch")
    if launcher is not None and launcher.active() is not None:
        return "launcher"
    try:
        metrics, args = lmms_argv.pop_option(argv[1:], "--metrics")
    except ValueError as exc:
        return _exit(str(exc), 2)
    if metrics is None and not _names_plugin_task(args):
        return "idle"
    refused = compat.version_gate("nothing patched, so lmms-eval does not see the EMI tasks")
    if refused is not None:
        print(f"lmms-emi: warning: {refused}", file=sys.stderr)
        return "untested"

    from lmms_emi._io import scratch_dir
    from lmms_emi.config import EMIConfig
    from lmms_emi.errors import LmmsEmiError, one_line
    from lmms_emi.harness import launch

    try:  # a malformed LMMS_EMI_* value is one line naming it, before anything else
        config = EMIConfig.from_sources()
    except LmmsEmiError as exc:
        return _exit(one_line(exc), exc.exit_code)
    try:
        run_dir = scratch_dir(launch.SCRATCH_PREFIX)
        atexit.register(shutil.rmtree, run_dir, True)
        prep = launch.prepare_run(config, args, run_dir, metrics, raise_errors=False)
    except (LmmsEmiError, ValueError, FileNotFoundError) as exc:
        code = exc.exit_code if isinstance(exc, LmmsEmiError) else 2
        return _exit(one_line(exc), code)
    except Exception as exc:  # lmms-eval would swallow it and run on without the plugin: stop here instead
        return _exit(launch.describe_error(exc), 1)
    argv[1:] = prep.lmms_args
    launch.activate(prep)
    return "active"


def _exit(message: str, code: int) -> str:
    print(f"lmms-emi: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def _names_plugin_task(args: list[str]) -> bool:
    names = lmms_argv.task_names(args)
    if any(n in make_tasks.LIST_COMMANDS for n in names):
        return True
    ours = make_tasks.plugin_names()
    return any(
        n in ours
        or make_tasks.looks_like_plugin_name(n)  # a typo gets the launcher's error, not lmms-eval's
        or ("*" in n and any(fnmatch.fnmatchcase(o, n) for o in ours))
        for n in names
    )

"""The ``lmms-emi`` console script: one module per subcommand, one parser each.

Subcommands::

    lmms-emi eval ...                 lmms-eval with the plugin's tasks and EMI options
    lmms-emi analyze RUN_DIR          post-hoc report from an lmms-eval --log_samples output folder
    lmms-emi score ...                EMI / EMID / bound from saved response files against a dataset
    lmms-emi train-estimator ...      fit and freeze one CLUB estimator (leaderboards) from saved embeddings
    lmms-emi demo-data DIR            build the offline demo dataset and a demo model's responses
    lmms-emi tasks-path               the plugin's lmms-eval task folder (for --include_path)
    lmms-emi leaderboard RUNS...      merge several runs' results JSON into one EMI leaderboard
    lmms-emi compare RUN_A RUN_B      paired bootstrap of two models' EMI difference on the same questions
    lmms-emi estimators               the registered pre-trained estimators and which are cached

Errors a user can fix (:class:`lmms_emi.errors.LmmsEmiError` and bad values) print one line on stderr and
exit with the error's code (2 for usage errors, 1 for a failed run); ``--debug`` (or ``LMMS_EMI_DEBUG=1``)
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import sys
from collections.abc import Iterable, Sequence
from typing import NoReturn

from lmms_emi.cli._commands import COMMANDS
from lmms_emi.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, LmmsEmiError, one_line

__all__ = ["build_parser", "console_main", "exit_without_gc", "load_libraries", "main"]


def build_parser(full: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The ``lmms-emi`` parser. The subcommands in ``full`` (default: all) get their whole parser, which
    imports their module; the others are only listed, so ``lmms-emi --help`` imports none of them."""
    parser = argparse.ArgumentParser(
        prog="lmms-emi",
        description="Effective mutual information (EMI) of multimodal LLMs under distribution shift.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = set(COMMANDS if full is None else full)
    for name, command in COMMANDS.items():
        if name in wanted and name != "eval":  # eval hands its arguments to lmms-eval
            module = importlib.import_module(command.module)
            module.add_parser(sub).set_defaults(run=module.run)
        else:
            sub.add_parser(name, help=command.help, add_help=False)
    return parser


def _error_status(command: str, exc: BaseException, debug: bool) -> int:
    if debug:
        raise exc
    print(f"lmms-emi {command}: error: {one_line(exc)}", file=sys.stderr)
    return exc.exit_code if isinstance(exc, LmmsEmiError) else EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lmms-emi``; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("LMMS_EMI_DEBUG", "") not in ("", "0") or "--debug" in args
    if args and args[0] == "eval":
        eval_command = importlib.import_module(COMMANDS["eval"].module)
        command, run = "eval", lambda: eval_command.run(args[1:])
    else:
        chosen = next((a for a in args if not a.startswith("-")), None)  # the subcommand, if any
        parser = build_parser([chosen] if chosen in COMMANDS else [])
        ns = parser.parse_args(args)
        if ns.command is None:
            parser.print_help()
            return EXIT_USAGE
        command, run = ns.command, lambda: ns.run(ns)
    try:
        load_libraries(command)
        return run()
    except KeyboardInterrupt:
        print("lmms-emi: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as exc:  # lmms-eval's --tasks list and friends end with sys.exit()
        return exc.code if isinstance(exc.code, int) else 0
    except (LmmsEmiError, ValueError, FileNotFoundError) as exc:
        return _error_status(command, exc, debug)
    except OSError as exc:  # a full disk, a quota, an I/O error: one line naming the file and the cause
        if debug:
            raise
        print(f"lmms-emi {command}: error: {_os_error_line(exc)}", file=sys.stderr)
        return EXIT_FAILED


def load_libraries(command: str) -> None:
    """Import the libraries subcommand ``command`` runs on (``COMMANDS[command].libraries``: torch, scipy,
    matplotlib, ...) with the cyclic garbage collector paused, then freeze what is alive (``gc.freeze``: moved
    to the permanent generation, which collections skip; reference counting still frees it). The imports
    create ~270,000 objects that live until the process ends; while they load, the collector would run five
    full collections, each tracing every object created so far. In a warm full-size ``lmms-emi score`` (the
    ``benchmarks/bench_score.py`` run) the collector took 0.36-0.59 s before and 0.02 s after (measured with
    ``gc.callbacks``, 2 CPUs, light to moderate load, 2026-12-06), for 20-40 MB more peak memory (the imports'
    own garbage is frozen with them). A no-op once they are imported (``main`` run again in one process)."""
    names = COMMANDS[command].libraries if command in COMMANDS else ()
    if all(name in sys.modules for name in names):
        return
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for name in names:
            importlib.import_module(name)
        gc.freeze()
    finally:
        if was_enabled:
            gc.enable()


def _os_error_line(exc: OSError) -> str:
    """``exc`` on one line, naming its file (lmms_emi._io.WriteFailed already does)."""
    text = one_line(exc)
    if exc.filename is not None and exc.strerror and text.startswith("[Errno"):  # a plain OSError
        return f"{exc.filename}: {exc.strerror}"
    return text


def console_main() -> NoReturn:
    """The ``lmms-emi`` console script (and ``python -m lmms_emi.cli``): :func:`main`, then a quick exit."""
    exit_without_gc(main())


def exit_without_gc(code: int) -> NoReturn:
    """``sys.exit(code)`` with the cyclic garbage collector frozen and off: the interpreter's teardown then
    frees what torch, scipy, ... hold by reference counts, without tracing their objects for cycles again (a
    warm full-size ``benchmarks/bench_score.py`` run exits in 0.24 s instead of 0.74 s, against 0.09 s when
    skipping the teardown with ``os._exit``: 3 % of its ~5 s; 2 CPUs under load, 2026-12-06).
    A normal exit otherwise: exit handlers run, streams are flushed, non-daemon threads are waited for."""
    gc.freeze()
    gc.disable()
    sys.exit(code)

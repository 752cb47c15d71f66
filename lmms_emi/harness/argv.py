"""lmms-eval's command line as the plugin reads and rewrites it: the one place that edits argv."""

from __future__ import annotations

import argparse
import os

__all__ = ["peek", "pop_option", "set_arg", "task_names"]


def peek(argv: list[str]) -> argparse.Namespace:
    """The lmms-eval arguments the launcher needs to read or rewrite."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for name in ("--tasks", "--output_path", "--include_path", "--model", "--model_args", "--config"):
        p.add_argument(name)
    p.add_argument("--log_samples", action="store_true")
    known, _ = p.parse_known_args(argv)
    return known


def set_arg(argv: list[str], name: str, value: str | None) -> list[str]:
    """``argv`` with ``name`` set to ``value`` (removed when None); handles ``--x v`` and ``--x=v``."""
    out: list[str] = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == name:
            skip = i + 1 < len(argv)
            continue
        if arg.startswith(name + "="):
            continue
        out.append(arg)
    if value is not None:
        out += [name, value]
    return out


def pop_option(args: list[str], name: str) -> tuple[str | None, list[str]]:
    """(value of ``name``, ``args`` without it); handles ``--x v`` and ``--x=v``."""
    value, out, i = None, [], 0
    while i < len(args):
        arg = args[i]
        if arg == name:
            if i + 1 >= len(args):
                raise ValueError(f"{name} needs a value (e.g. {name} emi)")
            value, i = args[i + 1], i + 2
            continue
        if arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
        else:
            out.append(arg)
        i += 1
    return value, out


def task_names(args: list[str]) -> list[str]:
    """The task names of ``--tasks`` (or of the ``tasks`` of a ``--config`` file)."""
    tasks, _ = pop_option(args, "--tasks")
    if tasks is None:
        config, _ = pop_option(args, "--config")
        if not config or not os.path.isfile(config):
            return []
        import yaml

        with open(config, encoding="utf-8") as fh:
            loaded = yaml.safe_load(fh)
        entries = loaded if isinstance(loaded, list) else [loaded]
        tasks = ",".join(str(e.get("tasks", "")) for e in entries if isinstance(e, dict))
    return [t.strip() for t in tasks.split(",") if t.strip()]

"""The flags every subcommand shares, generated from the one configuration (:mod:`lmms_emi.config`): each
option has one spelling, its field's ``flag`` (the ``--emi-`` prefix where lmms-eval has a flag of that
name); its underscore spelling (lmms-eval's style) is accepted too, and the 0.1 spellings, hidden, with a
deprecation warning, for one release."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable
from dataclasses import fields
from typing import Any

from lmms_emi.config import EMIConfig, value_kind
from lmms_emi.environment import warn_deprecated
from lmms_emi.errors import UsageError

__all__ = [
    "add_config_options",
    "add_emi_options",
    "add_output_options",
    "config_from",
    "export_judge_key",
    "require_club",
]

JUDGE_KEY_VAR = "LMMS_EMI_JUDGE_API_KEY"


def add_emi_options(
    p: argparse.ArgumentParser,
    groups: Iterable[str],
    *,
    old_flags: bool = True,
    skip: Iterable[str] = (),
    debug: bool = True,
) -> None:
    """The config's flags of ``groups`` (see :data:`EMIConfig.GROUPS`) but those of ``skip``, plus
    ``--judge-api-key`` with the judge's and ``--debug``."""
    groups = list(groups)
    add_config_options(p, groups, old_flags=old_flags, skip=skip)
    if "judge" in groups:
        p.add_argument(
            "--judge-api-key",
            "--judge_api_key",
            help="the judge's API key (default $OPENAI_API_KEY); never written to results",
        )
    if debug:
        p.add_argument("--debug", action="store_true", help="show tracebacks")


def add_output_options(p: argparse.ArgumentParser, *, required: bool, help: str) -> None:
    """``--output-path`` (its underscore spelling too; ``--output`` deprecated)."""
    p.add_argument("--output-path", "--output_path", dest="output_path", help=help)
    p.add_argument("--output", dest="old_output", help=argparse.SUPPRESS)
    p.set_defaults(output_required=required)


def config_from(ns: argparse.Namespace, *, base: EMIConfig | None = None) -> EMIConfig:
    """The run's configuration: defaults (or ``base``) < ``$LMMS_EMI_OPTIONS`` < ``LMMS_EMI_<NAME>`` < flags.
    Also checks ``--output-path`` (given when required) and hands ``--judge-api-key`` to this process and its
    children through the environment (never through the config)."""
    if getattr(ns, "old_output", None):
        warn_deprecated("--output", "--output-path")
        ns.output_path = ns.output_path or ns.old_output
    if getattr(ns, "output_required", False) and not ns.output_path:
        raise UsageError("--output-path is required")
    export_judge_key(ns)
    return EMIConfig.from_sources(ns, base=base)


def export_judge_key(ns: argparse.Namespace) -> None:
    """``--judge-api-key`` into the environment (the judge client and the run's processes read it there)."""
    if getattr(ns, "judge_api_key", None):
        os.environ[JUDGE_KEY_VAR] = ns.judge_api_key


class _Deprecated(argparse.Action):
    """An old flag spelling: stores into the option's dest and warns once."""

    def __init__(
        self, option_strings: list[str], dest: str, *, new: str, store_const: Any = None, **kwargs: Any
    ) -> None:
        self.new = new
        self.store_const = store_const
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        warn_deprecated(str(option_string), self.new)
        setattr(namespace, self.dest, self.store_const if self.nargs == 0 else values)


def _argparse_type(f: Any) -> Callable[[str], Any] | None:
    return {"int": int, "float": float}.get(value_kind(f))


def add_config_options(
    parser: argparse.ArgumentParser,
    groups: Iterable[str],
    *,
    old_flags: bool = True,
    skip: Iterable[str] = (),
) -> None:
    """Add the flags of the config fields in ``groups`` (each flag also takes its underscore spelling;
    ``old_flags``: also the 0.1 spellings, hidden and deprecated — not in ``eval``, where lmms-eval owns
    ``--device``, ``--batch_size`` and ``--seed``). Every default is None: a flag not given leaves the value
    of the lower sources (:meth:`EMIConfig.from_sources`)."""
    skip = set(skip)
    by_group: dict[str, list[Any]] = {}
    for f in fields(EMIConfig):
        if f.name not in skip:
            by_group.setdefault(f.metadata["group"], []).append(f)
    for group in groups:
        g = parser.add_argument_group(group)
        for f in by_group.get(group, []):
            _add_flag(g, f, old_flags=old_flags)


def _add_flag(g: Any, f: Any, *, old_flags: bool) -> None:
    """The flag of field ``f``, plus its hidden spellings: the underscore one (lmms-eval's style) and, with
    ``old_flags``, the deprecated ones (those with the ``--emi-`` prefix always: lmms-eval has none)."""
    meta, kind = f.metadata, value_kind(f)
    flag = meta["flag"]
    help_text = meta["help"]
    if f.default not in (None, (), True, False) and "default" not in help_text:
        help_text += f" (default {f.default})"
    if f.name == "progress":
        g.add_argument(
            "-q", "--quiet", dest="progress", action="store_const", const=False, default=None, help=help_text
        )
        return
    kwargs: dict[str, Any] = {"dest": f.name, "default": None}
    if kind == "bool":
        kwargs.update(action="store_const", const=f.name != "builtin_tasks")  # --no-builtin-tasks: off
    elif kind == "tuple":
        kwargs["action"] = "append"
    elif _argparse_type(f) is not None:
        kwargs["type"] = _argparse_type(f)
    if meta["choices"]:
        kwargs["choices"] = meta["choices"]
    if kind != "bool":
        kwargs["metavar"] = meta["metavar"] or (None if meta["choices"] else f.name.upper())
    g.add_argument(flag, help=help_text, **kwargs)
    underscore = "--" + flag[2:].replace("-", "_")
    if underscore != flag:
        g.add_argument(underscore, help=argparse.SUPPRESS, **kwargs)
    kwargs.pop("metavar", None)
    for old in meta["old"]:
        if old_flags or old.startswith("--emi-"):
            g.add_argument(
                old,
                dest=f.name,
                action=_Deprecated,
                new=flag,
                default=None,
                nargs=0 if kind == "bool" else None,
                store_const=kwargs.get("const"),
                type=kwargs.get("type"),
                help=argparse.SUPPRESS,
            )


def require_club(config: EMIConfig, what: str) -> None:
    """``what`` re-scores runs with CLUB's closed form only: another ``--mi-estimator`` is one line."""
    if config.mi_estimator != "club":
        raise UsageError(
            f"--mi-estimator {config.mi_estimator}: {what} re-scores runs with CLUB only; compare critic "
            "estimates with `lmms-emi ablate` instead"
        )

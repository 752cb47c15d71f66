"""The flags every subcommand shares, generated from the one configuration (:mod:`lmms_emi.config`): each
option has one spelling, its field's ``flag`` (the ``--emi-`` prefix where lmms-eval has a flag of that
name); its underscore spelling (lmms-eval's style) is accepted too, and the 0.1 spellings, hidden, with a
deprecation warning, for one release."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable

from lmms_emi.config import EMIConfig, add_config_options
from lmms_emi.environment import warn_deprecated
from lmms_emi.errors import UsageError

__all__ = ["add_emi_options", "add_output_options", "config_from", "export_judge_key"]

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


def config_from(ns: argparse.Namespace) -> EMIConfig:
    """The run's configuration: defaults < ``$LMMS_EMI_OPTIONS`` < ``LMMS_EMI_<NAME>`` < flags. Also checks
    ``--output-path`` (given when required) and hands ``--judge-api-key`` to this process and its children
    through the environment (never through the config)."""
    if getattr(ns, "old_output", None):
        warn_deprecated("--output", "--output-path")
        ns.output_path = ns.output_path or ns.old_output
    if getattr(ns, "output_required", False) and not ns.output_path:
        raise UsageError("--output-path is required")
    export_judge_key(ns)
    return EMIConfig.from_sources(ns)


def export_judge_key(ns: argparse.Namespace) -> None:
    """``--judge-api-key`` into the environment (the judge client and the run's processes read it there)."""
    if getattr(ns, "judge_api_key", None):
        os.environ[JUDGE_KEY_VAR] = ns.judge_api_key

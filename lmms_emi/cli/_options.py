"""The options every subcommand shares, spelled the same way in each (``eval`` mixes them with lmms-eval's
own flags, hence the ``--emi-`` prefix where lmms-eval has a flag of that name). Each flag also accepts its
underscore spelling (lmms-eval's style); earlier spellings stay as hidden aliases for one release."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lmms_emi.judge import API_KEY_ENV, JudgeConfig
from lmms_emi.sources.datasets import quiet_hub

if TYPE_CHECKING:  # imported where used: a subcommand without encoders or estimators starts without torch
    from lmms_emi.embed import Embedder
    from lmms_emi.pipeline.estimator import EstimatorPolicy
    from lmms_emi.pipeline.shift import AnalysisSettings

__all__ = [
    "HelpFormatter",
    "add_analysis_options",
    "add_encoder_options",
    "add_estimator_options",
    "add_judge_options",
    "add_option",
    "add_output_options",
    "build_embedder",
    "cache_setting",
    "export_judge_key",
    "judge_config_from",
    "policy_from",
    "settings_from",
]


_ALIASES: set[str] = set()  # option strings accepted but not shown in help


def add_option(group: Any, name: str, *, old: Sequence[str] = (), **kwargs: Any) -> None:
    """``--name`` plus hidden aliases: its underscore spelling and the ``old`` spellings (left out of the
    help by :class:`HelpFormatter`)."""
    aliases = [a for a in dict.fromkeys(("--" + name[2:].replace("-", "_"), *old)) if a != name]
    _ALIASES.update(aliases)
    group.add_argument(name, *aliases, **kwargs)


class HelpFormatter(argparse.HelpFormatter):
    """Help that leaves out the hidden aliases of :func:`add_option` (still accepted)."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        shown = [o for o in action.option_strings if o not in _ALIASES]
        if not shown or shown == action.option_strings:
            return super()._format_action_invocation(action)
        if action.nargs == 0:
            return ", ".join(shown)
        args = self._format_args(action, self._get_default_metavar_for_optional(action))
        return ", ".join(f"{o} {args}" for o in shown)


def add_encoder_options(p: argparse.ArgumentParser, *, legacy: bool = True) -> None:
    """``--encoders``, ``--vision-encoder``, ``--text-encoder``, ``--text-layer``, ``--emi-device``,
    ``--emi-batch-size``, ``--emi-cache``. ``legacy``: also accept score's old short names (not in
    ``eval``, where lmms-eval owns ``--device`` and ``--batch_size``)."""
    g = p.add_argument_group("encoders")
    g.add_argument(
        "--encoders", default="paper", choices=["paper", "offline"], help="encoder profile (default paper)"
    )
    add_option(
        g,
        "--vision-encoder",
        old=("--vision",) if legacy else (),
        help="vision encoder override: registry name, hub id or local folder",
    )
    add_option(g, "--text-encoder", old=("--text",) if legacy else (), help="text encoder override")
    add_option(g, "--text-layer", type=int, help="hidden layer of the text encoder")
    add_option(
        g,
        "--emi-device",
        old=("--device",) if legacy else (),
        help="device for encoders and estimator (default: cuda if available)",
    )
    add_option(
        g,
        "--emi-batch-size",
        old=("--batch-size",) if legacy else (),
        type=int,
        default=32,
        help="embedding batch size",
    )
    add_option(
        g, "--emi-cache", old=("--cache-dir",) if legacy else (), help="embedding cache folder, or 'off'"
    )


def add_estimator_options(p: argparse.ArgumentParser, *, legacy: bool = True, estimator: bool = True) -> None:
    """``--estimator``, ``--estimator-steps`` and ``--emi-seed``."""
    from lmms_emi.pipeline.estimator import DEFAULT_PATIENCE

    g = p.add_argument_group("estimator")
    if estimator:
        g.add_argument(
            "--estimator",
            help="a registered estimator (e.g. paper-global; `lmms-emi estimators` lists them), a CLUB "
            "checkpoint (project format or the paper's CLUB_global.pt), or 'fit' to fit one on this run. "
            "Default: the estimator registered for the encoders (downloaded once), else fit one on this run",
        )
    add_option(
        g,
        "--estimator-steps",
        old=("--steps",) if legacy else (),
        type=int,
        default=5000,
        help="CLUB training steps when one is fitted (the most, with early stopping)",
    )
    add_option(
        g,
        "--estimator-patience",
        type=int,
        default=DEFAULT_PATIENCE,
        help="a fitted CLUB stops after this many held-out evaluations (every 100 steps) without "
        "improvement; 0: exactly --estimator-steps steps, the paper's recipe",
    )
    add_option(
        g,
        "--emi-seed",
        old=("--seed",) if legacy else (),
        type=int,
        default=0,
        help="seed of the estimator fit and the bootstrap",
    )


def add_analysis_options(p: argparse.ArgumentParser) -> None:
    """``--bootstrap``, ``--confidence``, ``--entropy-scale``."""
    g = p.add_argument_group("analysis")
    g.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals (0: none)"
    )
    g.add_argument("--confidence", type=float, default=0.95, help="confidence level of the intervals")
    add_option(g, "--entropy-scale", type=float, help="Ĥ of Theorem 4.5 (default: the scale-adjusted bound)")


def add_output_options(p: argparse.ArgumentParser, *, required: bool, help: str) -> None:
    """``--output-path`` (old spelling ``--output``), ``-q/--quiet`` and ``--debug``."""
    add_option(p, "--output-path", old=("--output",), required=required, help=help)
    add_common_flags(p)


def add_common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def cache_setting(value: str | None) -> str | bool | None:
    """``--emi-cache`` as the Embedder takes it: a folder, False for 'off', None for the default."""
    if value is None:
        return None
    return False if value.lower() in ("off", "none", "false") else value


def embedder_overrides(ns: argparse.Namespace) -> dict[str, Any]:
    """Keyword overrides of ``Embedder.from_profile`` from the encoder options."""
    overrides: dict[str, Any] = {"progress": not ns.quiet, "batch_size": ns.emi_batch_size}
    for option, key in (
        ("vision_encoder", "vision"),
        ("text_encoder", "text"),
        ("text_layer", "text_layer"),
        ("emi_device", "device"),
    ):
        value = getattr(ns, option, None)
        if value is not None:
            overrides[key] = value
    cache = cache_setting(ns.emi_cache)
    if cache is not None:
        overrides["cache_dir"] = cache
    return overrides


def build_embedder(ns: argparse.Namespace) -> Embedder:
    """The Embedder of ``--encoders`` with overrides (reads the encoders' configs; a failure is one
    :class:`~lmms_emi.errors.EncoderLoadError` line naming the ways out)."""
    from lmms_emi.embed import Embedder

    with quiet_hub():
        return Embedder.from_profile(ns.encoders, **embedder_overrides(ns))


def policy_from(ns: argparse.Namespace) -> EstimatorPolicy:
    from lmms_emi.pipeline.estimator import EstimatorPolicy

    return EstimatorPolicy(
        ns.estimator,
        steps=ns.estimator_steps,
        seed=ns.emi_seed,
        progress=not ns.quiet,
        patience=ns.estimator_patience or None,
    )


def settings_from(ns: argparse.Namespace) -> AnalysisSettings:
    from lmms_emi.pipeline.shift import AnalysisSettings

    return AnalysisSettings(ns.entropy_scale, ns.bootstrap, ns.confidence, ns.emi_seed)


def add_judge_options(p: argparse.ArgumentParser) -> None:
    """``--judge`` and its settings (an OpenAI-compatible chat-completions judge; ``lmms_emi.judge``)."""
    g = p.add_argument_group("judge (win rate against the reference; off by default)")
    g.add_argument("--judge", action="store_true", help="score responses with the judge: win rate, agreement")
    add_option(g, "--judge-model", help="judge model (default $MODEL_VERSION, else gpt-4o-2024-11-20)")
    add_option(g, "--judge-base-url", help="API base URL up to /v1 (default $OPENAI_API_URL, else OpenAI's)")
    add_option(g, "--judge-api-key", help="API key (default $OPENAI_API_KEY); never written to results")
    add_option(g, "--judge-concurrency", type=int, default=8, help="judge calls in flight at once")
    add_option(g, "--judge-cache", help="judge answer cache folder or 'off' (~/.cache/lmms_emi/judge)")
    add_option(g, "--judge-timeout", type=float, default=60.0, help="seconds per judge call")
    add_option(
        g, "--judge-max-attempts", type=int, default=4, help="calls per sample before it is excluded"
    )


def export_judge_key(ns: argparse.Namespace) -> None:
    """Hand ``--judge-api-key`` to this process and its children through the environment (not options)."""
    if getattr(ns, "judge_api_key", None):
        os.environ[API_KEY_ENV] = ns.judge_api_key


def judge_config_from(ns: argparse.Namespace) -> JudgeConfig | None:
    """The judge's config of ``--judge`` (None without it)."""
    if not getattr(ns, "judge", False):
        return None
    return JudgeConfig.resolve(
        model=ns.judge_model,
        base_url=ns.judge_base_url,
        api_key=ns.judge_api_key,
        concurrency=ns.judge_concurrency,
        cache_dir=ns.judge_cache,
        timeout=ns.judge_timeout,
        max_attempts=ns.judge_max_attempts,
    )

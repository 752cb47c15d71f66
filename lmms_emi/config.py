"""One configuration object for every EMI option of a run, whatever the entry point.

:class:`EMIConfig` holds each option once, under one name. The same name is its command-line flag (the
``flag`` of its field: ``--emi-`` where lmms-eval has a flag of that name), its environment variable
(``LMMS_EMI_<NAME>``) and its key in ``$LMMS_EMI_OPTIONS`` (JSON). Sources are layered, later winning:
defaults < ``$LMMS_EMI_OPTIONS`` < ``LMMS_EMI_<NAME>`` < flags (:meth:`EMIConfig.from_sources`). A bad
value is one :class:`~lmms_emi.errors.UsageError` line naming where it came from (the flag, the variable, or
the variable and the key).

The estimator choice is a small tagged type, :class:`EstimatorChoice`: the default for the encoders, a fit on
the run, a registered name, or a checkpoint file.

This module imports nothing heavy (no torch): every entry point builds its config before deciding what to
load. It is over 400 lines because most of it is the table of options itself (each field with its flag,
help and group): the table is kept whole on purpose, as the one home of every option.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

from lmms_emi import environment
from lmms_emi import estimator_registry as registry
from lmms_emi.errors import UsageError

__all__ = [
    "ENCODER_PROFILES",
    "ESTIMATE",
    "OPTIONS_VAR",
    "EMIConfig",
    "EstimatorChoice",
    "environment_variables",
    "option_variable",
    "valid_entropy_scale",
    "value_kind",
]

OPTIONS_VAR = "LMMS_EMI_OPTIONS"
#: The names of ``lmms_emi.estimators.families.MI_ESTIMATORS`` / ``JSD_ESTIMATORS`` (spelled out here: this
#: module imports no torch; a test keeps them equal).
MI_ESTIMATOR_NAMES = ("club", "infonce", "nwj", "mine")
JSD_ESTIMATOR_NAMES = ("rjsd", "mmd")
#: The names of ``lmms_emi.embed.profiles.PROFILES`` (config imports no embed; a test keeps them equal).
ENCODER_PROFILES = ("paper", "offline", "e5v-disjoint", "e5v-joint")
#: ``--entropy-scale estimate``: Ĥ from the token log-probabilities saved with the responses
ESTIMATE = "estimate"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")
_OFF = ("off", "none", "false")  # a cache turned off


def valid_entropy_scale(value: object) -> bool:
    """Whether ``value`` is an entropy scale Ĥ of the theorem's bound: None (the scale-adjusted form),
    :data:`ESTIMATE` or a finite number >= 0 (the one rule; each caller says it in its own terms).

    >>> [valid_entropy_scale(v) for v in (None, "estimate", 2.5, 0, -1.0, float("nan"), "lots")]
    [True, True, True, True, False, False, False]
    """
    if value is None or value == ESTIMATE:
        return True
    return isinstance(value, (int, float)) and math.isfinite(value) and value >= 0


# ------------------------------------------------------------------------------------------- estimator
EstimatorKind = Literal["default", "fit", "registered", "file"]


@dataclass(frozen=True)
class EstimatorChoice:
    """Which CLUB estimator a run uses.

    ``default``: a registered estimator trained on the run's encoders if there is one, else a fit on the
    run; ``fit``: fit one on the run's pooled pairs; ``registered``: the registered estimator ``value``;
    ``file``: the checkpoint file ``value``.

    >>> EstimatorChoice.parse(None), EstimatorChoice.parse("fit")
    (EstimatorChoice(kind='default', value=None), EstimatorChoice(kind='fit', value=None))
    >>> EstimatorChoice.parse("paper-global").kind, str(EstimatorChoice.parse("ckpt/club.safetensors"))
    ('registered', 'ckpt/club.safetensors')
    """

    kind: EstimatorKind = "default"
    value: str | None = None

    @classmethod
    def parse(cls, text: str | None) -> EstimatorChoice:
        """The choice a user wrote: nothing (default), ``fit``, a registered name, or a checkpoint path. A
        bare word that is none of these is a UsageError listing the registered names."""
        text = None if text is None else str(text).strip()
        if not text or text == "default":
            return cls("default")
        if text == "fit":
            return cls("fit")
        if registry.is_registry_name(text):
            return cls("registered", text)
        if not any(c in text for c in "/\\.") and not Path(text).exists():
            registry.registry_entry(text)  # raises: unknown name, with the registered ones
        return cls("file", text)

    @property
    def path(self) -> Path | None:
        """The checkpoint file of a ``file`` choice."""
        return Path(self.value).expanduser() if self.kind == "file" and self.value else None

    @property
    def name(self) -> str | None:
        """The registered name of a ``registered`` choice."""
        return self.value if self.kind == "registered" else None

    def __str__(self) -> str:
        return self.value if self.value else self.kind


# ------------------------------------------------------------------------------------------- options
_DEFAULT_ESTIMATOR = EstimatorChoice()


def _opt(
    default: Any,
    flag: str,
    help: str,
    *,
    group: str,
    old: Sequence[str] = (),
    choices: Sequence[str] | None = None,
    metavar: str | None = None,
) -> Any:
    """A config field with its command-line spelling (``flag``), the help line, its group of flags and the
    old flag spellings still accepted (hidden, with a deprecation warning)."""
    meta = {
        "flag": flag,
        "help": help,
        "group": group,
        "old": tuple(old),
        "choices": choices,
        "metavar": metavar,
    }
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable default")
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class EMIConfig:
    """Every option of an EMI run (see the module docstring for where each comes from)."""

    # encoders
    encoders: str = _opt(
        "paper", "--encoders", "encoder profile (default paper)", group="encoders", choices=ENCODER_PROFILES
    )
    vision_encoder: str | None = _opt(
        None,
        "--vision-encoder",
        "vision encoder override: registry name, hub id or local folder",
        group="encoders",
        old=("--vision",),
    )
    text_encoder: str | None = _opt(
        None, "--text-encoder", "text encoder override", group="encoders", old=("--text",)
    )
    text_layer: int | None = _opt(None, "--text-layer", "hidden layer of the text encoder", group="encoders")
    device: str | None = _opt(
        None,
        "--emi-device",
        "device for encoders and estimator (default: cuda if available)",
        group="encoders",
        old=("--device",),
    )
    batch_size: int = _opt(
        32, "--emi-batch-size", "embedding batch size", group="encoders", old=("--batch-size",)
    )
    embedding_cache: str | None = _opt(
        None,
        "--emi-cache",
        "embedding cache folder, or 'off' (default <user cache>/lmms_emi/embeddings)",
        group="encoders",
        old=("--cache-dir",),
    )
    # estimator
    estimator: EstimatorChoice = _opt(  # noqa: RUF009 (frozen: the shared default cannot change)
        _DEFAULT_ESTIMATOR,
        "--estimator",
        "a registered estimator (e.g. paper-global; `lmms-emi estimators` lists them), a CLUB checkpoint "
        "(project format or the paper's CLUB_global.pt), or 'fit' to fit one on this run. Default: the "
        "estimator registered for the encoders (downloaded once), else fit one on this run",
        group="estimator",
    )
    estimator_steps: int = _opt(
        5000,
        "--estimator-steps",
        "CLUB training steps when one is fitted (the most, with early stopping)",
        group="estimator",
        old=("--steps",),
    )
    estimator_patience: int = _opt(
        5,
        "--estimator-patience",
        "a fitted CLUB stops after this many held-out evaluations (every 100 steps) without improvement; "
        "0: exactly --estimator-steps steps, the paper's recipe",
        group="estimator",
    )
    estimator_fit: str = _opt(
        "fast",
        "--estimator-fit",
        "how a CLUB is fitted: 'fast' (closed-form linear-Gaussian start, then a short full-batch "
        "refinement) or 'paper' (Adam, batch 1,024, up to --estimator-steps steps)",
        group="estimator",
        choices=("fast", "paper"),
    )
    mi_estimator: str = _opt(
        "club",
        "--mi-estimator",
        "the MI estimator of EMI: 'club' (default, the paper's) or a critic lower bound fitted on the run "
        "(or loaded with --estimator FILE): 'infonce', 'nwj', 'mine'",
        group="estimator",
        choices=MI_ESTIMATOR_NAMES,
    )
    seed: int = _opt(
        0, "--emi-seed", "seed of the estimator fit and the bootstrap", group="estimator", old=("--seed",)
    )
    # analysis
    bootstrap: int = _opt(
        1000, "--bootstrap", "bootstrap resamples for the intervals (0: none)", group="analysis"
    )
    confidence: float = _opt(0.95, "--confidence", "confidence level of the intervals", group="analysis")
    entropy_scale: float | Literal["estimate"] | None = _opt(
        None,
        "--entropy-scale",
        "Ĥ of Theorem 4.5: a number (nats), or 'estimate' to estimate it from the token log-probabilities "
        "saved with the responses (score only; default: the scale-adjusted bound)",
        group="analysis",
        metavar="NATS|estimate",
    )
    jsd_estimator: str = _opt(
        "rjsd",
        "--jsd-estimator",
        "the divergence of the bound's terms: 'rjsd' (default, the paper's) or 'mmd' (biased MMD², Gaussian "
        "kernel, median-distance bandwidth)",
        group="analysis",
        choices=JSD_ESTIMATOR_NAMES,
    )
    # a run inside lmms-eval
    id_task: str | None = _opt(
        None,
        "--emi-id-task",
        "the in-distribution task of your own --metrics emi tasks: EMID and the bounds of the others are "
        "measured against it (added to --tasks when missing)",
        group="run",
        metavar="TASK",
    )
    data: tuple[str, ...] = _opt(
        (),
        "--data",
        "local copy of a benchmark (save_to_disk folder or parquet files), instead of the hub; "
        "repeat per benchmark (environment: comma-separated)",
        group="run",
        metavar="[BENCHMARK=]PATH",
    )
    report_dir: str | None = _opt(
        None, "--report-dir", "where the EMI reports go (default: next to the results JSON)", group="run"
    )
    builtin_tasks: bool = _opt(
        True,
        "--no-builtin-tasks",
        "index only the plugin's (and --include_path) tasks: ~15 s faster, built-in tasks unavailable",
        group="run",
    )
    # the judge (win rate against the reference; off by default). Its API key is not an option: it travels in
    # the environment ($LMMS_EMI_JUDGE_API_KEY or $OPENAI_API_KEY) and is never written into results.
    judge: bool = _opt(False, "--judge", "score responses with the judge: win rate, agreement", group="judge")
    judge_model: str | None = _opt(
        None, "--judge-model", "judge model (default $MODEL_VERSION, else gpt-4o-2024-11-20)", group="judge"
    )
    judge_base_url: str | None = _opt(
        None,
        "--judge-base-url",
        "API base URL up to /v1 (default $OPENAI_API_URL, else OpenAI's)",
        group="judge",
    )
    judge_concurrency: int = _opt(8, "--judge-concurrency", "judge calls in flight at once", group="judge")
    judge_cache: str | None = _opt(
        None,
        "--judge-cache",
        "judge answer cache folder or 'off' (default <user cache>/lmms_emi/judge)",
        group="judge",
    )
    judge_timeout: float = _opt(60.0, "--judge-timeout", "seconds per judge call", group="judge")
    judge_max_attempts: int = _opt(
        4, "--judge-max-attempts", "calls per sample before it is excluded", group="judge"
    )
    # display
    progress: bool = _opt(True, "--quiet", "no progress bars", group="display")

    GROUPS: ClassVar[tuple[str, ...]] = ("encoders", "estimator", "analysis", "run", "judge", "display")

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _coerce(f, getattr(self, f.name), f.metadata["flag"]))
        for name, low in (
            ("batch_size", 1),
            ("estimator_steps", 1),
            ("estimator_patience", 0),
            ("bootstrap", 0),
            ("judge_concurrency", 1),
            ("judge_max_attempts", 1),
        ):
            if getattr(self, name) < low:
                raise UsageError(f"{_flag(name)} must be >= {low}, got {getattr(self, name)}")
        if not 0 < self.confidence < 1:
            raise UsageError(f"--confidence must be in (0, 1), got {self.confidence}")
        if not valid_entropy_scale(self.entropy_scale):
            raise UsageError(f"--entropy-scale must be a finite number >= 0, got {self.entropy_scale}")
        if not (math.isfinite(self.judge_timeout) and self.judge_timeout > 0):
            raise UsageError(
                f"--judge-timeout must be a positive number of seconds, got {self.judge_timeout}"
            )

    # ---------------------------------------------------------------------------------- derived values
    @property
    def cache_folder(self) -> str | bool | None:
        """The embedding cache as the Embedder takes it: a folder, False when 'off', None for the default."""
        return _cache_setting(self.embedding_cache)

    @property
    def judge_cache_folder(self) -> str | bool | None:
        """The judge cache: a folder, False when 'off', None for the default."""
        return _cache_setting(self.judge_cache)

    def embedder_kwargs(self) -> dict[str, Any]:
        """Keyword overrides of ``Embedder.from_profile(self.encoders, **kwargs)``."""
        kwargs: dict[str, Any] = {"batch_size": self.batch_size, "progress": self.progress}
        for option, key in (
            ("vision_encoder", "vision"),
            ("text_encoder", "text"),
            ("text_layer", "text_layer"),
            ("device", "device"),
        ):
            value = getattr(self, option)
            if value is not None:
                kwargs[key] = value
        if self.cache_folder is not None:
            kwargs["cache_dir"] = self.cache_folder
        return kwargs

    # ---------------------------------------------------------------------------------- sources
    @classmethod
    def from_sources(
        cls,
        flags: argparse.Namespace | Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
        *,
        base: EMIConfig | None = None,
    ) -> EMIConfig:
        """Defaults (or ``base``) < ``$LMMS_EMI_OPTIONS`` < ``LMMS_EMI_<NAME>`` < the flags given (values
        that are None were not given)."""
        env = os.environ if environ is None else environ
        values = asdict_shallow(base) if base is not None else {}
        values.update(_from_options_json(env))
        values.update(_from_variables(env))
        given = vars(flags) if isinstance(flags, argparse.Namespace) else dict(flags or {})
        for f in fields(cls):
            if f.name in given and given[f.name] is not None:
                values[f.name] = given[f.name]
        return cls(**values)

    def to_json(self) -> str:
        """The config as ``$LMMS_EMI_OPTIONS`` JSON (read back by :meth:`from_sources`)."""
        return json.dumps(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (the estimator as the user writes it)."""
        out = asdict(self)
        out["estimator"] = None if self.estimator.kind == "default" else str(self.estimator)
        out["data"] = list(self.data)
        return out

    def replace(self, **changes: Any) -> EMIConfig:
        return replace(self, **changes)


def asdict_shallow(config: EMIConfig) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in fields(config)}


def _flag(name: str) -> str:
    return next(f.metadata["flag"] for f in fields(EMIConfig) if f.name == name)


def _cache_setting(value: str | None) -> str | bool | None:
    if value is None:
        return None
    return False if value.strip().lower() in _OFF else value


def value_kind(f: Any) -> str:
    """The field's value type by its annotation: 'str', 'int', 'float', 'bool', 'tuple', 'estimator' or
    'scale' (a number or the word 'estimate')."""
    annotation = str(f.type)
    if annotation.startswith("float | Literal"):
        return "scale"
    for name in ("EstimatorChoice", "bool", "int", "float", "tuple"):
        if annotation.startswith(name):
            return "estimator" if name == "EstimatorChoice" else name
    return "str"


def _coerce(f: Any, value: Any, where: str) -> Any:
    """``value`` as the field's type (strings from the environment are parsed); UsageError naming
    ``where`` when it cannot be."""
    kind = value_kind(f)
    optional = "None" in str(f.type)
    if value is None:
        if optional:
            return None
        raise UsageError(f"{where}: a value is needed")
    try:
        if kind == "estimator":
            return value if isinstance(value, EstimatorChoice) else EstimatorChoice.parse(value)
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
                return value.strip().lower() in _TRUE
            raise ValueError("expected true or false")
        if kind == "tuple":
            if isinstance(value, str):
                return tuple(v.strip() for v in value.split(",") if v.strip())
            if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                return tuple(value)
            raise ValueError("expected a list of strings")
        if kind == "scale" and isinstance(value, str) and value.strip().lower() == ESTIMATE:
            return ESTIMATE
        if kind in ("int", "float", "scale"):
            if isinstance(value, bool):
                raise ValueError(f"expected a number, got {value!r}")
            number = int(value) if kind == "int" and not isinstance(value, float) else float(value)
            if kind == "int" and number != int(float(value)):
                raise ValueError(f"expected a whole number, got {value!r}")
            return int(number) if kind == "int" else float(number)
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
        if f.metadata.get("choices") and value not in f.metadata["choices"]:
            raise ValueError(f"expected one of {', '.join(f.metadata['choices'])}, got {value!r}")
        return value
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None
    except (TypeError, ValueError) as exc:
        words = {"int": "a whole number", "float": "a number", "scale": f"a number or '{ESTIMATE}'"}
        kind_word = words.get(kind, "")
        detail = (
            str(exc) if not kind_word or "expected" in str(exc) else f"expected {kind_word}, got {value!r}"
        )
        raise UsageError(f"{where}: {detail}") from None


# ------------------------------------------------------------------------------------------- environment
#: Old keys of ``$LMMS_EMI_OPTIONS`` (0.1) -> the option's name now.
_OLD_KEYS = {
    "profile": "encoders",
    "vision": "vision_encoder",
    "text": "text_encoder",
    "cache_dir": "embedding_cache",
    "train_steps": "estimator_steps",
    "train_patience": "estimator_patience",
}


def option_variable(name: str) -> str:
    """The environment variable of option ``name``: ``LMMS_EMI_<NAME>``."""
    return environment.PREFIX + name.upper()


def environment_variables() -> dict[str, str]:
    """Every variable lmms-emi reads, with what it does: the options', then the settings'."""
    out = {option_variable(f.name): f.metadata["help"] for f in fields(EMIConfig) if f.name != "progress"}
    out.update(environment.SETTINGS)
    return out


def _from_options_json(env: Mapping[str, str]) -> dict[str, Any]:
    raw = env.get(OPTIONS_VAR, "").strip()
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UsageError(f"${OPTIONS_VAR} is not valid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(data, dict):
        raise UsageError(f"${OPTIONS_VAR} must be a JSON object of options, got {type(data).__name__}")
    known = {f.name: f for f in fields(EMIConfig)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = _OLD_KEYS.get(key, key)
        if name != key:
            environment.warn_deprecated(f"{OPTIONS_VAR} key {key!r}", repr(name))
        if name not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; options: {', '.join(known)}"
            raise UsageError(f"${OPTIONS_VAR}: unknown option {key!r}{hint}")
        out[name] = _coerce(known[name], value, f"${OPTIONS_VAR} key {key!r}")
    return out


def _from_variables(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(EMIConfig):
        if f.name == "progress":
            continue
        var = option_variable(f.name)
        raw = environment.getenv(var, env)
        if raw is not None:
            out[f.name] = _coerce(f, raw, f"${var}={raw!r}")
    return out

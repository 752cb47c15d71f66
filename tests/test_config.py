"""The one configuration object: sources and their order, one-line errors naming the variable and key, the
estimator choice, the generated flags, and the README's table of variables."""

from __future__ import annotations

import argparse
import re
from dataclasses import fields
from pathlib import Path

import pytest

from lmms_emi import environment
from lmms_emi.cli._options import add_config_options
from lmms_emi.config import (
    OPTIONS_VAR,
    EMIConfig,
    EstimatorChoice,
    environment_variables,
    option_variable,
)
from lmms_emi.errors import UsageError

README = Path(__file__).resolve().parents[1] / "README.md"


def parse(argv: list[str], *, old_flags: bool = True) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_config_options(parser, EMIConfig.GROUPS, old_flags=old_flags)
    return parser.parse_args(argv)


def test_sources_are_layered_defaults_json_variables_flags() -> None:
    env = {
        OPTIONS_VAR: '{"bootstrap": 50, "confidence": 0.9, "seed": 3}',
        "LMMS_EMI_BOOTSTRAP": "60",
        "LMMS_EMI_SEED": "4",
    }
    config = EMIConfig.from_sources(parse(["--emi-seed", "5"]), env)
    assert (config.bootstrap, config.confidence, config.seed) == (60, 0.9, 5)
    assert config.estimator_steps == 5000 and config.encoders == "paper"  # untouched defaults
    assert EMIConfig.from_sources(parse([]), {}) == EMIConfig()


def test_values_from_the_environment_are_typed() -> None:
    env = {
        "LMMS_EMI_DATA": "synthetic=/a, natural=/b",
        "LMMS_EMI_BUILTIN_TASKS": "0",
        "LMMS_EMI_JUDGE": "yes",
        "LMMS_EMI_ENTROPY_SCALE": "2.5",
        "LMMS_EMI_ESTIMATOR": "fit",
    }
    config = EMIConfig.from_sources(environ=env)
    assert config.data == ("synthetic=/a", "natural=/b")
    assert config.builtin_tasks is False and config.judge is True and config.entropy_scale == 2.5
    assert config.estimator == EstimatorChoice("fit")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({OPTIONS_VAR: "{bad"}, r"^\$LMMS_EMI_OPTIONS is not valid JSON"),
        ({OPTIONS_VAR: "[1, 2]"}, r"^\$LMMS_EMI_OPTIONS must be a JSON object of options, got list"),
        ({OPTIONS_VAR: '{"bootstrp": 5}'}, r"unknown option 'bootstrp'; did you mean 'bootstrap'\?"),
        ({OPTIONS_VAR: '{"bootstrap": "many"}'}, r"^\$LMMS_EMI_OPTIONS key 'bootstrap': expected a whole"),
        ({OPTIONS_VAR: '{"judge": 3}'}, r"^\$LMMS_EMI_OPTIONS key 'judge': expected true or false"),
        ({OPTIONS_VAR: '{"data": [1]}'}, r"key 'data': expected a list of strings"),
        ({"LMMS_EMI_BOOTSTRAP": "1.5"}, r"^\$LMMS_EMI_BOOTSTRAP='1.5': expected a whole number"),
        ({"LMMS_EMI_CONFIDENCE": "high"}, r"^\$LMMS_EMI_CONFIDENCE='high': expected a number"),
        ({"LMMS_EMI_ENCODERS": "clip"}, r"^\$LMMS_EMI_ENCODERS='clip': expected one of paper, offline"),
        ({"LMMS_EMI_JUDGE": "maybe"}, r"^\$LMMS_EMI_JUDGE='maybe': expected true or false"),
    ],
)
def test_a_malformed_value_is_one_line_naming_the_variable_and_key(env: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message) as caught:
        EMIConfig.from_sources(environ=env)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bootstrap", "-1"], "--bootstrap must be >= 0"),
        (["--confidence", "1"], r"--confidence must be in \(0, 1\)"),
        (["--entropy-scale", "nan"], "--entropy-scale must be a finite number >= 0"),
        (["--estimator-steps", "0"], "--estimator-steps must be >= 1"),
        (["--judge-timeout", "0"], "--judge-timeout must be a positive number"),
    ],
)
def test_out_of_range_values_name_the_flag(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        EMIConfig.from_sources(parse(argv), {})


def test_old_names_still_work_with_a_warning(capsys: pytest.CaptureFixture[str]) -> None:
    environment._warned.clear()
    env = {"LMMS_EMI_CACHE": "/c", OPTIONS_VAR: '{"profile": "offline", "train_steps": 7}'}
    config = EMIConfig.from_sources(parse(["--steps", "9", "--cache-dir", "off"]), env)
    assert config.encoders == "offline" and config.estimator_steps == 9 and config.embedding_cache == "off"
    assert EMIConfig.from_sources(environ=env).embedding_cache == "/c"
    err = capsys.readouterr().err
    for old, new in (
        ("LMMS_EMI_CACHE", "LMMS_EMI_EMBEDDING_CACHE"),
        ("--steps", "--estimator-steps"),
        ("'profile'", "'encoders'"),
    ):
        assert re.search(f"{re.escape(old)} is deprecated .*use {re.escape(new)}", err), err
    assert environment.getenv("LMMS_EMI_ESTIMATOR_DIR", {"LMMS_EMI_ESTIMATORS_DIR": "/d"}) == "/d"


def test_eval_takes_no_old_spelling_that_lmms_eval_owns() -> None:
    ns, rest = argparse.ArgumentParser(), None
    add_config_options(ns, EMIConfig.GROUPS, old_flags=False)
    parsed, rest = ns.parse_known_args(["--seed", "1", "--device", "cpu", "--emi-seed", "2"])
    assert rest == ["--seed", "1", "--device", "cpu"] and parsed.seed == 2


def test_underscore_spellings_are_accepted_and_hidden(capsys: pytest.CaptureFixture[str]) -> None:
    config = EMIConfig.from_sources(parse(["--emi_seed", "7", "--estimator_patience", "0", "-q"]), {})
    assert (config.seed, config.estimator_patience, config.progress) == (7, 0, False)
    parser = argparse.ArgumentParser()
    add_config_options(parser, EMIConfig.GROUPS)
    parser.print_help()
    text = capsys.readouterr().out
    assert "--emi-seed" in text and "--emi_seed" not in text and "--steps" not in text


def test_estimator_choice_is_tagged() -> None:
    assert EstimatorChoice.parse(None) == EstimatorChoice.parse("") == EstimatorChoice()
    assert EstimatorChoice.parse("paper-global") == EstimatorChoice("registered", "paper-global")
    choice = EstimatorChoice.parse("ckpt/club.safetensors")
    assert choice.kind == "file" and choice.path == Path("ckpt/club.safetensors") and choice.name is None
    with pytest.raises(UsageError, match=r"unknown estimator 'paper-glob'.*paper-global"):
        EstimatorChoice.parse("paper-glob")


def test_config_round_trips_through_json() -> None:
    config = EMIConfig(
        encoders="offline", estimator="/x.pt", data=("synthetic=/d",), entropy_scale=2.0, judge=True
    )
    again = EMIConfig.from_sources(environ={OPTIONS_VAR: config.to_json()})
    assert again == config and again.estimator.kind == "file"
    assert EMIConfig(embedding_cache="OFF").embedder_kwargs()["cache_dir"] is False


def test_readme_table_lists_every_variable_once() -> None:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Options and environment variables", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(LMMS_EMI_[A-Z_]+)` \| (`[^`]+`)? ?\|", section, flags=re.MULTILINE)
    listed = [name for name, _ in rows]
    assert sorted(listed) == sorted(environment_variables()) and len(listed) == len(set(listed))
    flags = {name: flag.strip("`") for name, flag in rows if flag}
    for f in fields(EMIConfig):
        if f.name != "progress":
            assert flags[option_variable(f.name)] == f.metadata["flag"], f.name


def test_the_encoder_choices_are_the_profiles() -> None:
    """config names the encoder profiles without importing embed (torch): the same names (the estimator names:
    tests/test_mi_estimators.py)."""
    from lmms_emi.config import ENCODER_PROFILES
    from lmms_emi.embed.profiles import PROFILES

    assert list(ENCODER_PROFILES) == list(PROFILES)

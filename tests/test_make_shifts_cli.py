"""``lmms-emi make-shifts``: the command in process (files, summary, one-line errors), and end to end (slow)
the family it writes run through plain ``lmms-eval --include_path DIR ... --metrics emi`` and
``lmms-emi eval`` with lmms-eval's ``dummy`` model, giving EMI, EMID and the bounds for the user's own
benchmark."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_runs import offline_env, results_json
from test_shifts import write_jsonl_source

from lmms_emi.cli import main

BIN = Path(sys.executable).parent
EMI_OPTIONS = {"encoders": "offline", "estimator_steps": 60, "bootstrap": 40, "embedding_cache": "off"}
GRID = ["--visual", "frost_3", "--text", "KeyboardAug_3"]  # 2 x 2: id, frost_3, KeyboardAug_3, joint
TASKS = ("fam_id", "fam_KeyboardAug_3", "fam_frost_3", "fam_frost_3_KeyboardAug_3")  # the manifest's order
SIX = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins")


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("family")
    source = write_jsonl_source(root / "src", SIX)
    out = root / "fam"
    code = main(
        ["make-shifts", str(source), "--output-path", str(out), "--name", "fam", *GRID, "--workers", "0"]
    )
    assert code == 0
    return out


def test_make_shifts_writes_data_manifest_and_tasks(family, capsys):
    manifest = json.loads((family / "manifest.json").read_text())
    assert [s["task"] for s in manifest["splits"]] == list(TASKS)
    assert all(s["rows"] == len(SIX) for s in manifest["splits"])
    names = sorted(p.name for p in (family / "tasks").glob("*.yaml"))
    assert names == sorted(
        ["_base.yaml", "fam.yaml", "fam_visual.yaml", "fam_text.yaml", "fam_joint.yaml"]
        + [f"{t}.yaml" for t in TASKS]
    )
    # a rerun finds every split done and only rewrites the YAMLs
    source = manifest["source"]["source"]
    assert main(["make-shifts", source, "--output-path", str(family), "--name", "fam", *GRID]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("fam: 4 splits x 6 rows") and "(0 written, 4 already there)" in line


def test_default_name_and_bad_options_are_one_line(tmp_path, capsys):
    source = write_jsonl_source(tmp_path / "My-Bench")
    assert main(["make-shifts", str(source), "--output-path", str(tmp_path / "o"), "--visual", "--text"]) == 0
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["family"] == "source"
    capsys.readouterr()
    for args, words in (
        (["--visual", "frost_9"], "--visual frost_9: severity 9 is out of range 1-5"),
        (["--text", "sr_0"], "--text sr_0: level 0 is out of range 1-10"),
        (["--name", "9x"], "--name '9x': a family name is lower-case letters"),
        (["--image-column", "img"], "no column 'img' (--image-column"),
    ):
        out = tmp_path / f"bad{len(words)}"
        code = main(["make-shifts", str(source), "--output-path", str(out), *args])
        err = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
        assert code == 2 and len(err) == 1 and words in err[0], err
        assert not (out / "data").exists()


# ------------------------------------------------------------------------------------------- end to end
def _env(**extra: str) -> dict[str, str]:
    return offline_env({**EMI_OPTIONS, "device": "cpu"}, **extra)


def _results(out: Path) -> dict:
    return results_json(out)


def _check_family_numbers(results: dict) -> None:
    entries = results["results"]
    report = json.loads(Path(results["lmms_emi"]["reports"]["emi_report_fam_id"]["json"]).read_text())
    kinds = {t["task"]: t["shift_kind"] for t in report["tasks"]}
    assert kinds == {"fam_id": "id", "fam_KeyboardAug_3": "text", "fam_frost_3": "visual",
                     "fam_frost_3_KeyboardAug_3": "joint"}  # fmt: skip
    id_emi = entries["fam_id"]["emi,none"]
    assert math.isfinite(id_emi)
    for task in TASKS[1:]:
        entry = entries[task]
        assert math.isfinite(entry["emi,none"]), task
        assert entry["emid,none"] == pytest.approx(id_emi - entry["emi,none"]), task
        assert math.isfinite(entry["emid_bound,none"]) and entry["emid_bound,none"] > 0, task


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_family_through_plain_lmms_eval(family, tmp_path):
    """Plain lmms-eval through the hook: ``--include_path DIR --tasks <the family's tasks> --metrics emi``
    with the family's ID task named: EMI per task, EMID = EMI(ID) - EMI(task), the bounds."""
    out = tmp_path / "plain"
    cmd = [
        str(BIN / "lmms-eval"), "--model", "dummy", "--model_args", "response=It shows a coffee cup.",
        "--tasks", ",".join(TASKS), "--metrics", "emi", "--include_path", str(family),
        "--output_path", str(out),
    ]  # fmt: skip
    _run(cmd, tmp_path, _env(LMMS_EMI_ID_TASK="fam_id"))
    _check_family_numbers(_results(out))


@pytest.mark.slow
def test_family_through_lmms_emi_eval(family, tmp_path):
    out = tmp_path / "launcher"
    cmd = [
        str(BIN / "lmms-emi"), "eval", "--model", "dummy", "--model_args", "response=It shows a coffee cup.",
        "--tasks", ",".join(TASKS), "--metrics", "emi", "--emi-id-task", "fam_id",
        "--include_path", str(family), "--output_path", str(out), "--no_builtin_tasks",
    ]  # fmt: skip
    _run(cmd, tmp_path, _env())
    _check_family_numbers(_results(out))


@pytest.mark.slow
def test_family_group_through_plain_lmms_eval(family, tmp_path):
    """The issue's command as written: ``--tasks <family> --metrics emi``, no ID task named: the family's
    YAMLs name it, and the group is scored as its tasks."""
    out = tmp_path / "group"
    cmd = [
        str(BIN / "lmms-eval"), "--model", "dummy", "--model_args", "response=It shows a coffee cup.",
        "--tasks", "fam", "--metrics", "emi", "--include_path", str(family), "--output_path", str(out),
    ]  # fmt: skip
    _run(cmd, tmp_path, _env())
    results = _results(out)
    _check_family_numbers(results)
    # the leaderboard ranks the family's run, its EMID split by the kinds the YAMLs record
    board = tmp_path / "board"
    assert main(["leaderboard", str(out), "--output-path", str(board)]) == 0
    row = json.loads((board / "leaderboard.json").read_text())["rows"][0]
    entries = results["results"]
    assert row["emid_visual"] == pytest.approx(entries["fam_frost_3"]["emid,none"])
    assert row["emid_text"] == pytest.approx(entries["fam_KeyboardAug_3"]["emid,none"])


def test_without_the_shift_packages_it_is_one_line(tmp_path, capsys, monkeypatch):
    """``pip install lmms-emi`` without the ``shifts`` extra: make-shifts and demo-data say what to install,
    in one line, before any work."""
    import importlib.util

    real = importlib.util.find_spec
    hidden = lambda name, *a: None if name == "nlpaug" else real(name, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", hidden)
    for args in (["make-shifts", str(tmp_path / "src.jsonl"), "--output-path", str(tmp_path / "o")],
                 ["demo-data", str(tmp_path / "demo")]):  # fmt: skip
        assert main(args) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert "nlpaug" in line and "pip install 'lmms-emi[shifts]'" in line
        assert not (tmp_path / "o").exists() and not (tmp_path / "demo" / "dataset").exists()

"""lmms_emi.report: files exist, agree with the analysis numbers, and are written atomically."""

from __future__ import annotations

import csv
import json
import math

import pytest
from helpers_analysis import ID_TASK, shifted_tasks, small_club
from PIL import Image

from lmms_emi._io import atomic_write
from lmms_emi.pipeline import EstimatorInfo, analyze_shift
from lmms_emi.report import CSV_COLUMNS, robustness_summary, to_markdown, write_report


@pytest.fixture(scope="module")
def analysis():
    tasks = shifted_tasks(5)
    est = EstimatorInfo("fitted", "/x/club_fitted.safetensors", "run", {"vision": {}}, None, "fitted here")
    res = analyze_shift(tasks, ID_TASK, small_club(), n_resamples=30, seed=2, entropy_scale=1.5)
    return res.with_context(estimator=est, metadata={"model": "demo-model"})


def _float(cell: str) -> float | None:
    return float(cell) if cell else None


def test_files_and_consistency(tmp_path, analysis):
    paths = write_report(analysis, tmp_path, prefix="rep")
    assert {k: p.name for k, p in paths.items()} == {
        "json": "rep.json",
        "csv": "rep.csv",
        "markdown": "rep.md",
        "png": "rep.png",
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep.csv", "rep.json", "rep.md", "rep.png"]

    data = json.loads(paths["json"].read_text())
    assert {k: v for k, v in data.items() if k != "summary"} == analysis.to_dict()
    assert data["summary"]["model"] == "demo-model"
    assert data["summary"]["pearson_r"] == analysis.correlation.pearson_r

    with open(paths["csv"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [r["task"] for r in rows] == [t.task for t in analysis.tasks]
    for row, t in zip(rows, analysis.tasks, strict=True):
        assert row["shift_kind"] == t.shift_kind and int(row["n"]) == t.n
        for name in ("emi", "emid", "bound", "bound_theorem", "partial_bound", "jsd_visual", "jsd_text"):
            assert _float(row[name]) == getattr(t, name)  # repr round-trips floats exactly
        assert (_float(row["emi_ci_low"]), _float(row["emi_ci_high"])) == t.emi_ci
        if t.emid_ci is not None:
            assert (_float(row["emid_ci_low"]), _float(row["emid_ci_high"])) == t.emid_ci

    md = paths["markdown"].read_text()
    summary = robustness_summary(analysis)
    assert f"| demo-model | {summary['id_emi']:.4f} [" in md
    assert f"r = {analysis.correlation.pearson_r:.3f}" in md
    for t in analysis.tasks:
        assert f"| `{t.task}` | {t.shift_kind} | {t.n} |" in md
    assert "comparable: run" in md

    with Image.open(paths["png"]) as im:
        assert im.format == "PNG" and im.size[0] >= 600 and im.size[1] >= 400


def test_summary_numbers(analysis):
    s = robustness_summary(analysis)
    emids = [t.emid for t in analysis.ood_tasks]
    assert s["mean_emid"] == pytest.approx(sum(emids) / len(emids))
    assert s["worst_emid"] == max(emids)
    assert s["worst_emid_task"] == max(analysis.ood_tasks, key=lambda t: t.emid).task
    assert s["id_emi"] == analysis.task(ID_TASK).emi and s["n_ood_tasks"] == 5


def test_report_without_correlation(tmp_path):
    tasks = shifted_tasks(1)
    res = analyze_shift(tasks, ID_TASK, small_club(), n_resamples=0)
    paths = write_report(res, tmp_path)
    md = paths["markdown"].read_text()
    assert "not computed (fewer than 3 OOD tasks with EMID)" in md
    data = json.loads(paths["json"].read_text())
    assert data["correlations"]["bound"] is None and data["summary"]["pearson_r"] is None
    assert Image.open(paths["png"]).format == "PNG"
    # no references at all: EMI columns empty, partial bound still there
    res = analyze_shift(shifted_tasks(3, references=False), ID_TASK, small_club(), n_resamples=0)
    paths = write_report(res, tmp_path / "norefs")
    rows = list(csv.DictReader(open(paths["csv"], newline="")))
    assert all(r["emi"] == "" for r in rows) and all(r["partial_bound"] for r in rows[1:])
    assert "–" in to_markdown(res)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")

    def failing(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, failing)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
    atomic_write(target, lambda tmp: tmp.write_text("new"))
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_json_has_no_nan(tmp_path):
    # a constant bound makes the correlation undefined: NaN must come out as null, not invalid JSON
    tasks = shifted_tasks(3)
    res = analyze_shift(tasks, ID_TASK, small_club(), n_resamples=0)
    from dataclasses import replace

    from lmms_emi.pipeline import correlate

    const = correlate([0.1, 0.2, 0.3], [1.0, 1.0, 1.0])
    res = replace(res, correlations={"bound": const, "partial_bound": None})
    assert math.isnan(res.correlation.pearson_r)
    paths = write_report(res, tmp_path)
    text = paths["json"].read_text()
    assert "NaN" not in text and json.loads(text)["correlations"]["bound"]["pearson_r"] is None


def test_atomic_write_keeps_mode_or_uses_the_umask(tmp_path) -> None:
    """A rewritten file keeps its mode (lmms-eval's results JSON is 0644); a new one gets the umask's, not the
    0600 of the temp file it was written through."""
    import os
    import stat

    from lmms_emi._io import atomic_write_text

    old = os.umask(0o022)
    try:
        new = atomic_write_text(tmp_path / "new.json", "{}")
        assert stat.S_IMODE(new.stat().st_mode) == 0o644
        existing = tmp_path / "results.json"
        existing.write_text("{}")
        existing.chmod(0o640)
        atomic_write_text(existing, '{"x": 1}')
        assert stat.S_IMODE(existing.stat().st_mode) == 0o640 and existing.read_text() == '{"x": 1}'
    finally:
        os.umask(old)


def test_the_figure_is_deterministic(tmp_path):
    """Two draws of one figure give the same PNG bytes; a folder that is not there is an error, not a skip."""
    from lmms_emi.figure import ScatterFigure, draw

    figure = ScatterFigure(
        (0.3, 0.5, 0.9), (0.01, 0.05, 0.02), ("visual", "text", "joint"), "model: EMID\nr", "bound", "EMID"
    )
    draw(figure, tmp_path / "a.png")
    draw(figure, tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert (tmp_path / "a.png").read_bytes().startswith(b"\x89PNG")
    with pytest.raises(FileNotFoundError):
        draw(figure, tmp_path / "no_folder" / "x.png")

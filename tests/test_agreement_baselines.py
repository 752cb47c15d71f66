"""The judge-free baselines beside EMI in the agreement report (CLIPScore, RefCLIPScore, response-reference
cosine; Hessel et al. 2021): hand-computed values on constructed embeddings, their agreement with the win
rate, the report's rows, and an end-to-end ``lmms-emi score --judge`` against the local judge server."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from judge_server import API_KEY, MODEL, JudgeServer
from scipy import stats

from lmms_emi.cli import main
from lmms_emi.emi import TaskEmbeddings
from lmms_emi.encoder_spec import PAPER_ENCODERS
from lmms_emi.estimators.club import CLUB
from lmms_emi.judge import JudgeItem, Judgment
from lmms_emi.pipeline.agreement import JudgeRun, baseline_space, judge_run, task_baselines
from lmms_emi.report_agreement import to_csv, to_markdown


def harmonic(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def test_task_means_by_hand() -> None:
    # cos(image, response) = 0.6 and -1; cos(response, reference) = 0.8 and 1
    emb = TaskEmbeddings(
        z_v=torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]),
        z_t=torch.zeros(2, 3),
        z_model=torch.tensor([[3.0, 4.0, 0.0], [0.0, -1.0, 0.0]]),
        z_ref=torch.tensor([[0.0, 1.0, 0.0], [0.0, -5.0, 0.0]]),
    )
    got = task_baselines(emb)
    assert got["clip_score"] == pytest.approx((2.5 * 0.6 + 0.0) / 2, abs=1e-7)
    assert got["ref_clip_score"] == pytest.approx((harmonic(1.5, 0.8) + harmonic(0.0, 1.0)) / 2, abs=1e-7)
    assert got["ref_clip_score"] == pytest.approx(0.5217391304, abs=1e-7)
    assert got["response_reference_cosine"] == pytest.approx(0.9, abs=1e-7)
    no_ref = task_baselines(TaskEmbeddings(emb.z_v, emb.z_t, emb.z_model, None))
    want = {"clip_score": got["clip_score"], "ref_clip_score": None, "response_reference_cosine": None}
    assert no_ref == want
    assert set(task_baselines(TaskEmbeddings(emb.z_v, emb.z_t, None, None)).values()) == {None}


# Four tasks: every response at cosine C[i] to its image and sin θ to its reference; WR rises with the task.
COS = [0.2, -0.5, 0.6, 0.9]
WINS = [1, 2, 3, 4]  # of 4 samples: WR 0.25, 0.5, 0.75, 1.0
EMI = [0.1, 0.3, 0.2, 0.4]


def _task(c: float, g: torch.Generator) -> TaskEmbeddings:
    s = math.sqrt(1 - c * c)
    n = 4
    return TaskEmbeddings(
        z_v=torch.tensor([[1.0, 0.0, 0.0]] * n),
        z_t=torch.randn(n, 3, generator=g),
        z_model=torch.tensor([[c, s, 0.0]] * n),
        z_ref=torch.tensor([[0.0, 1.0, 0.0]] * n),
    )


@pytest.fixture(scope="module")
def analysis():
    g = torch.Generator().manual_seed(0)
    tasks = [f"own_{i}" for i in range(4)]
    embeddings = {t: _task(c, g) for t, c in zip(tasks, COS, strict=True)}
    judgments = {
        t: [Judgment(t, d, 5, 9 if d < w else 3) for d in range(4)] for t, w in zip(tasks, WINS, strict=True)
    }
    items = {t: [JudgeItem(t, d, "q", "ref", "resp") for d in range(4)] for t in tasks}
    club = CLUB(3, 3, 8).fit(torch.randn(64, 3, generator=g), torch.randn(64, 3, generator=g), steps=3,
                             progress=False)  # fmt: skip
    return judge_run(
        JudgeRun(judge=None, judgments=judgments, items=items),
        {},
        emi=dict(zip(tasks, EMI, strict=True)),
        kinds={},
        club=club,
        embeddings=embeddings,
        settings={"n_resamples": 50, "seed": 0},
        emi_seconds=1.0,
        encoder_spec=PAPER_ENCODERS,
    )


def test_baseline_agreement_with_the_win_rate(analysis) -> None:
    clip = [2.5 * max(c, 0.0) for c in COS]  # 0.5, 0, 1.5, 2.25
    cos_ref = [math.sqrt(1 - c * c) for c in COS]
    ref_clip = [harmonic(a, b) for a, b in zip(clip, cos_ref, strict=True)]
    for task, a, r, s in zip(analysis.tasks.values(), clip, ref_clip, cos_ref, strict=True):
        assert task.clip_score == pytest.approx(a, abs=1e-6)
        assert task.ref_clip_score == pytest.approx(r, abs=1e-6)
        assert task.response_reference_cosine == pytest.approx(s, abs=1e-6)
    wr = [w / 4 for w in WINS]
    b = analysis.baselines
    # CLIPScore ranks (2, 1, 3, 4) against (1, 2, 3, 4): ρ = 1 − 6·2 / (4·15) = 0.8, τ = (5 − 1) / 6
    assert b["clip_score"].spearman_rho == pytest.approx(0.8)
    assert b["clip_score"].kendall_tau == pytest.approx(2 / 3)
    assert b["response_reference_cosine"].spearman_rho == pytest.approx(-1.0)  # falls as WR rises
    assert b["ref_clip_score"].spearman_rho == pytest.approx(stats.spearmanr(ref_clip, wr).statistic)
    assert b["ref_clip_score"].kendall_p == pytest.approx(stats.kendalltau(ref_clip, wr).pvalue)
    assert analysis.agreement.spearman_rho == pytest.approx(stats.spearmanr(EMI, wr).statistic)  # unchanged
    lo, hi = b["clip_score"].spearman_ci
    assert lo <= 0.8 <= hi


def test_report_shows_the_baselines(analysis) -> None:
    md = to_markdown(analysis)
    rows = {line.split(" | ")[0].strip("| "): line for line in md.splitlines() if line.startswith("| ")}
    assert "| 0.800 " in rows["CLIPScore"] and "| 0.667 " in rows["CLIPScore"]
    assert "| -1.000 " in rows["cos(response, reference)"] and "RefCLIPScore" in rows
    emi_rho = stats.spearmanr(EMI, [0.25, 0.5, 0.75, 1]).statistic
    assert rows["EMI"].split(" | ")[1].startswith(f"{emi_rho:.3f}")
    assert "cross-space" in md and "`openai/clip-vit-base-patch32` (patch_mean)" in md
    assert "| `own_2` | ood | 0.2000 | 0.750 |" in md and "| 1.500 | 1.043 | 0.800 |" in md
    header, *lines = to_csv(analysis).splitlines()
    cols = header.split(",")
    assert cols[-3:] == ["clip_score", "ref_clip_score", "response_reference_cosine"]
    assert float(lines[3].split(",")[cols.index("clip_score")]) == pytest.approx(2.25, abs=1e-6)
    saved = json.loads(json.dumps(analysis.to_dict()))
    assert saved["baselines"]["clip_score"]["spearman_rho"] == pytest.approx(0.8)


def test_space_is_named_from_the_encoders() -> None:
    e5v = {"vision": {"name": "royokong/e5-v", "feature": "e5v_joint"}, "text": {"name": "royokong/e5-v"}}
    said = baseline_space(e5v)
    assert "shared image-text space" in said and "joint image-and-question" in said
    offline = {"vision": {"name": "efficientnet_lite0"}, "text": {"name": "m"}, "projection": {}}
    assert "random projection" in baseline_space(offline) and "cross-space" in baseline_space(offline)
    assert "not recorded" in baseline_space(None)


@pytest.mark.slow
def test_score_with_the_judge_reports_the_baselines(tmp_path: Path, demo_natural) -> None:
    """``lmms-emi score --judge`` on the demo data: the report's baselines are the formulas applied to the
    run's saved embeddings, and their ρ / τ are scipy's against the reported win rates."""
    out = tmp_path / "scored"
    with JudgeServer() as server:
        args = ["score", "--dataset", str(demo_natural["data"]), "--responses",
                str(demo_natural["responses"]), "--benchmark", "natural", "--output-path", str(out),
                "--encoders", "offline", "--bootstrap", "30", "--estimator-steps", "40", "--emi-cache",
                "off", "-q", "--judge", "--judge-model", MODEL,
                "--judge-base-url", server.url, "--judge-api-key", API_KEY,
                "--judge-cache", str(tmp_path / "judge_cache")]  # fmt: skip
        assert main(args) == 0
    from lmms_emi.embed.store import load_embeddings

    report = json.loads(next(out.glob("*_emi_agreement.json")).read_text())
    (emb_file,) = out.glob("*embeddings*.safetensors")
    embeddings, encoders = load_embeddings(emb_file)
    assert encoders["vision"]["name"] == "efficientnet_lite0"
    clip, wr = [], []
    for task, row in report["tasks"].items():
        e = embeddings[task]
        unit = [z.double() / z.double().norm(dim=1, keepdim=True) for z in (e.z_v, e.z_model, e.z_ref)]
        cos_v = (unit[0] * unit[1]).sum(1).numpy()
        cos_r = (unit[1] * unit[2]).sum(1).numpy()
        want = 2.5 * np.maximum(cos_v, 0)
        assert row["clip_score"] == pytest.approx(want.mean(), abs=1e-9)
        hm = [harmonic(a, max(b, 0.0)) for a, b in zip(want, cos_r, strict=True)]
        assert row["ref_clip_score"] == pytest.approx(np.mean(hm), abs=1e-9)
        assert row["response_reference_cosine"] == pytest.approx(cos_r.mean(), abs=1e-9)
        clip.append(row["clip_score"])
        wr.append(row["win_rate"])
    got = report["baselines"]["clip_score"]
    assert got["n_tasks"] == len(clip) == 5
    assert got["spearman_rho"] == pytest.approx(stats.spearmanr(clip, wr).statistic)
    assert got["kendall_tau"] == pytest.approx(stats.kendalltau(clip, wr).statistic)
    md = next(out.glob("*_emi_agreement.md")).read_text()
    assert "Does EMI tell more than a similarity score?" in md and "| RefCLIPScore |" in md
    assert "`efficientnet_lite0`" in md and "random projection" in md

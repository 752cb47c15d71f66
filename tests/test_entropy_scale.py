"""Ĥ of Theorem 4.5 estimated from token log-probabilities (``--entropy-scale estimate``): the estimator's
statistics on a distribution with a closed-form entropy, and ``lmms-emi score`` end to end on response
files that carry log-probabilities, with its refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from helpers_analysis import artifact

from lmms_emi.cli import main
from lmms_emi.emi import estimate_entropy_scale, sequence_nll

SCENARIOS = ["llava_bench_coco", "llava_bench_coco_frost_5", "llava_bench_coco_sr_7"]
FAST = ["--emi-cache", "off", "--estimator-steps", "40", "--bootstrap", "20", "-q"]


# ------------------------------------------------------------------------------------- the statistics
def test_response_nll_is_an_unbiased_estimate_of_the_sequence_entropy():
    """Sequences of 4 i.i.d. tokens from p = (0.7, 0.2, 0.1): H = 4·H(p). The mean NLL of sampled sequences
    converges to it, and the NLL of references drawn from another q estimates the cross-entropy 4·H(q, p),
    which is at least q's entropy 4·H(q)."""
    rng = np.random.default_rng(0)
    p, q, length, n = np.array([0.7, 0.2, 0.1]), np.array([0.2, 0.3, 0.5]), 4, 20_000
    entropy = -length * float((p * np.log(p)).sum())
    cross = -length * float((q * np.log(p)).sum())
    q_entropy = -length * float((q * np.log(q)).sum())
    responses = rng.choice(3, size=(n, length), p=p)
    references = rng.choice(3, size=(n, length), p=q)
    resp_nll = np.array([sequence_nll(np.log(p[s])) for s in responses])
    ref_nll = np.array([sequence_nll(np.log(p[s])) for s in references])
    stderr = resp_nll.std() / math.sqrt(n)
    assert abs(resp_nll.mean() - entropy) < 4 * stderr
    assert abs(ref_nll.mean() - cross) < 4 * ref_nll.std() / math.sqrt(n)
    assert cross > q_entropy
    # Ĥ is the largest per-query sum; at most the largest possible NLL of each part (4·ln 10 each)
    h = estimate_entropy_scale(resp_nll, ref_nll)
    assert h.value == pytest.approx((resp_nll + ref_nll).max())
    assert h.value <= 8 * math.log(10) + 1e-9
    assert h.response_nll + h.reference_nll == pytest.approx(h.value)


def test_log_probabilities_must_be_log_probabilities():
    for bad in ([0.5], [float("nan")], [-float("inf")]):
        with pytest.raises(ValueError, match="not a finite number <= 0"):
            sequence_nll(bad)
    with pytest.raises(ValueError, match="one response and one reference"):
        estimate_entropy_scale([1.0, 2.0], [1.0])


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> list[str]:
    from helpers_embed import save_tiny_clip_vision, save_tiny_xlmr, tiny_encoder_flags

    root = tmp_path_factory.mktemp("encoders")
    return tiny_encoder_flags(save_tiny_clip_vision(root / "clip"), save_tiny_xlmr(root / "xlmr"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """The demo data, each response line given the model's log-probabilities of its response and of the
    reference (seeded random values, one per whitespace token)."""
    root = tmp_path_factory.mktemp("demo")
    args = ["demo-data", str(root), "--scenarios", *SCENARIOS, "--n-images", "3"]
    assert main([*args, "--questions-per-image", "2"]) == 0
    rng = np.random.default_rng(1)
    for path in sorted((root / "responses").glob("*.jsonl")):
        lines = []
        for line in path.read_text().splitlines():
            row = json.loads(line)
            row["response_logprobs"] = (-rng.exponential(0.8, len(row["text"].split()) or 1)).tolist()
            row["reference_logprobs"] = (-rng.exponential(1.5, 12)).tolist()
            lines.append(json.dumps(row))
        path.write_text("\n".join(lines) + "\n")
    return root


def _score(demo: Path, encoders: list[str], out: Path, *extra: str) -> int:
    args = ["score", "--dataset", str(demo / "dataset"), "--responses", str(demo / "responses")]
    return main([*args, "--benchmark", "synthetic", *encoders, *FAST, "--output-path", str(out), *extra])


def _expected_entropy(responses: Path) -> float:
    sums = [
        -sum(row["response_logprobs"]) - sum(row["reference_logprobs"])
        for path in responses.glob("*.jsonl")
        for row in map(json.loads, path.read_text().splitlines())
    ]
    return max(sums)


def test_score_estimates_the_entropy_scale_and_uses_it_in_the_theorem_bound(demo, encoders, tmp_path, capsys):
    out = tmp_path / "out"
    assert _score(demo, encoders, out, "--entropy-scale", "estimate") == 0
    report = json.loads(artifact(out, "emi_report_synthetic.json").read_text())
    settings = report["settings"]
    h = settings["entropy_scale"]
    assert h == pytest.approx(_expected_entropy(demo / "responses"), rel=1e-12)
    estimate = settings["entropy_scale_estimate"]
    assert estimate["n_queries"] == 3 * 6 and estimate["value"] == h
    assert estimate["response_nll"] + estimate["reference_nll"] == pytest.approx(h)
    ood = [t for t in report["tasks"] if t["shift_kind"] != "id"]
    assert len(ood) == 2
    for t in ood:  # Ĥ(√D_v + √D_t) + 8(D_P + D_Q)^¼ on the report's own terms
        want = h * (t["jsd_visual"] ** 0.5 + t["jsd_text"] ** 0.5)
        want += 8 * (t["jsd_response_p"] + t["jsd_response_q"]) ** 0.25
        assert t["bound_theorem"] == pytest.approx(want, rel=1e-9)
    markdown = artifact(out, "emi_report_synthetic.md").read_text()
    assert "**estimate** from the model's token log-probabilities" in markdown and "theorem bound" in markdown
    assert "Ĥ (estimate, from token log-probabilities)" in capsys.readouterr().out

    # the default stays the scale-adjusted bound: no theorem form, no estimate, same EMI
    plain = tmp_path / "plain"
    assert _score(demo, encoders, plain) == 0
    base = json.loads(artifact(plain, "emi_report_synthetic.json").read_text())
    assert base["settings"]["entropy_scale"] is None and "entropy_scale_estimate" not in base["settings"]
    assert [t["emi"] for t in base["tasks"]] == [t["emi"] for t in report["tasks"]]
    assert all(t["bound_theorem"] is None for t in base["tasks"])


def _one_error_line(err: str) -> str:
    """The one error line (notes such as "lmms-emi: ... scoring those" may come before it)."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and not ln.startswith("lmms-emi: ")]
    assert len(lines) == 1 and ": error: " in lines[0], lines
    return lines[0]


def test_a_sample_without_reference_logprobs_is_named_before_anything_is_embedded(
    demo, encoders, tmp_path, capsys
):
    responses = tmp_path / "responses"
    responses.mkdir()
    for path in (demo / "responses").glob("*.jsonl"):
        (responses / path.name).write_text(path.read_text())
    target = next(responses.glob("llava_bench_coco_frost_5_*.jsonl"))
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    del rows[3]["reference_logprobs"]
    target.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    args = ["score", "--dataset", str(demo / "dataset"), "--responses", str(responses), *encoders, *FAST]
    assert main([*args, "--output-path", str(out), "--entropy-scale", "estimate"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "task 'lbshift_syn_llava_bench_coco_frost_5' doc_id 3" in line and "reference_logprobs" in line
    assert not list(out.rglob("*.json"))  # nothing was computed or written

    rows[3]["reference_logprobs"] = [-0.5, 0.25]  # a probability above 1
    target.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main([*args, "--output-path", str(out), "--entropy-scale", "estimate"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{target}:4: reference_logprobs[1] = 0.25 is not a log-probability" in line


def test_openai_style_logprobs_stand_for_response_logprobs(tmp_path):
    from lmms_emi.sources.responses import read_response_file

    path = tmp_path / "r.jsonl"
    content = {"content": [{"token": "A", "logprob": -0.25}, {"token": " cat", "logprob": -1.5}]}
    path.write_text(json.dumps({"question_id": 0, "text": "A cat", "logprobs": content}) + "\n")
    (record,) = read_response_file(path)
    assert record.response_logprobs == (-0.25, -1.5) and record.reference_logprobs is None


def test_eval_refuses_an_estimate_it_cannot_make_before_the_model_runs(capsys):
    args = ["eval", "--model", "dummy", "--tasks", "lbshift_syn_llava_bench_coco", "--encoders", "offline"]
    assert main([*args, "--entropy-scale", "estimate"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--entropy-scale estimate" in line and "generate_until" in line


def test_entropy_scale_option_spellings(monkeypatch):
    from lmms_emi.config import EMIConfig
    from lmms_emi.errors import UsageError

    assert EMIConfig(entropy_scale="Estimate").entropy_scale == "estimate"
    monkeypatch.setenv("LMMS_EMI_ENTROPY_SCALE", "3.5")
    assert EMIConfig.from_sources().entropy_scale == 3.5
    with pytest.raises(UsageError, match="expected a number or 'estimate'"):
        EMIConfig(entropy_scale="lots")

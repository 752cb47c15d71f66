"""The judge (win rate) against a real OpenAI-compatible HTTP server on 127.0.0.1 (``judge_server``): the
client's retries, exclusions, cache and checks; the agreement statistics against scipy; and end to end
through the real lmms-eval evaluator (``lmms-emi eval --judge``), ``lmms-emi analyze --judge`` and
``lmms-emi analyze`` of a samples log that already holds lmms-eval's llava-bench judge scores."""

from __future__ import annotations

import json
import shutil
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DEMO_NATURAL_SPLITS
from judge_server import API_KEY, MODEL, JudgeServer, rule_scores
from scipy import stats

from lmms_emi.cli import main
from lmms_emi.emi import TaskEmbeddings, effective_mutual_information
from lmms_emi.errors import UsageError
from lmms_emi.estimators.club import CLUB
from lmms_emi.judge import Judge, JudgeConfig, JudgeItem, Judgment, parse_scores, relative_score, win_rate
from lmms_emi.pipeline.agreement import agreement, sample_agreement, sample_contributions

REF = "a red cat sits on a green mat near the door"


def _config(server: JudgeServer, tmp_path: Path, **kw) -> JudgeConfig:
    base = dict(
        model=MODEL,
        base_url=server.url,
        api_key=API_KEY,
        cache_dir=str(tmp_path / "cache"),
        timeout=1.0,
        max_attempts=3,
        environ={},
    )
    return JudgeConfig.resolve(**{**base, **kw})


def _items(responses: list[str]) -> list[JudgeItem]:
    return [JudgeItem("t", i, "What is in the picture?", REF, r) for i, r in enumerate(responses)]


# ---------------------------------------------------------------------------------------------- client
def test_parse_scores_follows_lmms_eval_and_rejects_failures():
    assert parse_scores("7 9\nbecause") == (7.0, 9.0)
    assert parse_scores("8, 6.5") == (8.0, 6.5)
    assert parse_scores("Both fine.\n7 9") is None  # scores must be on the first line
    assert parse_scores("-1 -1") is None  # lmms-eval's failure marker is not a score
    assert parse_scores("") is None and parse_scores(None) is None


def test_retries_exclusion_cache_and_usage(tmp_path):
    responses = [
        REF,  # wins (10 > 8)
        "a dog",  # loses
        "flaky " + REF,  # 429 once, then wins
        "boom red cat green mat door",  # 500 twice, then 6 (loses)
        "slow " + REF,  # times out once, then wins
        "junk",  # malformed on every attempt: excluded
    ]

    def faults(prompt: str, attempt: int) -> str | None:
        if "flaky" in prompt and attempt == 1:
            return "429"
        if "boom" in prompt and attempt <= 2:
            return "500"
        if "slow" in prompt and attempt == 1:
            return "timeout"
        if "\njunk\n" in prompt:
            return "malformed"
        return None

    with JudgeServer(faults=faults, sleep=2.0) as server:
        judge = Judge(_config(server, tmp_path))
        out = judge.judge(_items(responses))
        assert [j.doc_id for j in out] == list(range(6))
        want = [rule_scores(REF, r) for r in responses]
        for j, (ref, model) in zip(out[:5], want[:5], strict=True):
            assert (j.ref_score, j.model_score) == (ref, model) and j.scored
        assert [j.attempts for j in out] == [1, 1, 2, 3, 2, 3]
        bad = out[5]
        assert not bad.scored and bad.win is None and "unparsable" in bad.error and bad.ref_score is None
        assert judge.stats.excluded == 1 and judge.stats.calls == server.calls == 12
        # WR over the scored samples only (the excluded one is not a -1, not a loss)
        wins = [m > r for r, m in want[:5]]
        assert win_rate(out) == pytest.approx(sum(wins) / 5)
        assert relative_score(out) == pytest.approx(100 * np.mean([m for _, m in want[:5]]) / 8)
        assert all(j.prompt_tokens and j.completion_tokens for j in out[:5])
        assert judge.stats.usage_reported == 12 - 4  # failed HTTP calls carry no usage
        # a rerun reads every scored sample from the cache: only the excluded one is asked again
        again = Judge(_config(server, tmp_path))
        out2 = again.judge(_items(responses))
        assert server.calls == 12 + 3 and again.stats.cache_hits == 5
        assert [(j.ref_score, j.model_score) for j in out2[:5]] == [
            (j.ref_score, j.model_score) for j in out[:5]
        ]
        assert all(j.cached for j in out2[:5])


def test_transport_retries_are_the_clients_within_the_attempt_budget(tmp_path):
    """``max_attempts`` N: at most N calls per sample. The ``openai`` client retries a 429 / 5xx itself and
    waits what the server's Retry-After asks; a sample still failing after N calls is excluded with the
    status; with N = 1 nothing is retried."""

    def faults(prompt: str, attempt: int) -> str | None:
        if "zzdown" in prompt:
            return "500"
        return "429" if "zzbusy" in prompt and attempt == 1 else None

    with JudgeServer(faults=faults, retry_after_ms=300) as server:
        judge = Judge(_config(server, tmp_path, max_attempts=2, cache_dir="off"))
        started = time.perf_counter()
        busy = judge.judge_one(JudgeItem("t", 0, "Q?", REF, "zzbusy " + REF))
        assert busy.scored and busy.attempts == 2 and time.perf_counter() - started >= 0.3
        down = judge.judge_one(JudgeItem("t", 1, "Q?", REF, "zzdown"))
        assert not down.scored and down.error == "HTTP 500 (attempt 2 of 2)" and down.attempts == 2
        stats = judge.stats
        assert (stats.calls, stats.retries, stats.excluded) == (4, 2, 1) and server.calls == 4
        once = Judge(_config(server, tmp_path, max_attempts=1, cache_dir="off"))
        assert once.judge_one(JudgeItem("t", 2, "Q?", REF, "zzdown")).attempts == 1 and server.calls == 5


def test_cache_folder_is_the_user_cache_unless_overridden(tmp_path, monkeypatch):
    monkeypatch.delenv("LMMS_EMI_JUDGE_CACHE", raising=False)
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert JudgeConfig().cache_path() == tmp_path / "xdg" / "lmms_emi" / "judge"
    monkeypatch.setenv("LMMS_EMI_JUDGE_CACHE", str(tmp_path / "env"))
    assert JudgeConfig().cache_path() == tmp_path / "env"
    assert JudgeConfig(cache_dir=str(tmp_path / "opt")).cache_path() == tmp_path / "opt"
    assert JudgeConfig(cache_dir="off").cache_path() is None


def test_cache_is_keyed_by_model_and_prompt(tmp_path):
    with JudgeServer() as server:
        Judge(_config(server, tmp_path)).judge(_items([REF]))
        files = list((tmp_path / "cache").rglob("*.json"))
        assert len(files) == 1 and not list((tmp_path / "cache").rglob("*.tmp"))
        other_model = Judge(_config(server, tmp_path, model="other"))
        assert other_model.judge(_items([REF]))[0].error  # another model is not served from this cache
        assert Judge(_config(server, tmp_path, cache_dir="off")).judge(_items([REF]))[0].attempts == 1


def test_concurrency_limit(tmp_path):
    import threading

    live, peak, lock = [0], [0], threading.Lock()

    def faults(prompt: str, attempt: int) -> None:
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        time.sleep(0.3)
        with lock:
            live[0] -= 1

    with JudgeServer(faults=faults) as server:
        out = Judge(_config(server, tmp_path, concurrency=3, cache_dir="off")).judge(
            _items([f"{REF} {i}" for i in range(9)])
        )
    assert all(j.scored for j in out) and 2 <= peak[0] <= 3  # concurrent, never above the limit


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"api_key": ""}, "no API key"),
        ({"api_key": "wrong"}, "API key was refused"),
        ({"model": "gpt-unknown"}, "unknown model"),
        ({"base_url": "http://127.0.0.1:9/v1"}, "not reachable"),
        ({"base_url": "ftp://x"}, r"not an http\(s\) URL"),
    ],
)
def test_check_fails_as_one_line(tmp_path, change, words):
    with JudgeServer() as server:
        with pytest.raises(UsageError, match=words) as info:
            Judge(_config(server, tmp_path, **change)).check()
        assert "\n" not in str(info.value) and server.calls == 0


def test_check_probes_when_the_endpoint_lists_no_models(tmp_path):
    with JudgeServer(list_models=False) as server:
        Judge(_config(server, tmp_path)).check()
        assert server.calls == 1  # the 1-token probe
        with pytest.raises(UsageError, match="HTTP 404"):
            Judge(_config(server, tmp_path, model="gpt-unknown")).check()


def test_environment_fallbacks():
    env = {"OPENAI_API_KEY": "k", "OPENAI_API_URL": "http://h:1/v1/chat/completions", "MODEL_VERSION": "m"}
    c = JudgeConfig.resolve(environ=env)
    assert (c.api_key, c.base_url, c.model) == ("k", "http://h:1/v1", "m")
    assert "api_key" not in c.to_dict()
    c = JudgeConfig.resolve(api_key="x", model="y", base_url="http://z/v1/", environ=env)
    assert (c.api_key, c.base_url, c.model) == ("x", "http://z/v1", "y")
    with pytest.raises(UsageError, match="concurrency"):
        JudgeConfig(concurrency=0)


# ---------------------------------------------------------------------------------------------- statistics
def test_agreement_equals_scipy():
    rng = np.random.default_rng(0)
    emi = rng.normal(size=12)
    wr = np.clip(0.5 + 0.3 * emi + rng.normal(scale=0.2, size=12), 0, 1)
    a = agreement(emi, wr, n_resamples=300, seed=1)
    sr, kt = stats.spearmanr(emi, wr), stats.kendalltau(emi, wr)
    assert (a.spearman_rho, a.spearman_p) == (pytest.approx(sr.statistic), pytest.approx(sr.pvalue))
    assert (a.kendall_tau, a.kendall_p) == (pytest.approx(kt.statistic), pytest.approx(kt.pvalue))
    assert a.spearman_ci[0] <= a.spearman_rho <= a.spearman_ci[1]
    assert a.kendall_ci[0] <= a.kendall_tau <= a.kendall_ci[1]
    assert agreement(emi, wr, n_resamples=300, seed=1) == a  # deterministic for a seed
    assert agreement(emi, wr, n_resamples=0).spearman_ci is None
    assert agreement(emi[:2], wr[:2]) is None


def test_sample_contributions_average_to_emi():
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(40, 8, generator=g) for _ in range(4)]
    club = CLUB(8, 8, 16).fit(
        torch.randn(300, 8, generator=g), torch.randn(300, 8, generator=g), steps=30, progress=False
    )
    emb = TaskEmbeddings(*z)
    e = sample_contributions(club, emb)
    assert e.shape == (40,)
    assert e.mean() == pytest.approx(effective_mutual_information(club, *emb).emi, abs=1e-5)


def test_sample_agreement_auc_and_pointbiserial():
    e = np.array([0.1, 0.5, -0.3, 0.9, -0.8, 0.2])
    d = np.array([1.0, 2.0, -1.0, 0.0, -3.0, 1.0])
    s = sample_agreement(e, d)
    wins = d > 0
    assert s.n_wins == 3
    assert s.spearman_rho == pytest.approx(stats.spearmanr(e, d).statistic)
    assert s.pointbiserial_r == pytest.approx(stats.pearsonr(wins.astype(float), e).statistic)
    pairs = [(a > b) + 0.5 * (a == b) for a in e[wins] for b in e[~wins]]
    assert s.auc == pytest.approx(np.mean(pairs))
    assert sample_agreement(e, np.ones(6)).auc is None  # one class only


# ---------------------------------------------------------------------------------------------- end to end
SPLITS = [
    "llava_bench_coco_English",
    "llava_bench_coco_German",
    "llava_bench_in_the_wild_easy_English",
    "llava_bench_in_the_wild_normal_English",
    "llava_bench_in_the_wild_hard_English",
]
TASKS = ["lbshift_nat_" + s for s in SPLITS]
COMMON = ["--encoders", "offline", "--bootstrap", "30", "--estimator-steps", "40", "--emi-cache", "off", "-q"]


def _kind(prompt: str) -> int:
    return zlib.crc32(prompt.encode()) % 8


def _faults(prompt: str, attempt: int) -> str | None:
    """Some samples fail once (429 / 500 / timeout); kind-0 samples are malformed on the first two attempts,
    so a run with --judge-max-attempts 2 excludes them and a later run scores them."""
    kind = _kind(prompt)
    if kind == 0 and attempt <= 2:
        return "malformed"
    if attempt == 1:
        return {1: "429", 2: "500", 3: "timeout"}.get(kind)
    return None


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, demo_natural):
    assert tuple(SPLITS) == DEMO_NATURAL_SPLITS  # the shared demo data (conftest), read only
    root = tmp_path_factory.mktemp("judge_e2e")
    with JudgeServer(faults=_faults, sleep=2.5) as server:
        yield {
            "root": root,
            "data": demo_natural["data"],
            "responses": demo_natural["responses"],
            "server": server,
        }


def _judge_args(server: JudgeServer, root: Path) -> list[str]:
    return ["--judge", "--judge-model", MODEL, "--judge-base-url", server.url, "--judge-api-key", API_KEY,
            "--judge-cache", str(root / "judge_cache"), "--judge-timeout", "1.5",
            "--judge-max-attempts", "2"]  # fmt: skip


def _eval_args(e2e: dict, out: Path) -> list[str]:
    return ["eval", "--tasks", ",".join(TASKS), "--model", "emi_replay", "--model_args",
            f"responses={e2e['responses']},model_name=demo-model", "--data", f"natural={e2e['data']}",
            "--output_path", str(out), "--log_samples", "--no_builtin_tasks", *COMMON]  # fmt: skip


def _logged(out: Path) -> dict[str, list[dict]]:
    """Each task's EMI records from the samples logs, by doc_id."""
    records = {}
    for task in TASKS:
        (path,) = out.rglob(f"*_samples_{task}.jsonl")
        rows = [json.loads(line)["emi"] for line in path.read_text().splitlines() if line.strip()]
        records[task] = sorted(rows, key=lambda r: r["doc_id"])
    return records


def _expected(records: list[dict], *, exclude_kind0: bool) -> tuple[float, float, int]:
    """(WR, relative score, excluded) of a task straight from the server's rule."""
    from lmms_emi.judge import build_prompt

    scores = [
        rule_scores(r["reference"], r["response"])
        for r in records
        if not (exclude_kind0 and _kind(build_prompt(r["question"], r["reference"], r["response"])) == 0)
    ]
    wr = float(np.mean([m > ref for ref, m in scores]))
    rel = 100 * float(np.mean([m for _, m in scores])) / float(np.mean([ref for ref, _ in scores]))
    return wr, rel, len(records) - len(scores)


@pytest.fixture(scope="module")
def judged_run(e2e):
    out = e2e["root"] / "out"
    server = e2e["server"]
    assert main([*_eval_args(e2e, out), *_judge_args(server, e2e["root"])]) == 0
    (results_file,) = out.rglob("*_results.json")
    return out, json.loads(results_file.read_text()), server.calls


@pytest.mark.slow
def test_eval_win_rates_and_agreement_match_the_rule_and_scipy(e2e, judged_run):
    out, results, _calls = judged_run
    records = _logged(out)
    excluded_total = 0
    emi, wr = [], []
    for task in TASKS:
        entry = results["results"][task]
        want_wr, want_rel, excluded = _expected(records[task], exclude_kind0=True)
        assert entry["winrate,none"] == pytest.approx(want_wr)
        assert entry["relative_score,none"] == pytest.approx(want_rel)
        assert entry["judge_excluded,none"] == excluded
        assert entry["judge_scored,none"] + excluded == len(records[task])
        excluded_total += excluded
        emi.append(entry["emi,none"])
        wr.append(entry["winrate,none"])
    assert excluded_total >= 1  # the data has malformed-answer samples: the exclusion path ran
    judge = results["lmms_emi"]["judge"]
    assert judge["n_excluded"] == excluded_total
    assert "api_key" not in json.dumps(results["lmms_emi"]) and API_KEY not in json.dumps(results)
    a = judge["agreement"]
    assert a["n_tasks"] == len(TASKS)
    order = [TASKS.index(t) for t in a["tasks"]]
    x, y = [emi[i] for i in order], [wr[i] for i in order]
    assert a["spearman_rho"] == pytest.approx(stats.spearmanr(x, y).statistic)
    assert a["spearman_p"] == pytest.approx(stats.spearmanr(x, y).pvalue)
    assert a["kendall_tau"] == pytest.approx(stats.kendalltau(x, y).statistic)
    assert judge["cost"]["tokens_per_sample"] > 0 and judge["cost"]["emi_seconds"] > 0
    # the agreement report beside the results
    (md,) = out.rglob("*_emi_agreement.md")
    text = md.read_text()
    assert "Spearman ρ" in text and "excluded" in text and "tokens per sample" in text
    (png,) = out.rglob("*_emi_agreement.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    report = json.loads(next(out.rglob("*_emi_agreement.json")).read_text())
    assert sum(len(v) for v in report["judgments"].values()) == sum(len(r) for r in records.values())


@pytest.mark.slow
def test_analyze_judge_rescores_only_what_was_excluded(e2e, judged_run, capsys):
    """A judge outage loses nothing: `analyze --judge` scores the run's logged samples later; the cache
    answers every sample scored before, so only the excluded ones are sent again."""
    out, results, calls = judged_run
    server = e2e["server"]
    excluded = results["lmms_emi"]["judge"]["n_excluded"]
    post = e2e["root"] / "post"
    args = ["analyze", str(out), *COMMON, *_judge_args(server, e2e["root"]), "--output-path", str(post)]
    assert main(args) == 0
    assert server.calls - calls == excluded  # third attempt of each excluded sample, nothing else
    assert "judge:" in capsys.readouterr().out
    report = json.loads(next(post.glob("*_emi_agreement.json")).read_text())
    records = _logged(out)
    for task in TASKS:
        want_wr, _rel, _ = _expected(records[task], exclude_kind0=False)
        assert report["tasks"][task]["win_rate"] == pytest.approx(want_wr)
        assert report["tasks"][task]["n_excluded"] == 0
    calls = server.calls
    assert main(args) == 0 and server.calls == calls  # now everything is cached: no call at all


@pytest.mark.slow
def test_analyze_reads_lmms_eval_judge_scores_from_the_log(e2e, judged_run):
    """`gpt_eval_llava_*` verdicts in the samples log (lmms-eval's llava-bench judge) give the win rate
    without a judge; lmms-eval's -1 failure marker is an excluded sample, not a score."""
    out, _results, _calls = judged_run
    server = e2e["server"]
    copy = e2e["root"] / "logged"
    shutil.copytree(out, copy)
    want: dict[str, list[Judgment]] = {}
    for task in TASKS:
        (path,) = copy.rglob(f"*_samples_{task}.jsonl")
        lines = []
        for i, line in enumerate(path.read_text().splitlines()):
            obj = json.loads(line)
            rec = obj["emi"]
            scores = [-1, -1] if (task == TASKS[1] and i == 0) else [6, len(rec["response"].split()) % 10]
            obj["gpt_eval_llava_all"] = {"scores": scores, "ans1": rec["reference"], "ans2": rec["response"]}
            obj["gpt_eval_llava_conv"] = {"scores": [-999, -999]}
            want.setdefault(task, []).append(
                Judgment(
                    task,
                    rec["doc_id"],
                    *(scores if scores[0] >= 0 else (None, None)),
                    error=None if scores[0] >= 0 else "failed",
                    source="log",
                )
            )
            lines.append(json.dumps(obj))
        path.write_text("\n".join(lines) + "\n")
    calls = server.calls
    post = e2e["root"] / "post_logged"
    assert main(["analyze", str(copy), *COMMON, "--output-path", str(post)]) == 0
    assert server.calls == calls  # no judge was asked
    report = json.loads(next(post.glob("*_emi_agreement.json")).read_text())
    for task in TASKS:
        t = report["tasks"][task]
        assert t["source"] == "log"
        assert t["win_rate"] == pytest.approx(win_rate(want[task]))
        assert t["n_excluded"] == (1 if task == TASKS[1] else 0)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "words"),
    [(["--judge-model", "gpt-unknown"], "unknown model"), (["--judge-api-key", "wrong"], "refused")],
)
def test_misconfigured_judge_fails_before_generation(e2e, tmp_path, capsys, change, words):
    server = e2e["server"]
    calls = server.calls
    out = tmp_path / "out"
    code = main([*_eval_args(e2e, out), *_judge_args(server, tmp_path), *change])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lmms-emi") and ": error: " in line]
    assert code == 2 and len(lines) == 1 and words in lines[0] and "Traceback" not in err
    assert server.calls == calls and not list(out.rglob("*_results.json"))  # nothing generated


@pytest.mark.slow
def test_score_judge_win_rates_match_the_rule(e2e, tmp_path):
    """``lmms-emi score --judge`` (response files, no lmms-eval run) gives the same per-task win rates as
    the server's rule, in the agreement report beside the EMI report."""
    from lmms_emi.sources.responses import read_response_file

    server = e2e["server"]
    splits = SPLITS[:2]
    out = tmp_path / "scored"
    args = ["score", "--dataset", str(e2e["data"]), "--responses", str(e2e["responses"]), "--benchmark",
            "natural", "--scenarios", *splits, "--output-path", str(out), *COMMON,
            *_judge_args(server, tmp_path), "--judge-max-attempts", "3"]  # fmt: skip
    assert main(args) == 0
    (agreement,) = out.glob("*_emi_agreement.json")
    report = json.loads(agreement.read_text())
    import datasets

    for split in splits:
        rows = datasets.load_from_disk(str(e2e["data"]))[split]
        saved = read_response_file(e2e["responses"] / f"{split}_demo-model.jsonl")
        answers = {r.question_id: r.text for r in saved}
        pairs = zip(rows["question_id"], rows["reference_answer"], strict=True)
        scores = [rule_scores(ref, answers[q]) for q, ref in pairs]
        want = float(np.mean([m > ref for ref, m in scores]))
        task = f"lbshift_nat_{split}"
        assert report["tasks"][task]["win_rate"] == pytest.approx(want), task

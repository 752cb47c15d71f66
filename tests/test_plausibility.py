"""Issue 17: every published number sane, every failure one line — corrupt estimators refused on load and
at analysis (the plausibility range of lmms_emi.emi.implausible), texts cut before tokenization (memory
bounded by the encoder), train-estimator refusing degenerate embeddings."""

from __future__ import annotations

import math

import pytest
import torch
from helpers_analysis import ID_TASK, shifted_tasks, small_club, unit

from lmms_emi import emi as emi_lib
from lmms_emi.errors import EXIT_FAILED, CheckpointError, ImplausibleResultError
from lmms_emi.estimators.checkpoint import MANIFEST_KEY, MU_NORM_LIMIT, probe_batch
from lmms_emi.estimators.club import CLUB
from lmms_emi.pipeline.estimator import EstimatorInfo
from lmms_emi.pipeline.shift import analyze_shift


def _flip_exponent_bits(t: torch.Tensor, positions: list[int], bit: int = 30) -> torch.Tensor:
    """A copy of float32 ``t`` with bit ``bit`` (30: the top exponent bit) of the given entries flipped."""
    out = t.detach().clone().contiguous()
    raw = out.view(-1).view(torch.int32)
    for p in positions:
        raw[p] ^= 1 << bit
    return out


def _reference_state(reference_checkpoint) -> dict[str, torch.Tensor]:
    return torch.load(reference_checkpoint, map_location="cpu", weights_only=True)


# -- 1. on load ------------------------------------------------------------------------------------------
def test_flipped_exponent_bits_in_the_papers_plain_state_dict_are_refused_on_load(
    tmp_path, reference_checkpoint
):
    state = _reference_state(reference_checkpoint)
    state["p_mu.2.weight"] = _flip_exponent_bits(state["p_mu.2.weight"], [11, 5_000, 90_001])
    broken = tmp_path / "CLUB_global_flipped.pt"
    torch.save(state, broken)
    assert all(torch.isfinite(t).all() for t in state.values())  # no NaN: only the outputs tell
    with pytest.raises(CheckpointError) as info:
        CLUB.from_checkpoint(broken)
    message = str(info.value)
    assert "\n" not in message and str(broken) in message and "|μ| =" in message
    CLUB.from_checkpoint(reference_checkpoint)  # the intact file still loads


def test_bits_flipped_to_inf_or_nan_are_refused_naming_the_tensor(tmp_path, reference_checkpoint):
    state = _reference_state(reference_checkpoint)
    state["p_logvar.2.bias"] = state["p_logvar.2.bias"].clone()
    state["p_logvar.2.bias"][3] = math.inf
    broken = tmp_path / "inf.pt"
    torch.save(state, broken)
    with pytest.raises(
        CheckpointError, match=r"inf\.pt: tensor p_logvar\.2\.bias contains NaN or inf"
    ) as info:
        CLUB.from_checkpoint(broken)
    assert "\n" not in str(info.value)


def test_a_legacy_manifest_without_checksum_gets_the_same_probe(tmp_path, reference_checkpoint):
    import json

    from safetensors.torch import save_file

    club = CLUB.from_checkpoint(reference_checkpoint)
    manifest = json.loads(club.make_manifest({"text": {"dim": 768}}).to_json())
    manifest["tensors_sha256"] = ""  # written before the checksum existed
    state = {k: v.contiguous() for k, v in club.state_dict().items()}
    state["p_mu.2.bias"] = _flip_exponent_bits(state["p_mu.2.bias"], [7])
    legacy = tmp_path / "legacy.safetensors"
    save_file(state, str(legacy), metadata={MANIFEST_KEY: json.dumps(manifest)})
    with pytest.raises(CheckpointError) as info:
        CLUB.from_checkpoint(legacy)
    assert "\n" not in str(info.value) and "legacy.safetensors" in str(info.value)


def test_a_flip_the_tanh_absorbs_still_loads_and_analyses_sanely(tmp_path, reference_checkpoint):
    """Bits flipped in the log σ² head's output layer are harmless (its tanh keeps log σ² in [−1, 1]): the
    probe lets them through, and the numbers stay within their range."""
    state = _reference_state(reference_checkpoint)
    state["p_logvar.2.weight"] = _flip_exponent_bits(state["p_logvar.2.weight"], [1, 2])
    odd = tmp_path / "odd.pt"
    torch.save(state, odd)
    CLUB.from_checkpoint(odd)


def test_the_probe_batch_is_seeded_unit_vectors():
    a, b = probe_batch(768), probe_batch(768)
    assert torch.equal(a, b) and torch.allclose(a.norm(dim=1), torch.ones(a.shape[0]))


# -- 1. the derivation holds ---------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [0.1, 3.0, 30.0])
def test_every_estimate_and_bootstrap_replicate_lies_within_the_derived_limit(scale):
    """|Î| ≤ (e/2)(1 + max|μ|)² and |EMI| ≤ twice that, for estimators with small and large μ, on the
    estimate and on bootstrap replicates (reweighted rows)."""
    gen = torch.Generator().manual_seed(1)
    club = small_club(16, seed=3)
    with torch.no_grad():
        club.p_mu[2].weight.mul_(scale)
        club.p_mu[2].bias.mul_(scale)
        club.p_logvar[2].bias.fill_(-5.0)  # log σ² pinned near −1: the largest 1/σ²
    emb = emi_lib.TaskEmbeddings(*(unit(40, 16, gen) for _ in range(4)))
    task = emi_lib.prepare_task(club, emb)
    mu_norm = float(task.mu.to(torch.float64).norm(dim=1).max())
    limit = emi_lib.mi_limit(mu_norm)
    result = emi_lib.task_emi(task)
    assert abs(result.mi_model) <= limit and abs(result.mi_ref) <= limit and abs(result.emi) <= 2 * limit
    counts = torch.randint(0, 5, (200, 40), generator=gen)
    for mi_model, mi_ref in (task.estimate(counts), task.replicates(counts)):  # reweighted; replicates
        assert float(mi_model.abs().max()) <= limit and float(mi_ref.abs().max()) <= limit
    values = {"emi": result.emi, "mi_model": result.mi_model, "mi_ref": result.mi_ref}
    assert emi_lib.implausible(values, mu_norm=mu_norm, logvar_abs=float(task.logvar.abs().max())) is None
    assert abs(result.emi) > 1e-3  # a real value, not a trivial 0


def test_the_bounds_range_is_reached_by_the_extreme_case_and_not_exceeded():
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    p = emi_lib.TaskEmbeddings(*map(torch.tensor, ([e1, e1], [e1, e1], [e1, e1], [e2, e2])))
    q = emi_lib.TaskEmbeddings(*map(torch.tensor, ([e2, e2], [e2, e2], [e2, e2], [e1, e1])))
    full = emi_lib.emid_upper_bound(p, q)
    theorem = emi_lib.emid_upper_bound(p, q, entropy_scale=2.0)
    ln2 = math.log(2)
    assert full.value == pytest.approx(2 * ln2**0.5 + 2 * ln2**0.25)  # every D at ln 2: the top of the range
    assert emi_lib.implausible({"bound": full.value}) is None
    assert emi_lib.implausible({"bound_theorem": theorem.value}, entropy_scale=2.0) is None
    assert emi_lib.implausible({"bound": full.value * 1.001}) is not None
    assert emi_lib.implausible({"jsd_text": -0.01}) is not None


# -- 1. at analysis --------------------------------------------------------------------------------------
def test_an_estimator_with_a_huge_but_finite_mean_is_refused_at_analysis_naming_estimator_and_task():
    tasks = shifted_tasks(3)
    club = small_club(16)
    with torch.no_grad():
        club.p_mu[2].bias.fill_(1e17)  # what flipped exponent bits do; built in memory, so no load check
    with pytest.raises(ImplausibleResultError) as info:
        analyze_shift(tasks, ID_TASK, club, n_resamples=0)
    message = str(info.value)
    assert "\n" not in message and "the estimator" in message and repr(ID_TASK) in message
    assert "|μ(x)| = " in message and "limit 1e+03" in message
    assert info.value.exit_code == EXIT_FAILED


def test_an_absurd_value_from_a_loaded_estimator_is_refused_naming_its_file(monkeypatch, tmp_path):
    """A state that passes the load check but whose numbers come out absurd (here: the closed form patched to
    give −6.6e34, the value of the report in the issue) is refused before anything is published."""
    club = small_club(16)
    path = club.save(tmp_path / "club.safetensors", club.make_manifest({"text": {"dim": 16}}))
    loaded = CLUB.from_checkpoint(path)
    monkeypatch.setattr(emi_lib, "club_mutual_information", lambda *a, **k: -6.6e34)
    with pytest.raises(ImplausibleResultError) as info:
        analyze_shift(shifted_tasks(3), ID_TASK, loaded, n_resamples=0)
    message = str(info.value)
    assert "\n" not in message and "club.safetensors" in message and repr(ID_TASK) in message
    assert "-6.6e+34" in message


def test_the_estimator_info_names_the_estimator_when_given(monkeypatch):
    monkeypatch.setattr(emi_lib, "club_mutual_information", lambda *a, **k: math.nan)
    info = EstimatorInfo("registry", "/x/CLUB_global.pt", "global", name="paper-global")
    with pytest.raises(
        ImplausibleResultError, match=r"^estimator paper-global gives task .*: the EMI is NaN"
    ):
        analyze_shift(shifted_tasks(2), ID_TASK, small_club(16), n_resamples=0, estimator=info)


def test_healthy_analyses_pass_and_carry_the_estimator_info():
    info = EstimatorInfo("fitted", None, "run")
    result = analyze_shift(shifted_tasks(4), ID_TASK, small_club(16), n_resamples=50, estimator=info)
    assert result.estimator is info and all(t.emi is not None for t in result.tasks)


def test_the_limit_constant_is_generous_for_the_papers_estimator(reference_checkpoint):
    club = CLUB.from_checkpoint(reference_checkpoint)
    with torch.no_grad():
        mu, _ = club(probe_batch(768))
    assert float(mu.norm(dim=1).max()) < MU_NORM_LIMIT / 100


# -- 2. memory bounded by the encoder: texts cut before tokenization, tokens unchanged ----------------------
WORDS = "the quick brown fox jumps over a lazy dog , while people watch it ; what colour is the sky ?".split()


def _old_inputs(enc, texts: list[str]) -> dict[str, torch.Tensor]:
    """What the encoder was given before texts were cut: the tokenizer on the whole texts, truncated."""
    out = enc.tokenizer(texts, padding=True, truncation=True, max_length=enc.max_length, return_tensors="pt")
    return {k: v for k, v in out.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


@pytest.fixture(scope="module")
def minilm():
    from lmms_emi.embed.embedder import Embedder

    return Embedder.from_profile("offline", cache_dir=False, progress=False).text  # real WordPiece tokenizer


@pytest.fixture(scope="module")
def tiny_xlmr(tmp_path_factory):
    from helpers_embed import save_tiny_xlmr

    from lmms_emi.embed.encoders.hf_text import HFText

    return HFText(str(save_tiny_xlmr(tmp_path_factory.mktemp("xlmr"))))  # SentencePiece Unigram, 64 tokens


def _long_texts(n_chars: int) -> dict[str, str]:
    gen = torch.Generator().manual_seed(0)
    words = [WORDS[int(i)] for i in torch.randint(len(WORDS), (n_chars // 3,), generator=gen)]
    prose = " ".join(words)[:n_chars]
    return {
        "prose": prose,
        "runs of spaces": "   ".join(words)[:n_chars],
        "tabs and newlines": "\t".join(f"{w}\n{w}" for w in words)[:n_chars],
        "no space at all": "x" * n_chars,
        "one long word then prose": "y" * (n_chars // 2) + " " + prose,
        "whitespace first": " " * n_chars + prose[:2000],
        "cjk": ("漢字かな " * n_chars)[:n_chars],
        "accents and combining marks": ("café naïve e\u0301le\u0301ve " * n_chars)[:n_chars],
        "punctuation": ("a,b.c!d?(e) " * n_chars)[:n_chars],
    }


@pytest.mark.parametrize("which", ["minilm", "tiny_xlmr"])
def test_cut_texts_give_the_same_tokens_and_bit_identical_embeddings(which, request):
    enc = request.getfixturevalue(which)
    from lmms_emi.embed.encoders.hf_text import CHARS_PER_TOKEN

    n = CHARS_PER_TOKEN * enc.max_length * 5 // 4  # long enough to be cut
    texts = _long_texts(n)
    assert enc._cut(texts["prose"]) is not None and enc._cut(texts["whitespace first"]) is None
    for name, text in texts.items():
        batch = [text, "a short question ?"]
        new = enc.prepare(batch)
        old = _old_inputs(enc, batch)
        assert new.inputs.keys() == old.keys(), name
        for key in old:
            assert torch.equal(new.inputs[key], old[key]), f"{name}: {key} differs"
        if name == "prose":  # equal inputs give equal embeddings; shown once (a 512-token forward is slow)
            assert torch.equal(enc.forward(new.inputs), enc.forward(old)), name
        whole = len(enc.tokenizer(text, truncation=False, verbose=False)["input_ids"])
        assert new.truncated == ([0] if whole > enc.max_length else []), name


def test_a_10_mb_text_embeds_bit_identically_to_its_start(minilm):
    text = " ".join(WORDS[i % len(WORDS)] for i in range(2_500_000))[:10_000_000]
    assert len(text) == 10_000_000
    new = minilm.prepare([text])
    reference = _old_inputs(minilm, [text[:100_000]])  # the old path on a start with far more than 512 tokens
    assert torch.equal(new.inputs["input_ids"], reference["input_ids"])
    assert torch.equal(minilm.forward(new.inputs), minilm.forward(reference))
    assert new.truncated == [0]


_MEMORY_SCRIPT = """
import resource, sys
from lmms_emi.embed.embedder import Embedder
e = Embedder.from_profile("offline", cache_dir=False, progress=False)
words = "the quick brown fox jumps over a lazy dog while people watch".split()
normal = [" ".join(words[(i + j) % len(words)] for j in range(200)) for i in range(8)]
e.embed_texts(normal)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
big = (" ".join(words) + " ") * (50_000_000 // 60)
z = e.embed_texts([big, normal[0]])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(len(big), before, after)
"""


@pytest.mark.slow  # a fresh process importing torch and transformers, and 50 MB of text (~20 s)
def test_a_50_mb_response_costs_no_more_memory_than_its_own_bytes():
    """Before the cut, a 10 MB text took 2.2 GB more (and 46 s), 100 MB 14 GB; now 50 MB costs about twice
    its own size (the string and its content hash)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    size, before, after = (int(v) for v in done.stdout.split()[-3:])
    assert size >= 49_000_000
    assert (after - before) / 1024 < 300, f"peak grew by {(after - before) / 1024:.0f} MB"  # ru_maxrss: KiB


# -- 3. train-estimator refuses degenerate embeddings ------------------------------------------------------
def _embeddings_file(tmp_path, broken_role: str | None, how: str):
    from lmms_emi.embed.store import save_embeddings
    from lmms_emi.emi import TaskEmbeddings

    gen = torch.Generator().manual_seed(0)
    tasks = {name: TaskEmbeddings(*(unit(12, 8, gen) for _ in range(4))) for name in ("task_a", "task_b")}
    if broken_role is not None:
        fields = dict(zip(("z_v", "z_t", "z_model", "z_ref"), tasks["task_b"], strict=True))
        z = fields[broken_role]
        fields[broken_role] = {
            "zero": torch.zeros_like(z),
            "same": z[:1].expand_as(z).clone(),
            "nan": torch.where(torch.arange(12)[:, None] == 5, math.nan, z),
        }[how]
        tasks["task_b"] = TaskEmbeddings(**fields)
    spec = {"vision": {"name": "v", "dim": 8}, "text": {"name": "t", "dim": 8}}
    return save_embeddings(tasks, tmp_path / "run_emi_embeddings.safetensors", encoders=spec)


@pytest.mark.parametrize(
    ("role", "name", "how", "message"),
    [
        ("z_model", "response", "zero", "are all zero"),
        ("z_ref", "reference", "same", "are all the same vector"),
        ("z_v", "image", "same", "are all the same vector"),
        ("z_v", "image", "zero", "are all zero"),
        ("z_t", "query", "zero", "are all zero"),
        ("z_model", "response", "nan", r"contain NaN or inf \(first at row 5\)"),
    ],
)
def test_train_estimator_refuses_degenerate_embeddings_in_one_line(
    tmp_path, capsys, role, name, how, message
):
    from lmms_emi.cli import main

    path = _embeddings_file(tmp_path, role, how)
    out = tmp_path / "club.safetensors"
    code = main(["train-estimator", str(path), "--output-path", str(out), "--estimator-steps", "5", "-q"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert str(path) in lines[0] and "'task_b'" in lines[0] and f" {name} embeddings " in lines[0]
    assert __import__("re").search(message, lines[0]), lines[0]
    assert not out.exists()


def test_train_estimator_fits_on_healthy_embeddings_and_notes_a_fixed_prompt(tmp_path, capsys):
    from lmms_emi.cli import main

    path = _embeddings_file(tmp_path, "z_t", "same")
    out = tmp_path / "club.safetensors"
    code = main(["train-estimator", str(path), "--output-path", str(out), "--estimator-steps", "5", "-q"])
    printed = capsys.readouterr().out
    assert code == 0 and out.is_file()
    assert "'task_b': its 12 query embeddings are all the same (a fixed prompt?)" in printed


@pytest.mark.parametrize("entropy_scale", [0.0, 0.5, 4.0])
def test_every_entropy_scale_passes_on_healthy_tasks(entropy_scale):
    result = analyze_shift(
        shifted_tasks(4), ID_TASK, small_club(16), n_resamples=20, entropy_scale=entropy_scale
    )
    assert all(t.bound_theorem is not None for t in result.ood_tasks)


def test_the_fitted_estimator_is_named_as_such(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    club = CLUB(16, 16, 16).fit(unit(64, 16, gen), unit(64, 16, gen), steps=3, progress=False)
    monkeypatch.setattr(emi_lib, "club_mutual_information", lambda *a, **k: math.inf)
    with pytest.raises(ImplausibleResultError, match=r"^the estimator fitted on this run gives task"):
        analyze_shift(shifted_tasks(2), ID_TASK, club, n_resamples=0)


# -- 1. through the command line: one line, no report ------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A demo dataset, tiny encoders and their spec: what `lmms-emi score` needs offline."""
    from helpers_embed import save_tiny_clip_vision, save_tiny_xlmr, tiny_encoder_flags

    from lmms_emi.cli import main
    from lmms_emi.embed import Embedder

    root = tmp_path_factory.mktemp("tiny_run")
    vision, text = save_tiny_clip_vision(root / "clip"), save_tiny_xlmr(root / "xlmr")
    scenarios = ["llava_bench_coco", "llava_bench_coco_sr_7"]
    assert main(["demo-data", str(root / "demo"), "--scenarios", *scenarios, "--n-images", "3"]) == 0
    flags = tiny_encoder_flags(vision, text)
    embedder = Embedder(vision=f"hf-clip:{vision}", text=f"hf-text:{text}", text_layer=0, cache_dir=False)
    data = ["--dataset", str(root / "demo" / "dataset"), "--responses", str(root / "demo" / "responses")]
    return {
        "args": [*data, "--benchmark", "synthetic", *flags],
        "spec": embedder.encoder_spec(),
        "dim": embedder.dim,
    }


def _score(tiny_run, estimator, out, capsys) -> tuple[int, str]:
    from lmms_emi.cli import main

    args = ["score", *tiny_run["args"], "--estimator", str(estimator), "--output-path", str(out)]
    code = main([*args, "--emi-cache", "off", "--bootstrap", "0", "-q"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return code, lines[0]


def test_score_refuses_a_corrupt_checkpoint_in_one_line_before_any_report(tiny_run, tmp_path, capsys):
    club = small_club(tiny_run["dim"])
    with torch.no_grad():
        club.p_mu[2].bias.fill_(1e17)
    path = club.save(tmp_path / "corrupt.safetensors", club.make_manifest(tiny_run["spec"]))  # valid checksum
    code, line = _score(tiny_run, path, tmp_path / "out", capsys)
    assert code == 2 and "corrupt.safetensors" in line and "|μ| =" in line
    assert not list(tmp_path.rglob("*emi_report*"))


def test_score_refuses_an_impossible_number_in_one_line_and_writes_no_report(
    tiny_run, tmp_path, capsys, monkeypatch
):
    club = small_club(tiny_run["dim"])
    path = club.save(tmp_path / "healthy.safetensors", club.make_manifest(tiny_run["spec"]))
    monkeypatch.setattr(emi_lib, "club_mutual_information", lambda *a, **k: -6.6e34)
    code, line = _score(tiny_run, path, tmp_path / "out", capsys)
    assert code == EXIT_FAILED and "healthy.safetensors" in line and "lbshift_syn_llava_bench_coco" in line
    assert "-6.6e+34" in line and "impossible" in line, line
    assert not list((tmp_path / "out").rglob("*emi_report*"))

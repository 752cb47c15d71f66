"""Full-size scoring benchmark: ``lmms-emi score`` on the synthetic LLaVA-Bench-shift layout, cold and warm.

The run is the real command (``lmms_emi.cli.main``) in a fresh Python process, as a user runs it, on:

* the synthetic benchmark at the real size: 35 tasks x 90 samples = 3,150 samples, 630 unique images
  (90 photos x 7 visual variants: clean, defocus blur 1/3/5, frost 1/3/5; 640x480 JPEG), 450 unique
  questions (90 x 5 text variants: clean, sr_4, sr_7, KeyboardAug_1, KeyboardAug_3), 90 references and
  3,150 distinct model responses (response files in the paper's format);
* the paper's encoder architectures as random-weight local folders (CLIP ViT-B/32 vision, XLM-R-base with
  the hub's config; speed does not depend on the weights), recognised as the paper's encoders;
* the paper-format estimator ``CLUB_global.pt`` read from ``../shared/reference`` (or
  ``$LMMS_EMI_REFERENCE_DIR``), never copied.

For a cold cache (empty embedding cache) and then a warm one (every embedding cached) it prints the wall time
(process start to exit), samples/s, peak memory (max RSS of the process) and the phases: start-up and
imports, data (dataset + response files), encoder load, embedding (cache look-ups, decoding, tokenising,
forwards, cache writes), of which encoder forwards, analysis (estimator, EMI/EMID/bounds, bootstrap) and
report writing. Phases are measured inside the child process by wrapping the CLI's functions, so the
numbers are those of the command itself. It also checks that the cold and warm runs give bit-identical
embeddings and identical reports.

Usage::

    python benchmarks/bench_score.py                       # assets in a temp folder, removed afterwards
    python benchmarks/bench_score.py --workdir /tmp/bs     # keep (and reuse) the built assets
    python benchmarks/bench_score.py --warm-runs 3 --json out.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHILD_ENV = "LMMS_EMI_BENCH_SCORE_CHILD"  # path of the phase JSON the child writes
T0_ENV = "LMMS_EMI_BENCH_SCORE_T0"  # wall clock at spawn (time.time())
EAGER_ENV = "LMMS_EMI_BENCH_SCORE_EAGER"  # load the encoders up front (the behaviour before lazy loading)
MODEL = "bench-model"
HEAVY_MODULES = ("transformers", "datasets", "scipy.stats", "matplotlib", "pandas", "timm", "open_clip")
N_BASE = 90
ASSET_VERSION = "1"


# ----------------------------------------------------------------------------------------------- child
def _child(argv: list[str]) -> int:
    """Body of the measured process: ``lmms-emi score ...`` with the CLI's steps timed."""
    t_spawn = float(os.environ[T0_ENV])
    t_start = time.time()
    import lmms_emi.cli as cli  # everything the command imports at start-up
    from lmms_emi.cli import score

    cli.load_libraries("score")  # as main() does before the run: the pipeline's libraries, collector paused

    t_imported = time.time()
    spans: dict[str, float] = {}
    captured: dict[str, Any] = {}

    def wrap(module: Any, name: str, phase: str, capture: str | None = None) -> None:
        fn = getattr(module, name, None)
        if fn is None:
            return

        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
            finally:
                spans[phase] = spans.get(phase, 0.0) + time.perf_counter() - t
            if capture is not None:
                captured[capture] = out
            return out

        setattr(module, name, timed)

    import importlib

    datasets_mod = importlib.import_module("lmms_emi.sources.datasets")
    responses_mod = importlib.import_module("lmms_emi.sources.response_files")
    pipeline_run = importlib.import_module("lmms_emi.pipeline.run")
    embed_mod = importlib.import_module("lmms_emi.embed")
    wrap(score, "_present", "data")
    for name in ("local_dataset", "load_splits"):
        wrap(datasets_mod, name, "data")
    for name in ("only_model", "collect_samples"):
        wrap(responses_mod, name, "data")
    wrap(pipeline_run, "check_sizes", "data")
    embedder_cls = embed_mod.Embedder
    from_profile = embedder_cls.from_profile  # the preflight builds the Embedder (configs only)

    def timed_from_profile(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        emb = from_profile(*args, **kwargs)
        spans["embedder"] = spans.get("embedder", 0.0) + time.perf_counter() - t
        captured["embedder"] = emb
        if os.environ.get(EAGER_ENV):  # baseline: load both encoders up front, as before lazy loading
            t = time.perf_counter()
            emb.load()
            spans["eager_load"] = time.perf_counter() - t
        return emb

    embedder_cls.from_profile = timed_from_profile

    _report = importlib.import_module("lmms_emi.cli._report")  # the package has a function of that name

    wrap(_report, "analyze_run", "pipeline")
    wrap(_report, "write_run_reports", "reports")
    wrap(pipeline_run, "embed_tasks", "embedding")
    estimator_mod = importlib.import_module("lmms_emi.pipeline.estimator")
    wrap(getattr(estimator_mod, "EstimatorPolicy", None), "check", "estimator_check")

    rc = cli.main(argv)
    t_end = time.time()
    emb = captured.get("embedder")
    st = getattr(emb, "stats", None)
    load = float(getattr(st, "load_seconds", 0.0) or 0.0) if st is not None else 0.0
    forward = sum(float(getattr(m, "forward_seconds", 0.0)) for m in (st.image, st.text)) if st else 0.0
    embedding = spans.get("embedding", 0.0)
    load_in_embedding = load - spans.get("eager_load", 0.0)  # lazy loading happens inside the embed step
    result = {
        "rc": rc,
        "wall_in_process": t_end - t_start,
        "startup": t_start - t_spawn,  # interpreter start-up before the first line ran
        "imports": t_imported - t_start,
        "data": spans.get("data", 0.0),
        "embedder_init": spans.get("embedder", 0.0),
        "encoder_load": load,
        "embedding": embedding - load_in_embedding,  # the embed step without the model loads inside it
        "encoder_forward": forward,
        "analysis": spans.get("pipeline", 0.0) - embedding,
        "reports": spans.get("reports", 0.0),
        "estimator_check": spans.get("estimator_check", 0.0),
        "end": t_end - t_spawn,  # the parent adds the process exit: wall - end
        "stats": st.as_dict() if st is not None else None,
        "models_loaded": getattr(emb, "loaded_modalities", lambda: None)(),
        "heavy_modules": sorted(m for m in HEAVY_MODULES if m in sys.modules),
    }
    Path(os.environ[CHILD_ENV]).write_text(json.dumps(result))
    # end as the console script does
    cli.exit_without_gc(int(rc))
    return int(rc)


# ----------------------------------------------------------------------------------------------- assets
def _photos() -> list[Any]:
    import numpy as np
    import skimage.data
    from PIL import Image

    from lmms_emi.demo_data import IMAGE_POOL

    out = []
    for p in IMAGE_POOL:
        arr = np.asarray(getattr(skimage.data, p.name)())
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        out.append(Image.fromarray(arr).convert("RGB"))
    return out


def _base_images(n: int, seed: int = 0) -> list[Any]:
    """``n`` distinct 640x480 photos: random crops (and flips) of the scikit-image photos."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = _photos()
    out = []
    for i in range(n):
        im = photos[i % len(photos)]
        w, h = im.size
        cw, ch = int(rng.integers(w // 2, w + 1)), int(rng.integers(h // 2, h + 1))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = im.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(crop.resize((640, 480), Image.Resampling.BICUBIC))
    return out


def _jpeg(im: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _base_texts(seed: int) -> tuple[list[str], list[str]]:
    """90 questions (LLaVA-Bench-like templates with a per-sample detail) and 90 reference answers."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers_embed import WORDS

    from lmms_emi.demo_data import QUESTION_TEMPLATES

    rng = random.Random(seed)
    templates = [
        *QUESTION_TEMPLATES,
        "What is the person in the image doing?",
        "Why might this scene be unusual?",
        "How many objects can you count on the table?",
    ]
    questions, references = [], []
    for i in range(N_BASE):
        detail = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
        questions.append(f"{templates[i % len(templates)]} Consider the {detail} (item {i}).")
        n = rng.randint(25, 70)
        references.append(" ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + ".")
    return questions, references


def _variants(questions: list[str], seed: int) -> dict[str, list[str]]:
    """The 5 text variants of the synthetic benchmark, every one of the 450 strings distinct."""
    from lmms_emi.demo_data import keyboard_typos, synonym_rewrite

    out: dict[str, list[str]] = {"": list(questions)}
    seen = set(questions)
    for aug, level in (("sr", 4), ("sr", 7), ("KeyboardAug", 1), ("KeyboardAug", 3)):
        fn = synonym_rewrite if aug == "sr" else keyboard_typos
        row = []
        for qid, q in enumerate(questions):
            for attempt in range(100):
                v = fn(q, level, seed=seed, key=(qid, attempt))
                if v not in seen:
                    break
            else:
                v = f"{v} ({aug}{level})"
            seen.add(v)
            row.append(v)
        out[f"{aug}_{level}"] = row
    return out


def _visual(base: list[Any], scenario: Any) -> list[Any]:
    from lmms_emi.demo_data import defocus_blur, frost

    if scenario.corruption == "defocus_blur":
        return [defocus_blur(im, scenario.severity) for im in base]
    if scenario.corruption == "frost":
        return [frost(im, scenario.severity, seed=i) for i, im in enumerate(base)]
    return list(base)


def _response(reference: str, rng: random.Random, words: list[str], strength: float) -> str:
    kept = [w for w in reference.split() if rng.random() > strength / 2]
    extra = [rng.choice(words) for _ in range(rng.randint(10, 80))]
    return " ".join(["The", "image", "shows", *kept, *extra]) + "."


def build_assets(work: Path, log: Any) -> dict[str, Path]:
    """Models, dataset and response files under ``work`` (reused when already built)."""
    paths = {"clip": work / "clip-vit-b32-arch", "xlmr": work / "xlm-roberta-base-arch"}
    paths |= {"dataset": work / "dataset", "responses": work / "responses"}
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers_embed import save_clip_b32_arch, save_xlmr_base_arch

    if not _built(work / "models.json"):
        for key in ("clip", "xlmr"):
            shutil.rmtree(paths[key], ignore_errors=True)
        t = time.perf_counter()
        save_clip_b32_arch(paths["clip"])
        save_xlmr_base_arch(paths["xlmr"])
        log(f"  random-weight CLIP ViT-B/32 vision + XLM-R-base folders: {time.perf_counter() - t:.1f} s")
        _mark(work / "models.json")
    if not _built(work / "data.json"):
        for key in ("dataset", "responses"):
            shutil.rmtree(paths[key], ignore_errors=True)
        _build_data(paths, log)
        _mark(work / "data.json")
    return paths


def _built(marker: Path) -> bool:
    return marker.is_file() and json.loads(marker.read_text()).get("version") == ASSET_VERSION


def _mark(marker: Path) -> None:
    marker.write_text(json.dumps({"version": ASSET_VERSION}))


def _build_data(paths: dict[str, Path], log: Any) -> None:
    """The dataset (``save_to_disk`` folder, 35 splits) and the model's response files."""
    import datasets
    from helpers_embed import WORDS

    from lmms_emi import scenarios as sc
    from lmms_emi.demo_data import shift_strength

    t = time.perf_counter()
    base = _base_images(N_BASE)
    questions, references = _base_texts(seed=1)
    text_variants = _variants(questions, seed=2)
    features = datasets.Features(
        {
            "question_id": datasets.Value("int64"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "reference_answer": datasets.Value("string"),
        }
    )
    visual_cache: dict[tuple[Any, int], list[bytes]] = {}
    splits = {}
    responses: set[str] = set()
    paths["responses"].mkdir(parents=True)
    for scen in sc.select_scenarios("synthetic", None):
        vkey = (scen.corruption, scen.severity)
        if vkey not in visual_cache:
            visual_cache[vkey] = [_jpeg(im) for im in _visual(base, scen)]
        tkey = f"{scen.text_aug}_{scen.text_level}" if scen.text_aug else ""
        qs = text_variants[tkey]
        splits[scen.split] = datasets.Dataset.from_dict(
            {
                "question_id": list(range(N_BASE)),
                "image": [{"bytes": b, "path": None} for b in visual_cache[vkey]],
                "question": qs,
                "reference_answer": references,
            },
            features=features,
        )
        rng = random.Random(f"{scen.split}")
        lines = []
        for qid in range(N_BASE):
            text = _response(references[qid], rng, WORDS, shift_strength(scen.split))
            while text in responses:
                text = _response(references[qid], rng, WORDS, shift_strength(scen.split))
            responses.add(text)
            record = {
                "question_id": qid,
                "prompt": qs[qid],
                "text": text,
                "answer_id": f"{scen.split}-{qid}",
                "model_id": MODEL,
                "metadata": {},
            }
            lines.append(json.dumps(record) + "\n")
        (paths["responses"] / f"{scen.split}_{MODEL}.jsonl").write_text("".join(lines))
    datasets.disable_progress_bars()
    datasets.DatasetDict(splits).save_to_disk(str(paths["dataset"]))
    n_img = sum(len(v) for v in visual_cache.values())
    n_q = len({q for v in text_variants.values() for q in v})
    assert (n_img, n_q, len(set(references)), len(responses)) == (630, 450, 90, 3150), (n_img, n_q)
    log(
        f"  dataset: 35 splits x {N_BASE} rows, {n_img} unique images, {n_q} unique questions, "
        f"{len(set(references))} references, {len(responses)} responses: {time.perf_counter() - t:.1f} s"
    )


# ----------------------------------------------------------------------------------------------- parent
def reference_checkpoint() -> Path:
    env = os.environ.get("LMMS_EMI_REFERENCE_DIR")
    ref = Path(env) if env else ROOT.parent / "shared" / "reference"
    path = ref / "CLUB_global.pt"
    if not path.is_file():
        raise SystemExit(f"bench_score: {path} not found (set LMMS_EMI_REFERENCE_DIR)")
    return path


def run_score(
    paths: dict[str, Path], cache: Path, out: Path, estimator: Path, threads: int | None, eager: bool = False
) -> dict:
    """One ``lmms-emi score`` process; returns its phases, wall time and peak memory."""
    argv = [
        "score",
        "--dataset", str(paths["dataset"]),
        "--responses", str(paths["responses"]),
        "--model", MODEL,
        "--vision-encoder", str(paths["clip"]),
        "--text-encoder", str(paths["xlmr"]),
        "--estimator", str(estimator),
        "--emi-cache", str(cache),
        "--output-path", str(out),
        "--quiet",
    ]  # fmt: skip
    phase_file = out.parent / f"{out.name}.phases.json"
    env = {**os.environ, CHILD_ENV: str(phase_file), "PYTHONPATH": str(ROOT)}
    env["TOKENIZERS_PARALLELISM"] = "false"
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if eager:
        env[EAGER_ENV] = "1"
    code = f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import bench_score; "
    code += "sys.exit(bench_score._child(sys.argv[1:]))"
    t0 = time.time()
    env[T0_ENV] = repr(t0)
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - t0
    stdout, stderr = proc.stdout.read().decode(), proc.stderr.read().decode()  # type: ignore[union-attr]
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not phase_file.is_file():
        raise SystemExit(
            f"bench_score: lmms-emi score failed ({proc.returncode}):\n{stdout}\n{stderr[-4000:]}"
        )
    res = json.loads(phase_file.read_text())
    res["wall"] = wall
    res["peak_rss_mb"] = usage.ru_maxrss / 1024
    res["stdout"] = stdout
    return res


def report(label: str, r: dict, n_samples: int, log: Any) -> None:
    wall = r["wall"]
    exit_time = wall - r["end"]
    phases = ("startup", "imports", "estimator_check", "data", "embedder_init", "encoder_load", "embedding")
    other = wall - exit_time - sum(r[k] for k in (*phases, "analysis", "reports"))
    log(
        f"{label}: wall {wall:.2f} s, {n_samples / wall:,.0f} samples/s, "
        f"peak RSS {r['peak_rss_mb']:,.0f} MB, models loaded: {r['models_loaded']}, "
        f"heavy modules imported: {r.get('heavy_modules')}"
    )
    rows = [
        ("start-up + imports", r["startup"] + r["imports"]),
        ("estimator check", r["estimator_check"]),
        ("data (dataset + responses)", r["data"]),
        ("embedder set-up", r["embedder_init"]),
        ("encoder load", r["encoder_load"]),
        ("embedding", r["embedding"]),
        ("  of which encoder forwards", r["encoder_forward"]),
        ("analysis", r["analysis"]),
        ("reports", r["reports"]),
        ("other (CLI glue, headlines)", other),
        ("process exit", exit_time),
    ]
    for name, sec in rows:
        log(f"    {name:<30} {sec:7.2f} s  {100 * sec / wall:5.1f}%")
    st = r.get("stats") or {}
    if st:
        im, tx = st["image"], st["text"]
        log(
            f"    encoder calls: {im['encoder_calls']} images, {tx['encoder_calls']} texts; "
            f"cache hits: {im['cache_hits']} images, {tx['cache_hits']} texts"
        )


def _same_outputs(a: Path, b: Path) -> tuple[bool, bool]:
    """(embeddings bit-identical, report JSON identical) of two output folders."""
    from safetensors.numpy import load_file

    ea = load_file(str(run_file(a, "emi_embeddings.safetensors")))
    eb = load_file(str(run_file(b, "emi_embeddings.safetensors")))
    same_emb = ea.keys() == eb.keys() and all(ea[k].tobytes() == eb[k].tobytes() for k in ea)
    ja = {_unprefixed(p): p for p in a.glob("*_emi_report*.json")}
    jb = {_unprefixed(p): p for p in b.glob("*_emi_report*.json")}
    same_json = (
        bool(ja)
        and ja.keys() == jb.keys()
        and all(_strip(json.loads(ja[k].read_text())) == _strip(json.loads(jb[k].read_text())) for k in ja)
    )
    return same_emb, same_json


def run_file(folder: Path, name: str) -> Path:
    """The one ``<run id>_<name>`` file of a run's output folder."""
    found = sorted(folder.glob(f"*_{name}"))
    if len(found) != 1:
        raise SystemExit(f"bench_score: expected one *_{name} in {folder}, found {len(found)}")
    return found[0]


def _unprefixed(path: Path) -> str:
    """A run file's name without its ``<run id>_`` prefix (``20261204_214430_emi_report_x.json``)."""
    return path.name.split("_emi_", 1)[1]


_RUN_FIELDS = ("created", "output_path", "cache", "timestamp")


def _strip(obj: Any) -> Any:
    """A report without the fields that name the run's folders or time it."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in _RUN_FIELDS}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, help="keep (and reuse) the assets here; default: a temp folder")
    ap.add_argument("--warm-runs", type=int, default=2, help="warm runs (the best and all are reported)")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the measured process")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument(
        "--eager", action="store_true", help="baseline: load both encoders up front (no lazy loading)"
    )
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, flush=True)

    tmp = None
    work = args.workdir
    if work is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_score_")
        work = Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    try:
        estimator = reference_checkpoint()
        log(f"# lmms-emi score benchmark: {os.cpu_count()} CPUs, assets in {work}")
        paths = build_assets(work, log)
        n = 35 * N_BASE
        runs = work / "runs"
        shutil.rmtree(runs, ignore_errors=True)
        runs.mkdir()
        cache = runs / "cache"
        results: dict[str, Any] = {"samples": n}
        cold = run_score(paths, cache, runs / "cold", estimator, args.threads, args.eager)
        report("cold cache", cold, n, log)
        results["cold"] = cold
        warm = [
            run_score(paths, cache, runs / f"warm{i}", estimator, args.threads, args.eager)
            for i in range(args.warm_runs)
        ]
        best = min(warm, key=lambda r: r["wall"])
        walls = ", ".join(f"{r['wall']:.2f}" for r in warm)
        report(f"warm cache (best of {len(warm)}: {walls} s)", best, n, log)
        results["warm"] = warm
        same_emb, same_json = _same_outputs(runs / "cold", runs / "warm0")
        fwd = cold["encoder_forward"] / cold["wall"]
        log(f"cold run inside encoder forwards: {100 * fwd:.1f}% of wall time")
        log(f"cold vs warm: embeddings bit-identical: {same_emb}; reports identical: {same_json}")
        from safetensors import safe_open

        with safe_open(str(run_file(runs / "cold", "emi_embeddings.safetensors")), framework="numpy") as fh:
            spec = json.loads((fh.metadata() or {}).get("encoders", "{}"))
        if spec:
            log(f"encoders recorded: vision {spec['vision']['name']}, text {spec['text']['name']}")
        report_json = run_file(runs / "cold", "emi_report_synthetic.json")
        est = json.loads(report_json.read_text()).get("estimator") or {}
        log(f"estimator: {est.get('source')} {est.get('path')} ({est.get('comparability')})")
        results["encoders"] = spec
        head = [ln for ln in cold["stdout"].splitlines() if ln and not ln.startswith("reports:")][:3]
        log("headlines: " + " | ".join(head))
        results |= {"cold_forward_share": fwd, "bit_identical": same_emb, "reports_identical": same_json}
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=str))
        return results
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    if os.environ.get(CHILD_ENV):
        sys.exit(_child(sys.argv[1:]))
    main()

"""GPU check: a LLaVA-1.5-7B-shaped model through plain lmms-eval with ``--metrics emi``, then the paper's
encoder architectures on the GPU in fp32 and bf16. One command, offline, under 8 minutes on one H100.

What it does, each step timed:

1. builds the demo data (``lmms_emi.demo_data``, as ``lmms-emi demo-data``): five synthetic scenarios (the ID
   task, frost 5, defocus blur 5, sr 7, KeyboardAug 3) of real photos;
2. builds random-weight encoders of the paper's architectures (CLIP ViT-B/32 vision, XLM-R-base), as
   ``benchmarks/bench_score.py`` does, and a random-weight LLaVA-1.5-7B-shaped model (Llama 4096 hidden,
   32 layers, 32 heads, 11008 intermediate, 32064 vocabulary; CLIP ViT-L/14-336 vision tower), made in bf16
   on the GPU and saved with ``save_pretrained`` (safetensors, ~14 GB) into the work folder;
3. runs ``lmms-eval --model llava_hf ... --tasks <5 tasks> --metrics emi --limit L --log_samples``
   (the plugin's hook; EMI with those encoders and an estimator fitted on the run) and reports generation
   samples/s and tokens/s, measured around each ``generate`` call (a ``sitecustomize`` probe), and the EMI,
   EMID and bounds of lmms-eval's results JSON;
4. re-scores that run's samples in this process with the encoders in fp32 and in bf16 (``Embedder``
   ``precision``) on the GPU: embedding samples/s (and images/s, texts/s on a larger synthetic load), and
   the largest EMI / EMID difference between the two precisions.

``--tiny`` (automatic without CUDA) does the same with a tiny LLaVA-1.5 and tiny encoders on the CPU (about a
minute on 2 cores); the test suite runs it. A compact table is printed; ``--json PATH`` writes everything.

Usage::

    python benchmarks/gpu_check.py --json gpu_check.json          # on the GPU machine
    python benchmarks/gpu_check.py --tiny --json /tmp/tiny.json    # anywhere

Workarounds for the environment (not lmms-emi), applied here and reported in the JSON: lmms-eval 0.7.3's
``llava_hf`` imports ``decord`` without declaring it (a stub goes on the child's path where it is missing),
and its default ``device_map=""`` is refused by transformers 5, so ``device_map`` is passed explicitly.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCENARIOS = (
    "llava_bench_coco",
    "llava_bench_coco_frost_5",
    "llava_bench_coco_defocus_blur_5",
    "llava_bench_coco_sr_7",
    "llava_bench_coco_KeyboardAug_3",
)
TINY_SCENARIOS = SCENARIOS[:2] + SCENARIOS[3:4]
LLAMA_7B = dict(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, max_position_embeddings=4096, vocab_size=32064,
)  # fmt: skip
CLIP_L14_336 = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=336, patch_size=14, projection_dim=768,
)  # fmt: skip


def _log(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


class Timer:
    def __init__(self) -> None:
        self.spans: dict[str, float] = {}

    def __call__(self, name: str) -> Any:
        timer = self

        class _Span:
            def __enter__(self) -> None:
                self.t = time.perf_counter()
                _log(f"{name} ...")

            def __exit__(self, *exc: Any) -> None:
                timer.spans[name] = time.perf_counter() - self.t
                _log(f"{name}: {timer.spans[name]:.1f} s")

        return _Span()


# ----------------------------------------------------------------------------------------------- assets
def build_assets(work: Path, tiny: bool, device: str, timer: Timer) -> dict[str, Path]:
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers_embed import save_clip_b32_arch, save_tiny_clip_vision, save_tiny_xlmr, save_xlmr_base_arch
    from tiny_llava import save_tiny_llava, write_probe

    from lmms_emi.demo_data import build_demo_dataset

    paths = {"data": work / "data", "clip": work / "clip", "xlmr": work / "xlmr", "llava": work / "llava"}
    with timer("demo data"):
        if not (paths["data"] / "dataset_dict.json").is_file():
            shutil.rmtree(paths["data"], ignore_errors=True)
            n = 4 if tiny else 6
            build_demo_dataset(
                paths["data"], benchmark="synthetic", scenarios=TINY_SCENARIOS if tiny else SCENARIOS,
                n_images=n, questions_per_image=2,
            )  # fmt: skip
    with timer("encoders (random weights)"):
        for key, tiny_fn, full_fn in (
            ("clip", save_tiny_clip_vision, save_clip_b32_arch),
            ("xlmr", save_tiny_xlmr, save_xlmr_base_arch),
        ):
            if not (paths[key] / "config.json").is_file():
                shutil.rmtree(paths[key], ignore_errors=True)
                (tiny_fn if tiny else full_fn)(paths[key])
    with timer("LLaVA model build + save"):
        if tiny:
            save_tiny_llava(paths["llava"], "llava")
        else:
            import torch

            save_tiny_llava(
                paths["llava"],
                "llava",
                text=LLAMA_7B,
                vision=CLIP_L14_336,
                dtype=torch.bfloat16,
                device=device,
            )
            torch.cuda.empty_cache()
    paths["probe"] = write_probe(work / "probe")
    return paths


# ----------------------------------------------------------------------------------------------- generation
def run_lmms_eval(
    paths: dict[str, Path], work: Path, args: argparse.Namespace, device: str
) -> dict[str, Any]:
    tasks = ["lbshift_syn_" + s for s in (TINY_SCENARIOS if args.tiny else SCENARIOS)]
    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    log = work / "generate.jsonl"
    log.unlink(missing_ok=True)
    dtype = "float32" if args.tiny else "bfloat16"
    env = dict(os.environ)
    for name in [n for n in env if n.startswith("LMMS_EMI_")]:
        del env[name]
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(paths["probe"]), os.environ.get("PYTHONPATH")])),
        LMMS_EMI_TEST_GENERATE_LOG=str(log),
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
        LMMS_EMI_DATA=f"synthetic={paths['data']}",
        LMMS_EMI_VISION_ENCODER=f"hf-clip:{paths['clip']}",
        LMMS_EMI_TEXT_ENCODER=f"hf-text:{paths['xlmr']}",
        LMMS_EMI_TEXT_LAYER="0",
        LMMS_EMI_ESTIMATOR="fit",
        LMMS_EMI_ESTIMATOR_STEPS=str(args.estimator_steps),
        LMMS_EMI_BOOTSTRAP=str(args.bootstrap),
        LMMS_EMI_EMBEDDING_CACHE="off",
        LMMS_EMI_DEVICE=device,
        LMMS_EMI_BUILTIN_TASKS="0",
    )  # fmt: skip
    cmd = [
        str(BIN / "lmms-eval"), "--model", "llava_hf",
        "--model_args", f"pretrained={paths['llava']},device={device},device_map={device},dtype={dtype}",
        "--tasks", ",".join(tasks), "--metrics", "emi", "--limit", str(args.limit),
        "--gen_kwargs", f"max_new_tokens={args.max_new_tokens}",
        "--output_path", str(out), "--log_samples",
    ]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - started
    (work / "lmms_eval.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    files = sorted(out.rglob("*_results.json"))
    if proc.returncode != 0 or len(files) != 1:
        raise RuntimeError(
            f"lmms-eval failed (exit {proc.returncode}, results {files}); log: {work / 'lmms_eval.log'}\n"
            + proc.stderr[-3000:]
        )
    results = json.loads(files[0].read_text())
    if "lmms_emi" not in results:
        raise RuntimeError(f"no EMI in {files[0]}; log: {work / 'lmms_eval.log'}\n{proc.stderr[-3000:]}")
    calls = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.is_file() else []
    gen_seconds = sum(c["seconds"] for c in calls)
    tokens = sum(c["new_tokens"] or 0 for c in calls)
    per_task = {}
    for task in tasks:
        entry = results["results"].get(task, {})
        per_task[task] = {k.split(",")[0]: entry.get(k) for k in ("emi,none", "emid,none", "emid_bound,none")}
    return {
        "tasks": tasks,
        "results_file": str(files[0]),
        "run_dir": str(files[0].parent),
        "wall_seconds": wall,
        "generate_calls": len(calls),
        "generate_seconds": gen_seconds,
        "generation_samples_per_s": len(calls) / gen_seconds if gen_seconds else None,
        "generation_tokens_per_s": tokens / gen_seconds if gen_seconds else None,
        "new_tokens": tokens,
        "pixel_values_shapes": sorted({tuple(c["pixel_values"] or ()) for c in calls}),
        "per_task": per_task,
        "estimator": results["lmms_emi"].get("estimator", {}).get("source"),
    }


# ----------------------------------------------------------------------------------------------- scoring
def _synthetic_load(n_images: int, n_texts: int) -> tuple[list[Any], list[str]]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)) for _ in range(n_images)]
    words = "the a image shows dog cat car street person red blue sitting standing table photo sky".split()
    texts = [" ".join(rng.choice(words, size=int(rng.integers(8, 60)))) + f" {i}." for i in range(n_texts)]
    return images, texts


def score_precisions(
    paths: dict[str, Path], gen: dict[str, Any], args: argparse.Namespace, device: str
) -> dict:
    import torch

    import lmms_emi.pipeline.run as pipeline_run
    from lmms_emi.config import EMIConfig
    from lmms_emi.embed import Embedder
    from lmms_emi.pipeline.preflight import preflight
    from lmms_emi.sources.run_folder import read_run

    config = EMIConfig.from_sources(
        {
            "vision_encoder": f"hf-clip:{paths['clip']}", "text_encoder": f"hf-text:{paths['xlmr']}",
            "text_layer": 0, "estimator": "fit", "estimator_steps": args.estimator_steps,
            "bootstrap": args.bootstrap, "embedding_cache": "off", "device": device, "progress": False,
        },
        environ={},
    )  # fmt: skip
    ready = preflight(config, judge=False)  # (encoders=False: UnboundLocalError in preflight)
    samples = read_run(gen["run_dir"]).samples(progress=False)
    n_samples = sum(len(v) for v in samples.values())
    images, texts = _synthetic_load(args.embed_images, args.embed_texts)
    embed_tasks = pipeline_run.embed_tasks
    out: dict[str, Any] = {"samples": n_samples}
    for precision in ("fp32", "bf16"):
        emb = Embedder(
            vision=str(paths["clip"]), text=str(paths["xlmr"]), text_layer=0, cache_dir=False, device=device,
            precision=precision, progress=False, batch_size=args.emi_batch_size,
        )  # fmt: skip
        t = time.perf_counter()
        emb.load()
        load = time.perf_counter() - t
        spans: dict[str, float] = {}

        def timed(*a: Any, _spans: dict[str, float] = spans, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return embed_tasks(*a, **k)
            finally:
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                _spans["embed"] = _spans.get("embed", 0.0) + time.perf_counter() - t0

        pipeline_run.embed_tasks = timed
        try:
            t = time.perf_counter()
            run = pipeline_run.analyze_run(
                samples, embedder=emb, policy=ready.policy, settings=ready.settings
            )
            total = time.perf_counter() - t
        finally:
            pipeline_run.embed_tasks = embed_tasks
        emb.embed_images(images[:4], sample_ids=[f"warm{i}" for i in range(4)])  # warm-up (kernels)
        emb.embed_texts(texts[:4])
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        emb.embed_images(images)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t_img = time.perf_counter() - t
        t = time.perf_counter()
        emb.embed_texts(texts)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t_txt = time.perf_counter() - t
        rows = {r.task: r for a in run.analyses.values() for r in a.tasks}
        out[precision] = {
            "amp_dtype": str(emb.amp_dtype),
            "encoder_load_seconds": load,
            "embed_seconds": spans.get("embed"),
            "analyze_seconds": total,
            "embedding_samples_per_s": n_samples / spans["embed"] if spans.get("embed") else None,
            "images_per_s": len(images) / t_img,
            "texts_per_s": len(texts) / t_txt,
            "per_task": {
                task: {"emi": r.emi, "emid": r.emid, "emid_bound": r.bound}
                for task, r in sorted(rows.items())
            },
        }
        del emb
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    diffs: dict[str, float] = {}
    for key in ("emi", "emid", "emid_bound"):
        values = [
            abs(out["fp32"]["per_task"][t][key] - out["bf16"]["per_task"][t][key])
            for t in out["fp32"]["per_task"]
            if out["fp32"]["per_task"][t][key] is not None and out["bf16"]["per_task"][t][key] is not None
        ]
        diffs[key] = max(values) if values else math.nan
    out["max_abs_diff_fp32_vs_bf16"] = diffs
    # the run's own numbers were computed with precision "auto": bf16 on CUDA, fp32 on the CPU
    auto = "bf16" if device.startswith("cuda") else "fp32"
    out["in_run_precision"] = auto
    out["max_abs_diff_in_run_vs_rescored"] = max(
        abs(gen["per_task"][t]["emi"] - out[auto]["per_task"][t]["emi"]) for t in gen["per_task"]
    )
    return out


# ----------------------------------------------------------------------------------------------- report
def _fmt(x: Any, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def print_table(report: dict[str, Any]) -> None:
    gen, sc = report["generation"], report["scoring"]
    print(
        f"device: {report['device']} ({report['gpu'] or 'cpu'}), model: {report['model']}, "
        f"tiny={report['tiny']}"
    )
    print(f"{'phase':<34}{'seconds':>10}")
    for name, s in report["timings"].items():
        print(f"{name:<34}{s:>10.1f}")
    print(
        f"generation: {gen['generate_calls']} samples, "
        f"{_fmt(gen['generation_samples_per_s'], '.2f')} samples/s, "
        f"{_fmt(gen['generation_tokens_per_s'], '.1f')} new tokens/s, "
        f"pixel_values {gen['pixel_values_shapes']}"
    )
    for p in ("fp32", "bf16"):
        print(
            f"embedding {p}: {_fmt(sc[p]['embedding_samples_per_s'], '.1f')} samples/s (run), "
            f"{sc[p]['images_per_s']:.1f} images/s, {sc[p]['texts_per_s']:.1f} texts/s"
        )
    head = f"{'task':<46}{'EMI (run)':>10}{'EMID':>9}{'bound':>9}{'EMI fp32':>10}{'EMI bf16':>10}"
    print(head)
    for task, v in gen["per_task"].items():
        a, b = sc["fp32"]["per_task"].get(task, {}), sc["bf16"]["per_task"].get(task, {})
        print(
            f"{task:<46}{_fmt(v['emi']):>10}{_fmt(v['emid']):>9}{_fmt(v['emid_bound']):>9}"
            f"{_fmt(a.get('emi')):>10}{_fmt(b.get('emi')):>10}"
        )
    d = sc["max_abs_diff_fp32_vs_bf16"]
    print(
        f"max |fp32 - bf16|: EMI {d['emi']:.2e}, EMID {d['emid']:.2e}, bound {d['emid_bound']:.2e}; "
        f"run vs re-scored ({sc['in_run_precision']}): {sc['max_abs_diff_in_run_vs_rescored']:.2e}"
    )
    print(f"total: {report['total_seconds']:.1f} s; ok={report['ok']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--tiny", action="store_true", help="tiny LLaVA and encoders on the CPU (automatic without CUDA)"
    )
    p.add_argument("--json", help="write the report here")
    p.add_argument("--workdir", help="keep (and reuse) the built assets here (default: a temp folder)")
    p.add_argument("--limit", type=int, default=None, help="samples per task (default 8; tiny 6)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 48; tiny 8")
    p.add_argument("--estimator-steps", type=int, default=300)
    p.add_argument("--bootstrap", type=int, default=100)
    p.add_argument("--emi-batch-size", type=int, default=64)
    p.add_argument("--embed-images", type=int, default=None, help="synthetic load (default 512; tiny 32)")
    p.add_argument("--embed-texts", type=int, default=None, help="synthetic load (default 2048; tiny 64)")
    p.add_argument("--timeout", type=int, default=420, help="seconds the lmms-eval run may take")
    args = p.parse_args(argv)
    started = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        _log("no CUDA: running the tiny check on the CPU")
    args.tiny = args.tiny or not cuda
    device = "cpu" if args.tiny else "cuda"
    defaults = {
        "limit": (6, 8),
        "max_new_tokens": (8, 48),
        "embed_images": (32, 512),
        "embed_texts": (64, 2048),
    }
    for name, (tiny_value, full_value) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny_value if args.tiny else full_value)
    timer = Timer()
    tmp = None
    if args.workdir:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="lmms_emi_gpu_check_")
        work = Path(tmp)
    try:
        paths = build_assets(work, args.tiny, device, timer)
        with timer("lmms-eval run (generation + EMI)"):
            gen = run_lmms_eval(paths, work, args, device)
        with timer("re-score fp32 and bf16"):
            scoring = score_precisions(paths, gen, args, device)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    finite = all(
        v is not None and math.isfinite(v)
        for t, row in gen["per_task"].items()
        for k, v in row.items()
        if k == "emi" or t != gen["tasks"][0]
    )
    report = {
        "tiny": args.tiny,
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if cuda and not args.tiny else None,
        "model": "tiny LLaVA-1.5" if args.tiny else "random-weight LLaVA-1.5-7B shape (bf16)",
        "encoders": "tiny CLIP vision + tiny XLM-R"
        if args.tiny
        else "CLIP ViT-B/32 vision + XLM-R-base (random)",
        "settings": {
            k: getattr(args, k)
            for k in (
                "limit",
                "max_new_tokens",
                "estimator_steps",
                "bootstrap",
                "emi_batch_size",
                "embed_images",
                "embed_texts",
            )
        },
        "decord_stubbed": importlib.util.find_spec("decord") is None,
        "timings": timer.spans,
        "generation": gen,
        "scoring": scoring,
        "total_seconds": time.perf_counter() - started,
        "ok": finite and gen["generate_calls"] == args.limit * len(gen["tasks"]),
    }
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

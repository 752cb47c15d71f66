"""Benchmark of the embedding stage (lmms_emi.embed) on this machine's CPU (or GPU if present).

Measures, in one run:

1. images/s with the CLIP ViT-B/32 vision architecture (full size, random weights: speed does not
   depend on the weights) and with the offline profile's EfficientNet-Lite0 (real weights);
2. texts/s with the XLM-R-base architecture (full size, random weights) at layer 0 (embedding
   module only) vs a full 12-layer forward, and with the offline profile's MiniLM;
3. cold vs warm disk cache for both modalities (a warm embedder loads no model: encoders are loaded
   lazily, on the first cache miss);
4. the unique-content saving on the synthetic LLaVA-Bench-shift layout: 7 visual x 5 text shifts of
   90 samples = 35 scenarios, 3,150 samples, 630 unique images, 450 unique questions, 90 references
   (and one distinct model response per sample): encoder calls with vs without dedup + cache.

The whole ``lmms-emi score`` command at full size, phase by phase: ``benchmarks/bench_score.py``.

Usage::

    python benchmarks/bench_embed.py            # default run, a few minutes on 2 CPU cores
    python benchmarks/bench_embed.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from helpers_embed import (  # noqa: E402
    WORDS,
    photos,
    save_clip_b32_arch,
    save_tiny_clip_vision,
    save_tiny_xlmr,
    save_xlmr_base_arch,
)

from lmms_emi.embed import Embedder  # noqa: E402


def log(msg: str) -> None:
    print(msg, flush=True)


def make_images(n: int, seed: int = 0, size: int = 256) -> list[bytes]:
    """``n`` distinct JPEG images: random crops of the scikit-image photos."""
    rng = np.random.default_rng(seed)
    bases = [Image.fromarray(a).convert("RGB") for a in photos().values()]
    out = []
    for i in range(n):
        im = bases[i % len(bases)]
        w, h = im.size
        cw, ch = int(rng.integers(w // 2, w)), int(rng.integers(h // 2, h))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        buf = io.BytesIO()
        im.crop((x, y, x + cw, y + ch)).resize((size, size)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def make_texts(n: int, seed: int = 0, lo: int = 8, hi: int = 120) -> list[str]:
    """``n`` distinct sentences of ``lo``..``hi`` words (questions and responses alike)."""
    rng = random.Random(seed)
    return [f"{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for i in range(n)]


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench_pair(
    label: str,
    emb_factory: Callable[[Path | bool], Embedder],
    images: list[bytes],
    texts: list[str],
    cache: Path,
) -> dict[str, float]:
    """images/s and texts/s, cold (encode + write) and warm (read) cache."""
    res: dict[str, float] = {}
    cold = emb_factory(cache)
    # warm-up (first-call allocations, kernel selection) on other items, outside the timing
    if images:
        cold.embed_images(make_images(2, seed=99))
    if texts:
        cold.embed_texts(make_texts(4, seed=99, lo=8, hi=60))
    for name, items, method, modality in (
        ("images", images, "embed_images", "image"),
        ("texts", texts, "embed_texts", "text"),
    ):
        if not items:
            continue
        _, t = timed(lambda items=items, method=method: getattr(cold, method)(items))
        res[f"{name}_per_s_cold"] = len(items) / t
        warm = emb_factory(cache)
        _, t = timed(lambda items=items, method=method, warm=warm: getattr(warm, method)(items))
        assert getattr(warm.stats, modality).encoder_calls == 0  # every item comes from the cache
        res[f"{name}_per_s_warm"] = len(items) / t
    log(f"  {label}: " + ", ".join(f"{k} = {v:,.1f}" for k, v in res.items()))
    return res


def scenario_layout(n_base: int = 90, n_visual: int = 7, n_text: int = 5) -> list[dict[str, list[Any]]]:
    """Synthetic LLaVA-Bench-shift layout: scenario (v, t) pairs image shift v with question shift t.

    Every sample keeps its reference across scenarios; model responses differ per scenario."""
    rng = np.random.default_rng(1)
    base = [Image.fromarray(a).convert("RGB").resize((96, 96)) for a in photos().values()]
    visual: list[list[bytes]] = []
    for v in range(n_visual):
        row = []
        for i in range(n_base):
            im = base[i % len(base)].rotate(float(i) * 3.0)  # a distinct "photo" per sample
            if v:
                im = [
                    lambda x: x.filter(ImageFilter.GaussianBlur(1.5)),
                    lambda x: ImageEnhance.Brightness(x).enhance(1.6),
                    lambda x: ImageEnhance.Contrast(x).enhance(0.4),
                    lambda x: Image.fromarray(
                        np.clip(np.asarray(x) + rng.normal(0, 20, (96, 96, 3)), 0, 255).astype(np.uint8)
                    ),
                    lambda x: x.resize((24, 24)).resize((96, 96), Image.Resampling.NEAREST),  # pixelate
                    lambda x: x.filter(ImageFilter.EDGE_ENHANCE_MORE),
                ][v - 1](im)
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            row.append(buf.getvalue())
        visual.append(row)
    q_base = make_texts(n_base, seed=2, lo=6, hi=20)
    text_shift = [
        lambda s: s,
        lambda s: s.upper(),
        lambda s: "Please answer: " + s,
        lambda s: s + " Answer briefly.",
        lambda s: " ".join(reversed(s.split())),
    ]
    refs = make_texts(n_base, seed=3, lo=20, hi=60)
    scenarios = []
    for v in range(n_visual):
        for t in range(n_text):
            scenarios.append(
                {
                    "images": visual[v],
                    "questions": [text_shift[t](q) for q in q_base],
                    "responses": [
                        f"scenario {v}-{t}: " + r for r in make_texts(n_base, seed=100 + 10 * v + t)
                    ],
                    "references": refs,
                }
            )
    return scenarios


def bench_layout(emb_factory: Callable[[Path | bool], Embedder], cache: Path) -> dict[str, Any]:
    """Embed all 35 scenarios twice (cold then warm cache); count encoder calls."""
    scenarios = scenario_layout()
    n_samples = sum(len(s["images"]) for s in scenarios)
    uniq_images = len({hash(b) for s in scenarios for b in s["images"]})
    uniq_q = len({q for s in scenarios for q in s["questions"]})
    uniq_r = len({q for s in scenarios for q in s["references"]})
    uniq_resp = len({q for s in scenarios for q in s["responses"]})
    assert (uniq_images, uniq_q, uniq_r) == (630, 450, 90), (uniq_images, uniq_q, uniq_r)
    log(
        f"  layout: {len(scenarios)} scenarios, {n_samples} samples, {uniq_images} unique images, "
        f"{uniq_q} unique questions, {uniq_r} unique references, {uniq_resp} distinct responses"
    )
    out: dict[str, Any] = {"scenarios": len(scenarios), "samples": n_samples}
    for run in ("cold", "warm"):
        emb = emb_factory(cache)
        _, t = timed(
            lambda emb=emb: [
                emb.embed_task(s["images"], s["questions"], s["responses"], s["references"])
                for s in scenarios
            ]
        )
        st = emb.stats
        out[run] = {
            "seconds": t,
            "requested": st.requested,
            "encoder_calls": st.encoder_calls,
            "image_calls": st.image.encoder_calls,
            "text_calls": st.text.encoder_calls,
            "saved": st.saved,
            "load_seconds": st.load_seconds,
            "models_loaded": emb.loaded_modalities(),
        }
        log(
            f"  {run} run: {st.requested} embeddings requested (= 4 x {n_samples}), "
            f"{st.encoder_calls} encoder calls ({st.image.encoder_calls} images, "
            f"{st.text.encoder_calls} texts), {st.saved} saved "
            f"({100 * st.saved / st.requested:.1f}%), {t:.1f} s with the tiny test encoders "
            f"(models loaded: {emb.loaded_modalities() or 'none'}, {st.load_seconds:.2f} s)"
        )
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: few items")
    ap.add_argument("--images", type=int, default=None, help="images per speed test (default 48, quick 8)")
    ap.add_argument("--texts", type=int, default=None, help="texts per speed test (default 256, quick 32)")
    ap.add_argument(
        "--full-texts",
        type=int,
        default=None,
        help="texts for the 12-layer forward test (default 48, quick 16)",
    )
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    n_img = args.images or (8 if args.quick else 48)
    n_txt = args.texts or (32 if args.quick else 256)
    n_full = args.full_texts or (16 if args.quick else 48)
    warnings.filterwarnings("ignore", category=UserWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    log(
        f"# lmms_emi.embed benchmark: device={device}, torch threads={torch.get_num_threads()}, "
        f"cpus={os.cpu_count()}, {n_img} images / {n_txt} texts per test, batch size {args.batch_size}"
    )
    results: dict[str, Any] = {
        "device": device,
        "threads": torch.get_num_threads(),
        "n_images": n_img,
        "n_texts": n_txt,
    }
    images = make_images(n_img)
    texts = make_texts(n_txt, lo=8, hi=60)
    with tempfile.TemporaryDirectory(prefix="bench_embed_") as tmp:
        tmpd = Path(tmp)
        log("building random-weight CLIP ViT-B/32 vision and XLM-R-base architectures ...")
        _, t = timed(lambda: (save_clip_b32_arch(tmpd / "clip"), save_xlmr_base_arch(tmpd / "xlmr")))
        log(f"  built and saved in {t:.1f} s")
        bs = args.batch_size

        def paper_arch(layer: int) -> Callable[[Path | bool], Embedder]:
            return lambda cache: Embedder(
                vision=str(tmpd / "clip"),
                text=str(tmpd / "xlmr"),
                text_layer=layer,
                cache_dir=cache,
                batch_size=bs,
                progress=False,
            )

        log("paper architectures (CLIP ViT-B/32 patch mean; XLM-R-base):")
        results["paper_layer0"] = bench_pair("layer 0 (shortcut)", paper_arch(0), images, texts, tmpd / "c0")
        sub = texts[:n_full]
        short = bench_pair(f"layer 0, first {len(sub)} texts", paper_arch(0), [], sub, tmpd / "c0b")
        full = bench_pair(
            f"layer 12 (full forward), same {len(sub)} texts", paper_arch(12), [], sub, tmpd / "c12"
        )
        results["paper_layer12"] = full
        ratio = short["texts_per_s_cold"] / full["texts_per_s_cold"]
        results["layer0_speedup"] = ratio
        log(f"  layer-0 shortcut vs full 12-layer forward: {ratio:.1f}x faster")

        log("offline profile (EfficientNet-Lite0 -> 384 projection; all-MiniLM-L6-v2 last layer):")
        results["offline"] = bench_pair(
            "offline",
            lambda cache: Embedder.from_profile("offline", cache_dir=cache, batch_size=bs, progress=False),
            images,
            texts,
            tmpd / "coff",
        )

        log(
            "unique-content saving, synthetic 35-scenario layout "
            "(tiny encoders; counts do not depend on size):"
        )
        save_tiny_clip_vision(tmpd / "tclip")
        save_tiny_xlmr(tmpd / "txlmr")
        results["layout"] = lay = bench_layout(
            lambda cache: Embedder(
                vision=str(tmpd / "tclip"),
                text=str(tmpd / "txlmr"),
                cache_dir=cache,
                batch_size=64,
                progress=False,
            ),
            tmpd / "clay",
        )
        # what the saving is worth with the paper's architectures at the measured CPU rates
        p = results["paper_layer0"]
        n = lay["samples"]
        without = n / p["images_per_s_cold"] + 3 * n / p["texts_per_s_cold"]
        with_dedup = (
            lay["cold"]["image_calls"] / p["images_per_s_cold"]
            + lay["cold"]["text_calls"] / p["texts_per_s_cold"]
        )
        results["layout_estimated_seconds_paper_arch"] = {"no_dedup": without, "dedup_cold": with_dedup}
        log(
            f"  at the measured CLIP/XLM-R(layer 0) rates: ~{without:.0f} s without dedup/cache, "
            f"~{with_dedup:.0f} s cold with it, warm: cache reads only"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()

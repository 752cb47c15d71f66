"""Multi-process embedding: ``torchrun --nproc_per_node 2`` (gloo, CPU) equals one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_embed import dist_inputs, save_tiny_clip_vision, save_tiny_xlmr

from lmms_emi.embed import Embedder, gather_rows, shard_indices

HERE = Path(__file__).resolve().parent


def test_shard_indices_cover_once() -> None:
    shards = [shard_indices(11, r, 3) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(11))
    assert [len(s) for s in shards] == [4, 4, 3]


def test_gather_rows_single_process_orders_rows() -> None:
    rows = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    out = gather_rows([2, 0, 1], rows, 3)
    torch.testing.assert_close(out, rows[[1, 2, 0]])
    with pytest.raises(RuntimeError, match="unfilled"):
        gather_rows([0, 1], rows[:2], 3)


def test_two_processes_equal_one(tmp_path: Path) -> None:
    clip = save_tiny_clip_vision(tmp_path / "clip")
    xlmr = save_tiny_xlmr(tmp_path / "xlmr")
    out, cache = tmp_path / "out", tmp_path / "cache2"
    out.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(HERE / "helpers_embed.py"),
        str(out),
        str(clip),
        str(xlmr),
        str(cache),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2

    ims, texts = dist_inputs()
    one = Embedder(vision=str(clip), text=str(xlmr), cache_dir=False, batch_size=2, progress=False)
    z_img, z_txt = one.embed_images(ims), one.embed_texts(texts)
    for r in (r0, r1):  # every rank holds the full result, in sample order
        torch.testing.assert_close(r["img"], z_img, atol=1e-6, rtol=0)
        torch.testing.assert_close(r["txt"], z_txt, atol=1e-6, rtol=0)
    # each rank encoded only its strided shard of the unique items (5 images, 6 texts)
    assert [r["stats"]["image"]["encoder_calls"] for r in (r0, r1)] == [3, 2]
    assert [r["stats"]["text"]["encoder_calls"] for r in (r0, r1)] == [3, 3]
    # both ranks wrote their shard to the shared cache: a later single-process run is all hits
    warm = Embedder(vision=str(clip), text=str(xlmr), cache_dir=cache, progress=False)
    torch.testing.assert_close(warm.embed_images(ims), z_img, atol=1e-6, rtol=0)
    torch.testing.assert_close(warm.embed_texts(texts), z_txt, atol=1e-6, rtol=0)
    assert warm.stats.encoder_calls == 0 and warm.stats.cache_hits == 11

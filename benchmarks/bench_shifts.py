"""Rows per second of ``lmms-emi make-shifts``: the paper's 7 x 5 grid (defocus blur and frost at severities
1/3/5, typos and synonym replacement at two levels) over a generated source.

The source: ``--rows`` rows of ``--side`` px photos (the ``skimage.data`` photos, cycled, each cropped at a
row-dependent offset so no two rows are equal), written as PNG files with a JSONL, in a temp folder. One
source row becomes 35 written rows (one per split): "source rows/s" counts source rows, "written rows/s"
the rows of all splits. The one-time start (imports, WordNet load, worker start) is timed apart.

Usage::

    python benchmarks/bench_shifts.py                      # 200 rows of 224 px, 2 workers
    python benchmarks/bench_shifts.py --rows 1000 --workers 4 --side 336

Times depend on the cores free: run with nothing else running.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "hubble_deep_field", "retina")


def write_source(folder: Path, rows: int, side: int) -> Path:
    import skimage.data

    folder.mkdir(parents=True, exist_ok=True)
    bases = []
    for name in PHOTOS:
        img = Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB")
        img.thumbnail((side + 32, side + 32))
        bases.append(img.resize((side + 32, side + 32)))
    with (folder / "source.jsonl").open("w") as handle:
        for i in range(rows):
            dx, dy = i % 32, (i // 32) % 32
            bases[i % len(bases)].crop((dx, dy, dx + side, dy + side)).save(folder / f"{i}.png")
            question = f"What is the main subject of this image, and what stands out in picture {i}?"
            handle.write(
                json.dumps({"image": f"{i}.png", "question": question, "reference_answer": "x"}) + "\n"
            )
    return folder / "source.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--side", type=int, default=224)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    from lmms_emi.shifts.family import FamilySpec
    from lmms_emi.shifts.source import open_source
    from lmms_emi.shifts.write import make_family

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source_file = write_source(root / "src", args.rows, args.side)
        spec = FamilySpec("bench")
        t0 = time.perf_counter()
        warm = FamilySpec.from_names("warm", ["frost_1"], [t.name for t in spec.text])
        make_family(open_source(str(write_source(root / "w", 2, 64))), warm, root / "warm", progress=False)
        start_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        result = make_family(open_source(str(source_file)), spec, root / "out", workers=args.workers)
        run_s = time.perf_counter() - t1
        splits = len(result.manifest["splits"])
        print(
            f"make-shifts, {splits} splits, {args.rows} rows of {args.side} px, {args.workers} workers: "
            f"{run_s:.1f} s = {args.rows / run_s:.2f} source rows/s "
            f"({args.rows * splits / run_s:.1f} written rows/s); "
            f"one-time start (imports, WordNet) {start_s:.1f} s"
        )


if __name__ == "__main__":
    main()

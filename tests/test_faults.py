"""Fault injection and hostile inputs (issue 9): each is a one-line error or a flagged result, never an
unflagged number; a killed run leaves nothing corrupt and its rerun gives the same numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmms_emi.errors import ReplayError


# --- the replay model with strict=false --------------------------------------------------------------
def _replay_model(responses: Path, rows: int, *, strict: str = "false"):
    import datasets

    from lmms_emi.harness.replay_model import ReplayModel

    model = ReplayModel(responses=str(responses), model_name="m", strict=strict)
    model.task_dict = {"my_task": {"test": datasets.Dataset.from_dict({"question_id": list(range(rows))})}}
    return model


class _Request:  # the positional args lmms-eval's Instance carries for generate_until
    def __init__(self, doc_id: int) -> None:
        self.args = ("ctx", {}, None, doc_id, "my_task", "test")


def test_replay_without_strict_leaves_only_the_missing_rows_empty(tmp_path, capsys):
    lines = [json.dumps({"question_id": i, "text": f"answer {i}"}) for i in range(10) if i not in (2, 7, 9)]
    (tmp_path / "my_task_m.jsonl").write_text("\n".join(lines) + "\n")
    model = _replay_model(tmp_path, 10)
    out = model.generate_until([_Request(i) for i in range(10)])
    assert out == [("" if i in (2, 7, 9) else f"answer {i}") for i in range(10)]
    assert model.missing_rows == {"my_task": 3}
    err = capsys.readouterr().err
    assert "emi_replay: warning: task my_task: 3 of 10 rows have no saved response" in err
    assert "question_id 2, 7, 9" in err
    with pytest.raises(ReplayError, match=r"task my_task: .*no response for question_id 2, 7, 9"):
        _replay_model(tmp_path, 10, strict="true").generate_until([_Request(0)])


def test_replay_without_strict_still_refuses_a_malformed_file(tmp_path):
    (tmp_path / "my_task_m.jsonl").write_text('{"question_id": 0, "text": "a"}\n{oops\n')
    with pytest.raises(ReplayError, match=r"my_task_m\.jsonl:2: invalid JSON"):
        _replay_model(tmp_path, 2).generate_until([_Request(0)])


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b'{"question_id": 0, "text": "caf\xe9"}\n', r"m\.jsonl:2: not UTF-8 text \(byte 0xe9"),
        (b'{"question_id": 0, "text": "a\\ud800b"}\n', r"m\.jsonl:2: text has an unpaired surrogate"),
    ],
)
def test_undecodable_response_text_names_the_file_and_line(tmp_path, payload, message):
    from lmms_emi.errors import ResponseFileError
    from lmms_emi.sources.responses import read_response_file

    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"question_id": 1, "text": "fine"}\n' + payload)
    with pytest.raises(ResponseFileError, match=message):
        read_response_file(path)


# --- images that cost more than they weigh --------------------------------------------------------------
def _png(width: int, height: int, mode: str = "1") -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (width, height)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ((20000, 20000), r"400000000 pixels.* limit of"),  # PIL's bomb check or ours
        ((1, 10000), r"aspect ratio 10000:1, more than the limit of 100:1"),
        ((30000, 1), r"aspect ratio 30000:1"),
    ],
)
def test_huge_or_extreme_images_are_refused_before_decoding(size, message):
    import time

    from lmms_emi.embed.inputs import make_image_item
    from lmms_emi.errors import EmbedInputError

    data = _png(*size)
    assert len(data) < 100_000
    item = make_image_item(data, 3, ["chartqa doc_id=7", "b", "c", "chartqa doc_id=9"])
    start = time.perf_counter()
    with pytest.raises(EmbedInputError, match=rf"image for sample 'chartqa doc_id=9' \(index 3\).*{message}"):
        item.load_rgb()
    assert time.perf_counter() - start < 1.0
    from PIL import Image

    with pytest.raises(EmbedInputError, match=message):  # an already-decoded image is checked as well
        make_image_item(Image.new("1", size), 0).load_rgb()


# --- the real CLI under faults ------------------------------------------------------------------------
# Tiny random-weight encoders saved to disk (the real loading code), two scenarios of the demo data.
SCENARIOS = ["llava_bench_coco", "llava_bench_coco_frost_5"]
STEPS = ["--estimator-steps", "300", "--estimator-patience", "0", "--bootstrap", "20"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    from helpers_embed import save_tiny_clip_vision, save_tiny_xlmr

    from lmms_emi.cli import main

    root = tmp_path_factory.mktemp("faults")
    vision, text = save_tiny_clip_vision(root / "clip"), save_tiny_xlmr(root / "xlmr")
    args = ["demo-data", str(root / "demo"), "--scenarios", *SCENARIOS, "--n-images", "6"]
    assert main([*args, "--questions-per-image", "3"]) == 0
    encoders = [
        "--vision-encoder",
        f"hf-clip:{vision}",
        "--text-encoder",
        f"hf-text:{text}",
        "--text-layer",
        "0",
    ]
    return {"root": root, "demo": root / "demo", "encoders": encoders}


def _score_args(
    world: dict, out: Path, cache: Path | str, *extra: str, demo: Path | None = None
) -> list[str]:
    demo = demo or world["demo"]
    data = ["--dataset", str(demo / "dataset"), "--responses", str(demo / "responses")]
    return ["score", *data, *world["encoders"], "--emi-cache", str(cache), "--output-path", str(out), *extra]


def _numbers(out: Path) -> dict:
    """The analysis of a report folder without its paths: tasks, correlations, settings."""
    (report,) = sorted(out.glob("*emi_report_synthetic.json"))
    data = json.loads(report.read_text())
    return {k: data[k] for k in ("tasks", "correlations", "settings")}


def _one_error_line(err: str, command: str = "score") -> str:
    lines = [x for x in err.splitlines() if x.startswith(f"lmms-emi {command}: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _check_cache(cache: Path, *, killed: bool = False) -> int:
    """Every entry verifies; nothing else is left in the cache, except (``killed``) the temp file a writer
    killed mid-write may leave where the filesystem cannot link unnamed files: the next run removes it.
    Returns the entry count."""
    from safetensors import safe_open

    from lmms_emi.embed.cache import _decode

    entries = 0
    for path in cache.rglob("*"):
        if path.is_dir() or path.name.startswith(".write-probe"):
            continue
        if killed and path.name.startswith(".") and path.name.endswith(".tmp"):
            continue
        assert path.suffix == ".safetensors" and not path.name.startswith("."), f"orphan {path}"
        with safe_open(str(path), framework="pt") as fh:
            dim = fh.get_slice("z").get_shape()[0]
        assert _decode(path.read_bytes(), path.stem, dim) is not None, f"corrupt entry {path}"
        entries += 1
    return entries


@pytest.fixture(scope="module")
def reference(world) -> dict:
    """One clean run: its numbers, its cache, its fitted estimator."""
    from lmms_emi.cli import main

    out, cache = world["root"] / "ref", world["root"] / "ref_cache"
    assert main([*_score_args(world, out, cache, *STEPS, "-q")]) == 0
    (ckpt,) = sorted(out.glob("*club_fitted.safetensors"))
    return {"numbers": _numbers(out), "entries": _check_cache(cache), "checkpoint": ckpt, "cache": cache}


def _kill_when(args: list[str], ready, *, max_delay: float, seed: int) -> str:
    """Start ``lmms-emi args`` and SIGKILL it at a random moment (up to ``max_delay`` s) after ``ready(stderr
    so far)`` becomes true; returns its stderr. Fails if the run finished first."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import threading
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmms_emi.cli", *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env=env,
    )
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stderr.read1(4096), b"")))
    reader.start()
    deadline = time.monotonic() + 120
    while not ready(b"".join(chunks).decode(errors="replace")):
        assert proc.poll() is None, (
            "the run ended before the fault point: " + b"".join(chunks).decode()[-2000:]
        )
        assert time.monotonic() < deadline
        time.sleep(0.002)
    time.sleep(random.Random(seed).uniform(0, max_delay))
    assert proc.poll() is None, "the run ended before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reader.join()
    assert proc.returncode == -signal.SIGKILL
    return b"".join(chunks).decode(errors="replace")


def test_sigkill_during_embedding_then_rerun_gives_the_same_numbers(world, reference):
    from lmms_emi.cli import main

    out, cache = world["root"] / "kill_embed", world["root"] / "kill_embed_cache"
    args = _score_args(world, out, cache, *STEPS, "--emi-batch-size", "1")
    _kill_when(
        args, lambda _err: cache.is_dir() and any(cache.rglob("*.safetensors")), max_delay=0.05, seed=1
    )
    partial = _check_cache(cache, killed=True)  # nothing corrupt
    assert 0 < partial < reference["entries"]
    assert not out.exists() or [p.name for p in out.iterdir()] == []  # no report, no staging folder
    assert main([*args, "-q"]) == 0
    assert _numbers(out) == reference["numbers"]
    assert _check_cache(cache) == reference["entries"]


def test_sigkill_during_the_fit_then_corrupt_cache_then_rerun_gives_the_same_numbers(world, reference):
    from lmms_emi.cli import main

    out, cache = world["root"] / "kill_fit", world["root"] / "kill_fit_cache"
    args = _score_args(world, out, cache, *STEPS)
    _kill_when(args, lambda err: "CLUB fit" in err, max_delay=0.3, seed=2)
    assert _check_cache(cache) == reference["entries"]  # the embedding had finished
    assert not out.exists() or [p.name for p in out.iterdir()] == []
    entries = sorted(cache.rglob("*.safetensors"))
    entries[0].write_bytes(entries[0].read_bytes()[:-9])  # truncated
    flipped = bytearray(entries[1].read_bytes())
    flipped[-2] ^= 0x08
    entries[1].write_bytes(bytes(flipped))  # a bit flipped in the vector
    import re

    with pytest.warns(UserWarning, match="corrupt or truncated embedding cache entr") as caught:
        assert main([*args, "-q"]) == 0
    found = [re.match(r"(\d+) corrupt or truncated", str(w.message)) for w in caught]
    assert sum(int(m.group(1)) for m in found if m) == 2  # one warning per modality with bad entries
    assert _numbers(out) == reference["numbers"]
    assert _check_cache(cache) == reference["entries"]  # repaired


def test_a_checkpoint_with_flipped_bits_is_one_error_before_any_embedding(world, reference, tmp_path, capsys):
    from lmms_emi.cli import main

    data = bytearray(reference["checkpoint"].read_bytes())
    for offset in (-11, -523, -2049):
        data[offset] ^= 0x40
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(data))
    code = main(_score_args(world, tmp_path / "out", "off", "--estimator", str(bad), "-q"))
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and "flipped.safetensors: its tensors do not match the checksum" in line
    assert not any((tmp_path / "out").glob("*emi_report*"))


def test_score_into_a_path_under_a_regular_file_is_one_error(world, tmp_path, capsys):
    from lmms_emi.cli import main

    (tmp_path / "file").write_text("x")
    code = main(_score_args(world, tmp_path / "file" / "out", "off", "-q"))
    assert code == 2 and "cannot write there" in _one_error_line(capsys.readouterr().err)


def _edit_responses(src: Path, dst: Path, edit) -> Path:
    """A copy of the demo data whose response texts are ``edit(split, row, text)``."""
    import shutil

    shutil.copytree(src, dst)
    for path in (dst / "responses").glob("*.jsonl"):
        split = path.name.removesuffix("_demo-model.jsonl")
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        for i, row in enumerate(rows):
            row["text"] = edit(split, i, row["text"])
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dst


def test_empty_answers_and_tiny_splits_are_flagged_not_reported_as_results(world, tmp_path, capsys):
    from lmms_emi.cli import main
    from lmms_emi.pipeline.shift import MIN_INTERVAL_SAMPLES

    def blank(split: str, row: int, text: str) -> str:
        if split == SCENARIOS[1]:
            return " \n"  # every answer of the OOD task is blank
        return "" if row % 2 else text  # half of the ID task's

    demo = _edit_responses(world["demo"], tmp_path / "demo", blank)
    out = tmp_path / "out"
    assert main(_score_args(world, out, "off", "--estimator-steps", "30", "-q", demo=demo)) == 0
    err = capsys.readouterr().err
    tasks = {t["task"]: t for t in _numbers(out)["tasks"]}
    id_task, ood_task = (f"lbshift_syn_{s}" for s in SCENARIOS)
    assert "9 of 18 responses are empty or whitespace" in tasks[id_task]["warnings"]
    assert any("all 18 responses are empty or whitespace" in w for w in tasks[ood_task]["warnings"])
    assert any("all 18 response embeddings are identical" in w for w in tasks[ood_task]["warnings"])
    assert f"lmms-emi: warning: {ood_task}: all 18 responses are empty" in err
    (md,) = out.glob("*emi_report_synthetic.md")
    assert f"`{ood_task}` ⚠" in md.read_text() and "## Warnings" in md.read_text()
    (csv_file,) = out.glob("*emi_report_synthetic.csv")
    assert "all 18 responses are empty" in csv_file.read_text()

    # a split below the interval minimum: numbers, no interval, and the reason
    small = tmp_path / "small"
    args = [
        "demo-data",
        str(small),
        "--scenarios",
        *SCENARIOS,
        "--n-images",
        "2",
        "--questions-per-image",
        "1",
    ]
    assert main(args) == 0
    out = tmp_path / "out_small"
    assert main(_score_args(world, out, "off", "--estimator-steps", "30", "-q", demo=small)) == 0
    for t in _numbers(out)["tasks"]:
        assert t["n"] == 2 < MIN_INTERVAL_SAMPLES and t["emi"] is not None and t["emi_ci"] is None
        assert (
            f"only 2 samples: no bootstrap interval (needs at least {MIN_INTERVAL_SAMPLES})" in t["warnings"]
        )


def test_an_extreme_image_in_the_dataset_is_one_error_naming_the_doc(world, tmp_path, capsys):
    import shutil

    import datasets

    from lmms_emi.cli import main

    demo = tmp_path / "demo"
    shutil.copytree(world["demo"] / "responses", demo / "responses")
    dd = datasets.load_from_disk(str(world["demo"] / "dataset"))
    strip = _png(1, 10000)
    split = SCENARIOS[1]
    dd[split] = dd[split].cast_column("image", datasets.Image(decode=False))
    dd[split] = dd[split].map(
        lambda row, i: {"image": {"bytes": strip, "path": None}} if i == 4 else {}, with_indices=True
    )
    dd[split] = dd[split].cast_column("image", datasets.Image())
    dd.save_to_disk(str(demo / "dataset"))
    code = main(_score_args(world, tmp_path / "out", "off", "-q", demo=demo))
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and f"lbshift_syn_{split} doc_id=" in line and "aspect ratio 10000:1" in line


def test_train_estimator_pools_each_sample_once_and_says_from_where(world, reference, tmp_path, capsys):
    import shutil

    from lmms_emi.cli import main

    (src,) = sorted((world["root"] / "ref").glob("*emi_embeddings.safetensors"))
    run_a, run_b = tmp_path / "run_a", tmp_path / "run_b"
    for folder in (run_a, run_b / "emi_report"):
        folder.mkdir(parents=True)
    shutil.copy(src, run_a / src.name)
    shutil.copy(src, run_b / "emi_report" / "emi_embeddings.safetensors")  # what `analyze` wrote in RUN_B
    ckpt = tmp_path / "club.safetensors"
    args = ["train-estimator", str(run_a), str(run_b), "--output-path", str(ckpt), "--estimator-steps", "5"]
    assert main([*args, "-q"]) == 0
    out = capsys.readouterr().out
    assert f"pooled 36 of 36 samples (2 tasks) from {run_a / src.name}" in out
    assert "pooled 0 of 36 samples (0 tasks) from" in out and "36 already pooled, skipped" in out
    assert "fitted on 2 tasks, 72 pairs" in out


def test_train_estimator_refuses_files_of_other_dims_in_one_line(world, tmp_path, capsys):
    from lmms_emi.cli import main
    from lmms_emi.embed.store import load_embeddings, save_embeddings
    from lmms_emi.emi import TaskEmbeddings

    (src,) = sorted((world["root"] / "ref").glob("*emi_embeddings.safetensors"))
    tasks, spec = load_embeddings(src)
    narrow = {t: TaskEmbeddings(*(None if z is None else z[:, :16] for z in e)) for t, e in tasks.items()}
    other = save_embeddings(narrow, tmp_path / "narrow_emi_embeddings.safetensors", encoders=spec)
    args = ["train-estimator", str(src), str(other), "--output-path", str(tmp_path / "c.safetensors")]
    assert main(args) == 2
    line = _one_error_line(capsys.readouterr().err, "train-estimator")
    assert "narrow_emi_embeddings.safetensors task 'lbshift_syn_llava_bench_coco': embeddings of dims" in line


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--confidence", "1.5"], "--confidence must be in (0, 1), got 1.5"),
        (["--estimator-steps", "0"], "--estimator-steps must be >= 1, got 0"),
        (["--entropy-scale", "inf"], "--entropy-scale must be a finite number >= 0, got inf"),
        (["--output_path", "FILE/sub"], "--output_path FILE/sub: cannot write there"),
    ],
)
def test_eval_refuses_bad_options_before_any_generation(world, tmp_path, capsys, option, message):
    import time

    from lmms_emi.cli import main

    (tmp_path / "FILE").write_text("x")
    option = [str(tmp_path / o) if o.startswith("FILE") else o for o in option]
    message = message.replace("FILE", str(tmp_path / "FILE"))
    replay = f"responses={world['demo'] / 'responses'},model_name=demo-model"
    args = [
        "eval",
        "--model",
        "emi_replay",
        "--model_args",
        replay,
        "--tasks",
        "lbshift_syn_llava_bench_coco",
    ]
    args += ["--data", f"synthetic={world['demo'] / 'dataset'}", *world["encoders"]]
    if "--output_path" not in option:
        args += ["--output_path", str(tmp_path / "out")]
    start = time.perf_counter()
    assert main([*args, *option]) == 2
    assert message in _one_error_line(capsys.readouterr().err, "eval")
    assert time.perf_counter() - start < 30 and not (tmp_path / "out").exists()


def test_temp_files_of_killed_writers_are_swept_when_the_cache_opens(tmp_path):
    """A writer killed between writing its temp file and renaming it leaves ``.<name>.<pid>.<rand>.tmp``;
    the next cache on that folder removes it, and keeps a running writer's."""
    import os
    import subprocess
    import sys

    from lmms_emi.embed.cache import EmbeddingCache

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    shard = tmp_path / "ab"
    shard.mkdir(parents=True)
    orphan = shard / f".abcd.safetensors.{dead.pid}.k2j4x.tmp"
    live = shard / f".abcd.safetensors.{os.getpid()}.q9z1w.tmp"
    for p in (orphan, live):
        p.write_bytes(b"half")
    EmbeddingCache(tmp_path)
    assert not orphan.exists() and live.exists()

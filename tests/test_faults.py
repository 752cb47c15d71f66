"""Fault injection and hostile inputs (issue 9): each is a one-line error or a flagged result, never an
unflagged number; a killed run leaves nothing corrupt and its rerun gives the same numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmms_emi import lmms_eval_compat
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
        ((20000, 20000), r"limit of 64,000,000 pixels"),  # PIL's bomb check, quoting our limit
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
# the paper's Adam fit: its progress bar ("CLUB fit") is the fault point of the kill test
STEPS = ["--estimator-steps", "300", "--estimator-patience", "0", "--bootstrap", "20"]
STEPS += ["--estimator-fit", "paper"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    from helpers_embed import save_tiny_clip_vision, save_tiny_xlmr, tiny_encoder_flags

    from lmms_emi.cli import main

    root = tmp_path_factory.mktemp("faults")
    vision, text = save_tiny_clip_vision(root / "clip"), save_tiny_xlmr(root / "xlmr")
    args = ["demo-data", str(root / "demo"), "--scenarios", *SCENARIOS, "--n-images", "6"]
    assert main([*args, "--questions-per-image", "3"]) == 0
    encoders = tiny_encoder_flags(vision, text)
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
    if option[0] == "--output_path":
        args = _eval_args(world, Path(option[1]))
    else:
        args = _eval_args(world, tmp_path / "out", *option)
    start = time.perf_counter()
    assert main(args) == 2
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


# === issue 17: every published number sane, every failure one line ==================================
# --- a full disk (injected: the kernel's always-full /dev/full behind atomic_write's temp files) --------
_RUST_ENOSPC = (
    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left" })'
)


@pytest.fixture
def disk_full(monkeypatch):
    """``arm(folder, *names)``: from then on every file :func:`lmms_emi._io.atomic_write` writes under
    ``folder`` (whose name contains one of ``names``, when given) hits a full disk. Its temp file is a link to
    /dev/full, so text, JSON and PNG writers get the kernel's own ENOSPC; safetensors (which writes through
    its own temp file, replacing the link) raises its ``SafetensorError`` as it does on a full disk."""
    import os
    import secrets

    import safetensors
    import safetensors.torch

    from lmms_emi import _io

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    armed: list[tuple[Path, tuple[str, ...]]] = []
    real_create, real_save = _io._create_temp, safetensors.torch.save_file

    def create(folder: Path, name: str) -> Path:
        for root, names in armed:
            if (folder == root or root in folder.parents) and (not names or any(n in name for n in names)):
                tmp = folder / f".{name}.{os.getpid()}.{secrets.token_hex(4)}{_io.TEMP_SUFFIX}"
                os.symlink("/dev/full", tmp)
                return tmp
        return real_create(folder, name)

    def save_file(tensors, filename, metadata=None):
        if Path(filename).is_symlink() and os.path.realpath(filename) == "/dev/full":
            raise safetensors.SafetensorError(_RUST_ENOSPC)
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(_io, "_create_temp", create)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    monkeypatch.setattr("lmms_emi.embed.store.save_file", save_file)
    return lambda folder, *names: armed.append((Path(folder), names))


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_atomic_write_on_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, disk_full):
    import torch

    from lmms_emi._io import WriteFailed, atomic_write_text, os_error_of
    from lmms_emi.embed.store import save_embeddings
    from lmms_emi.emi import TaskEmbeddings

    old = tmp_path / "report.json"
    old.write_text("earlier")
    disk_full(tmp_path)
    with pytest.raises(WriteFailed) as err:
        atomic_write_text(old, "new")
    assert str(err.value) == (
        f"cannot write {old}: No space left on device; free some space or choose another folder "
        "(nothing was written)"
    )
    assert isinstance(err.value, OSError) and err.value.errno == 28
    z = torch.zeros(3, 4)
    with pytest.raises(WriteFailed, match=r"cannot write .*emb\.safetensors: No space left on device"):
        save_embeddings({"t": TaskEmbeddings(z, z, z, z)}, tmp_path / "emb.safetensors", encoders={})
    assert _tree(tmp_path) == ["report.json"] and old.read_text() == "earlier"
    assert os_error_of(ValueError("no os error here")) is None


def test_a_full_disk_fails_the_writability_probe(tmp_path, monkeypatch, capsys):
    """Creating a file succeeds on a full disk; the probe writes bytes, which does not."""
    import errno
    import os

    from lmms_emi import _io
    from lmms_emi.pipeline.preflight import check_outputs

    real_write = os.write

    def write(fd, data):
        if len(data) == _io.PROBE_BYTES:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    from lmms_emi.errors import UsageError

    with pytest.raises(
        UsageError, match=r"--output-path .*out: cannot write there \(No space left on device\)"
    ):
        check_outputs({"--output-path": tmp_path / "out"})
    from lmms_emi.cli import main

    junk = tmp_path / "junk_results.json"
    junk.write_text("{}")
    for args in (
        ["demo-data", str(tmp_path / "demo")],
        ["leaderboard", str(junk), "--output-path", str(tmp_path / "board")],
        ["train-estimator", str(junk), "--output-path", str(tmp_path / "ckpt" / "c.safetensors")],
        ["analyze", str(tmp_path), "--output-path", str(tmp_path / "report")],
    ):
        assert main(args) == 2, args
        line = _one_error_line(capsys.readouterr().err, args[0])
        assert "cannot write there (No space left on device)" in line, line


@pytest.mark.parametrize("full", ["embeddings", "fitted estimator", "report"])
def test_score_on_a_full_disk_is_one_line_and_publishes_nothing(
    world, reference, tmp_path, capsys, disk_full, full
):
    from lmms_emi.cli import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier_emi_report_synthetic.json").write_text("{}")
    names = {"embeddings": "emi_embeddings", "fitted estimator": "club_fitted", "report": "emi_report"}[full]
    disk_full(out, names)
    code = main(_score_args(world, out, reference["cache"], *STEPS, "--estimator", "fit", "-q"))
    line = _one_error_line(capsys.readouterr().err)
    assert (
        code == 1 and f"cannot write {out}/" in line and names in line and "No space left on device" in line
    )
    assert _tree(out) == ["earlier_emi_report_synthetic.json"]  # nothing partial, no staging folder


def test_train_estimator_on_a_full_disk_is_one_line(world, reference, tmp_path, capsys, disk_full):
    from lmms_emi.cli import main

    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "club.safetensors").write_bytes(b"earlier")
    disk_full(out)
    args = ["train-estimator", str(world["root"] / "ref"), "--output-path", str(out / "club.safetensors")]
    assert main([*args, "--estimator-steps", "3", "-q"]) == 1
    line = _one_error_line(capsys.readouterr().err, "train-estimator")
    assert f"cannot write {out / 'club.safetensors'}: No space left on device" in line
    assert _tree(out) == ["club.safetensors"] and (out / "club.safetensors").read_bytes() == b"earlier"


def _results_json(folder: Path, model: str) -> Path:
    """A small results JSON in lmms-eval's layout with an EMI section (as tests/test_leaderboard.py)."""
    encoders = {"vision": {"name": "enc-v", "dim": 8}, "text": {"name": "t", "dim": 8}}
    estimator = {"name": "frozen-x", "sha256": "ab" * 32, "comparability": "global", "encoders": encoders}
    tasks = [
        {"task": "t_id", "shift_kind": "id", "n": 10, "emi": 0.5, "emi_ci": [0.25, 0.75]},
        {"task": "t_vis", "shift_kind": "visual", "n": 10, "emi": 0.25, "emi_ci": None, "emid": 0.25,
         "bound": 1.5},
    ]  # fmt: skip
    analysis = {"id_task": "t_id", "tasks": tasks, "settings": {"confidence_level": 0.95}, "correlations": {}}
    data = {
        "results": {"t_id": {"emi,none": 0.5}, "t_vis": {"emi,none": 0.25, "emid,none": 0.25}},
        "config": {"model": "replay"},
        "lmms_emi": {
            "estimator": estimator,
            "benchmarks": {"bench": {**analysis, "metadata": {"model": model}}},
        },
    }
    path = folder / f"{model}_results.json"
    path.write_text(json.dumps(data))
    return path


def test_leaderboard_on_a_full_disk_is_one_line(tmp_path, capsys, disk_full):
    from lmms_emi.cli import main

    results = _results_json(tmp_path, "model-a")
    board = tmp_path / "board"
    board.mkdir()
    (board / "leaderboard.md").write_text("earlier")
    disk_full(board)
    assert main(["leaderboard", str(results), "--output-path", str(board), "--overwrite"]) == 1
    line = _one_error_line(capsys.readouterr().err, "leaderboard")
    assert f"cannot write {board}/leaderboard." in line and "No space left on device" in line
    assert (board / "leaderboard.md").read_text() == "earlier"
    assert not [p for p in board.iterdir() if p.name.startswith(".")]  # no temp file left


def _eval_args(
    world: dict, out: Path, *extra: str, responses: Path | None = None, strict: bool = True
) -> list[str]:
    replay = f"responses={responses or world['demo'] / 'responses'},model_name=demo-model"
    replay += "" if strict else ",strict=false"
    args = [
        "eval",
        "--model",
        "emi_replay",
        "--model_args",
        replay,
        "--tasks",
        "lbshift_syn_llava_bench_coco",
    ]
    args += [
        "--data",
        f"synthetic={world['demo'] / 'dataset'}",
        *world["encoders"],
        "--output_path",
        str(out),
    ]
    return [*args, *extra]


def test_eval_refuses_a_disk_too_small_for_the_run_before_generation(world, tmp_path, capsys, monkeypatch):
    import shutil

    from lmms_emi.cli import main
    from lmms_emi.harness import launch

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=3 * 2**20))  # 3 MiB free
    out = tmp_path / "out"
    assert main(_eval_args(world, out, "--emi-cache", str(tmp_path / "cache"))) == 2
    line = _one_error_line(capsys.readouterr().err, "eval")
    assert f"--output_path {out}" in line and "only 3 MiB free on that disk" in line
    need = launch.OUTPUT_BYTES_PER_RUN + launch.ROWS_PER_TASK * (
        launch.OUTPUT_BYTES_PER_SAMPLE + launch.CACHE_BYTES_PER_SAMPLE
    )
    assert f"needs about {need / 2**20:,.0f} MiB" in line
    assert not any(out.rglob("*.json"))  # no generation ran


def test_eval_on_a_full_disk_is_refused_by_the_probe(world, tmp_path, capsys, monkeypatch):
    import errno
    import os

    from lmms_emi import _io
    from lmms_emi.cli import main

    real_write = os.write
    monkeypatch.setattr(
        os,
        "write",
        lambda fd, data: (
            (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
            if len(data) == _io.PROBE_BYTES
            else real_write(fd, data)
        ),
    )
    out = tmp_path / "out"
    assert main(_eval_args(world, out)) == 2
    line = _one_error_line(capsys.readouterr().err, "eval")
    assert f"--output_path {out}: cannot write there (No space left on device)" in line


def test_a_failed_emi_step_leaves_no_results_json_without_emi(tmp_path):
    from lmms_emi._io import WriteFailed
    from lmms_emi.harness.launch import _without_emi

    results = tmp_path / "20261206_053000_results.json"
    results.write_text('{"results": {"t": {"emi,none": null}}}')
    error = _without_emi(WriteFailed(28, "No space left on device", str(tmp_path / "r.png")), results)
    assert error.exit_code == 1 and "\n" not in str(error)
    assert str(error).startswith(f"cannot write {tmp_path / 'r.png'}: No space left on device")
    aside = tmp_path / "20261206_053000_results.incomplete.json"
    assert f"moved to {aside}" in str(error)
    assert _tree(tmp_path) == [aside.name] and "emi,none" in aside.read_text()
    # a step refused on its data (not a failed write) leaves lmms-eval's results JSON where it is
    results.write_text("{}")
    error = _without_emi(ValueError("task 't' has 1 sample(s)"), results)
    assert str(error) == "task 't' has 1 sample(s)" and results.exists()


# --- options from the environment in plain lmms-eval -----------------------------------------------------
@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("LMMS_EMI_OPTIONS", '{"bootstrap": "many"}', "LMMS_EMI_OPTIONS key 'bootstrap'"),
        ("LMMS_EMI_OPTIONS", "{not json", "LMMS_EMI_OPTIONS"),
        ("LMMS_EMI_BOOTSTRAP", "many", "LMMS_EMI_BOOTSTRAP"),
    ],
)
def test_plain_lmms_eval_stops_on_a_malformed_option_variable(monkeypatch, capsys, variable, value, message):
    """The hook runs inside lmms-eval's model registry (whose ``except Exception`` would let the command go
    on without the plugin): a bad variable is one line and a non-zero exit, before any generation."""
    from lmms_emi.harness import hook

    monkeypatch.setattr(hook, "_status", None)
    monkeypatch.setattr(lmms_eval_compat, "installed_version", lambda: "0.7.3")
    monkeypatch.setenv(variable, value)
    argv = ["lmms-eval", "--model", "emi_replay", "--tasks", "lbshift_syn_llava_bench_coco"]
    with pytest.raises(SystemExit) as stop:
        hook.install(argv, in_cli=True)
    assert not isinstance(stop.value, Exception)  # passes lmms-eval's `except Exception`
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("lmms-emi: error: "), err
    assert message in err[0]


@pytest.mark.slow
def test_plain_lmms_eval_subprocess_stops_on_a_malformed_option_variable(world, tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    lmms_eval = shutil.which("lmms-eval", path=os.path.dirname(sys.executable))
    if lmms_eval is None:
        pytest.skip("lmms-eval is not installed")
    out = tmp_path / "out"
    env = {**os.environ, "LMMS_EMI_OPTIONS": '{"bootstrap": "many"}', "LMMS_EMI_BUILTIN_TASKS": "0"}
    env["LMMS_EMI_DATA"] = f"synthetic={world['demo'] / 'dataset'}"
    replay = f"responses={world['demo'] / 'responses'},model_name=demo-model"
    cmd = [
        lmms_eval,
        "--model",
        "emi_replay",
        "--model_args",
        replay,
        "--tasks",
        "lbshift_syn_llava_bench_coco",
    ]
    proc = subprocess.run(
        [*cmd, "--output_path", str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    errors = [x for x in proc.stderr.splitlines() if x.startswith("lmms-emi: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "LMMS_EMI_OPTIONS key 'bootstrap'" in errors[0]
    assert "Traceback" not in proc.stderr and not out.exists()


# --- outputs before inputs ----------------------------------------------------------------------------------
def test_every_subcommand_checks_its_outputs_before_reading_any_input(world, tmp_path, capsys):
    """Each input is garbage that fails when read; each output is under a regular file: the output is what
    each command names."""
    from lmms_emi.cli import main

    (tmp_path / "FILE").write_text("x")
    blocked = tmp_path / "FILE" / "out"
    junk = tmp_path / "junk"
    (junk / "dataset").mkdir(parents=True)
    (junk / "dataset" / "dataset_dict.json").write_text("{garbage")
    (junk / "responses").mkdir()
    (junk / "responses" / "llava_bench_coco_m.jsonl").write_text("{garbage\n")
    (junk / "x_samples_lbshift_syn_llava_bench_coco.jsonl").write_text("{garbage\n")
    (junk / "x_results.json").write_text("{garbage")
    (junk / "e_emi_embeddings.safetensors").write_bytes(b"garbage")
    data = ["--dataset", str(junk / "dataset"), "--responses", str(junk / "responses")]
    commands = {
        "score": ["score", *data, "--output-path", str(blocked)],
        "analyze": ["analyze", str(junk), "--output-path", str(blocked)],
        "eval": [
            "eval", "--model", "emi_replay", "--tasks", "lbshift_syn_llava_bench_coco",
            "--data", f"synthetic={junk / 'dataset'}", "--output_path", str(blocked),
        ],
        "train-estimator": [
            "train-estimator", str(junk / "e_emi_embeddings.safetensors"),
            "--output-path", str(blocked / "c.st"),
        ],
        "leaderboard": ["leaderboard", str(junk / "x_results.json"), "--output-path", str(blocked)],
        "demo-data": ["demo-data", str(blocked)],
    }  # fmt: skip
    for command, args in commands.items():
        assert main([*args, *world["encoders"]] if command in ("score", "analyze") else args) == 2, command
        line = _one_error_line(capsys.readouterr().err, command)
        assert f"{blocked}: cannot write there" in line or f"{blocked / 'c.st'}" in line, line


# --- task names that are paths --------------------------------------------------------------------------
def test_task_paths_outside_the_task_folders_are_refused_before_lmms_eval(tmp_path, capsys, monkeypatch):
    from lmms_emi.cli import main
    from lmms_emi.errors import UsageError
    from lmms_emi.harness.selection import task_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    import os

    for value, why in [
        (os.path.relpath("/etc/passwd", tmp_path), "not a task .yaml file"),  # ../../../etc/passwd
        ("/etc/passwd", "not a task .yaml file"),
        ("notes.txt", "not a task .yaml file"),
        ("./nope.yaml", "no such task YAML file or folder"),
        ("empty", None),
        ("lbshift_syn_llava_bench_coco,/etc/passwd", "a task YAML path goes alone"),
    ]:
        if why is None:
            assert task_path(value) is None  # a folder name without a separator is a task name
            continue
        with pytest.raises(UsageError, match=rf"--tasks {value.split(',')[-1]}: {why}"):
            task_path(value)
        assert main(["eval", "--model", "dummy", "--tasks", value, "--output_path", "out"]) == 2
        line = _one_error_line(capsys.readouterr().err, "eval")
        assert why in line and not (tmp_path / "out").exists()
    with pytest.raises(UsageError, match="a folder without task YAMLs"):
        task_path("./empty")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "t.yaml").write_text("task: t\n")
    assert task_path("./mine") == Path("mine") and task_path("mine/t.yaml") == Path("mine/t.yaml")
    assert task_path("lbshift_syn_llava_bench_coco,mme") is None


# --- answers that are not the model's, recorded where the numbers are -------------------------------------
def test_answers_the_replay_model_made_up_are_in_the_task_warnings(tmp_path, monkeypatch):
    """``strict=false`` fills rows without a saved response; the run session counts them per task and the
    note is the first of that task's warnings: ``emi_warnings`` in the results JSON, the report's JSON, CSV
    and Markdown, and the run's warnings."""
    from test_harness import _fake_run

    from lmms_emi.config import EMIConfig
    from lmms_emi.harness import session
    from lmms_emi.harness.results import update_results
    from lmms_emi.harness.session import with_task_notes
    from lmms_emi.report import to_csv, to_markdown

    monkeypatch.setattr(session, "_CURRENT", None)
    run = session.reset(EMIConfig(encoders="offline"))
    lines = [json.dumps({"question_id": i, "text": f"answer {i}"}) for i in range(10) if i not in (2, 7, 9)]
    (tmp_path / "my_task_m.jsonl").write_text("\n".join(lines) + "\n")
    model = _replay_model(tmp_path, 10)
    answers = model.generate_until([_Request(i) for i in range(10)])
    records = [
        run.add_record("my_task", {"emi_doc_id": i, "question_id": i}, answers[i], "q", "r")
        for i in range(10)
    ]
    run.register_samples(records[::-1])  # gathered in any order
    note = (
        f"3 of 10 responses are not the model's: no saved response in {tmp_path} (model m), answered with '' "
        "by emi_replay (strict=false)"
    )
    assert run.filled_notes() == {"my_task": [note]}
    assert [r.get("filled") is not None for r in run.records("my_task")] == [
        i in (2, 7, 9) for i in range(10)
    ]

    analysed = _fake_run()
    task = analysed.benchmarks["synthetic"].tasks[2].task
    before = list(analysed.benchmarks["synthetic"].task(task).warnings)
    analysed = with_task_notes(analysed, {task: [note]})
    result = analysed.benchmarks["synthetic"].task(task)
    assert list(result.warnings) == [note, *before] and analysed.warnings[0] == f"{task}: {note}"
    out = update_results(
        {"results": {task: {}}, "group_subtasks": {task: []}}, analysed, extra={}, reports={}
    )
    assert out["results"][task]["emi_warnings"][0] == note
    report = analysed.benchmarks["synthetic"]
    assert note in to_csv(report) and note in to_markdown(report)
    assert note in next(t for t in report.to_dict()["tasks"] if t["task"] == task)["warnings"]


# --- messages -----------------------------------------------------------------------------------------
def test_the_fitted_estimator_manifest_in_the_report_carries_its_checksum(reference):
    from safetensors import safe_open

    from lmms_emi.estimators.checkpoint import MANIFEST_KEY

    with safe_open(str(reference["checkpoint"]), framework="pt") as fh:
        written = json.loads(fh.metadata()[MANIFEST_KEY])
    (report,) = sorted(reference["checkpoint"].parent.glob("*emi_report_synthetic.json"))
    estimator = json.loads(report.read_text())["estimator"]
    assert written["tensors_sha256"] and estimator["manifest"]["tensors_sha256"] == written["tensors_sha256"]


def test_a_user_error_inside_lmms_eval_is_one_line_without_its_traceback(monkeypatch, capsys):
    import lmms_eval.__main__ as lmms_main

    from lmms_emi.harness import launch

    def generation(args):
        raise ReplayError("emi_replay: task t: m.jsonl:2: invalid JSON")

    monkeypatch.setattr(lmms_main, "cli_evaluate_single", generation)
    results, error = launch._call_lmms_eval(["--model", "dummy", "--tasks", "t"])
    assert results is None and isinstance(error, ReplayError)
    assert "Traceback" not in capsys.readouterr().err
    wrapped = RuntimeError("lmms-eval wrapped it")
    wrapped.__cause__ = error
    assert launch.user_error(wrapped) is error
    assert launch.describe_error(wrapped) == "emi_replay: task t: m.jsonl:2: invalid JSON"


@pytest.mark.slow
def test_eval_with_a_response_file_three_lines_short_flags_the_task(world, tmp_path, capsys):
    """Through the real lmms-eval evaluator: ``strict=false`` answers 3 rows of the ID task with '', and the
    results JSON's ``emi_warnings`` and the report files say so."""
    import shutil

    from lmms_emi.cli import main

    demo = tmp_path / "demo"
    shutil.copytree(world["demo"] / "responses", demo / "responses")
    short = demo / "responses" / f"{SCENARIOS[0]}_demo-model.jsonl"
    short.write_text("".join(short.read_text().splitlines(keepends=True)[:-3]))
    out = tmp_path / "out"
    extra = ["--emi-cache", "off", "--estimator-steps", "30", "--bootstrap", "20", "--no_builtin_tasks"]
    args = _eval_args(world, out, *extra, responses=demo / "responses", strict=False)
    assert main(args) == 0
    capsys.readouterr()
    (results,) = out.rglob("*_results.json")
    entry = json.loads(results.read_text())["results"]["lbshift_syn_llava_bench_coco"]
    assert any(
        w.startswith("3 of 18 responses are not the model's: no saved response in")
        for w in entry["emi_warnings"]
    ), entry["emi_warnings"]
    for suffix in ("json", "csv", "md"):
        (report,) = out.rglob(f"*_emi_report_*.{suffix}")
        assert "3 of 18 responses are not the model's" in report.read_text()


@pytest.mark.slow
def test_eval_with_a_malformed_response_file_is_one_line_without_a_traceback(world, tmp_path, capsys):
    import shutil

    from lmms_emi.cli import main

    responses = tmp_path / "responses"
    shutil.copytree(world["demo"] / "responses", responses)
    bad = responses / f"{SCENARIOS[0]}_demo-model.jsonl"
    bad.write_text(bad.read_text().splitlines()[0] + "\n{oops\n")
    extra = ["--no_builtin_tasks", "--emi-cache", "off"]
    assert main(_eval_args(world, tmp_path / "out", *extra, responses=responses)) == 2
    line = _one_error_line(capsys.readouterr().err, "eval")
    assert f"{bad.name}:2: invalid JSON" in line

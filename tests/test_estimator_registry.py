"""Pre-trained estimators by name: the registry, the offline folder, the verified download into the cache
(a real HTTP server on 127.0.0.1 serving the paper's ``CLUB_global.pt`` from ../shared/reference, never
copied into the project), the errors, the pipeline's use of it and ``lmms-emi estimators``."""

from __future__ import annotations

import hashlib
import http.server
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomllib
import torch

from lmms_emi import estimator_registry as registry
from lmms_emi.cli import main
from lmms_emi.encoder_spec import PAPER_ENCODERS
from lmms_emi.errors import CheckpointError, EncoderMismatchError, UsageError
from lmms_emi.estimators.club import CLUB
from lmms_emi.pipeline.estimator import EstimatorPolicy, fixed_estimator, registered_for

REPO = Path(__file__).resolve().parents[1]
NAME = "paper-global"
OTHER_SPEC = {"vision": {"name": "tiny-vision", "dim": 768}, "text": {"name": "tiny-text", "dim": 768}}


class _Server:
    """A real HTTP server on 127.0.0.1 serving ``files`` ({name: bytes}); counts the GET requests.
    ``lie_length``: announce this Content-Length but send the body given (a dropped connection)."""

    def __init__(self, files: dict[str, bytes], lie_length: int | None = None) -> None:
        self.files, self.requests = files, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append(self.path)
                body = outer.files.get(self.path.rsplit("/", 1)[-1])
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(lie_length or len(body)))
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/mirror"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def env(tmp_path, monkeypatch) -> Path:
    """An empty cache of this test; no offline folder; downloads refused (a closed port) unless a test
    starts a server."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(registry.CACHE_ENV, str(cache))
    monkeypatch.delenv(registry.DIR_ENV, raising=False)
    monkeypatch.setenv(registry.MIRROR_ENV, f"http://127.0.0.1:{_closed_port()}/mirror")
    return cache


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def reference_bytes(reference_checkpoint) -> bytes:
    return reference_checkpoint.read_bytes()


@pytest.fixture
def serve(monkeypatch) -> Iterator:
    servers: list[_Server] = []

    def start(files: dict[str, bytes], lie_length: int | None = None) -> _Server:
        server = _Server(files, lie_length)
        servers.append(server)
        monkeypatch.setenv(registry.MIRROR_ENV, server.url)
        return server

    yield start
    for server in servers:
        server.close()


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


# --- the registry ------------------------------------------------------------------------------------
def test_the_registry_describes_the_reference_file(reference_checkpoint):
    entry = registry.registry_entry(NAME)
    data = reference_checkpoint.read_bytes()
    assert entry.size == len(data) == 3_083_960
    assert entry.sha256 == hashlib.sha256(data).hexdigest() == registry.file_sha256(reference_checkpoint)
    assert entry.url.startswith("https://github.com/deeplearning-wisc/mllmshift-emi/")
    assert entry.url.endswith("/" + entry.file) and entry.license == "Apache-2.0"
    assert registered_for(PAPER_ENCODERS) == entry and registered_for(OTHER_SPEC) is None
    # the wheel ships the registry beside the estimator folder's README
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "*.json" in pyproject["tool"]["setuptools"]["package-data"]["lmms_emi.estimator_ckpt"]


def test_unknown_name_lists_the_known_ones(env):
    with pytest.raises(UsageError, match=f"unknown estimator 'paper-glob'.*{NAME}"):
        EstimatorPolicy("paper-glob")
    with pytest.raises(UsageError, match=NAME):
        registry.resolve("nope")
    # a path-like value is a checkpoint path, refused (naming the option) before anything is read
    with pytest.raises(UsageError, match=r"--estimator missing\.pt: no such file"):
        EstimatorPolicy("missing.pt").check(None)


def test_cache_folder_rule(tmp_path, monkeypatch):
    assert registry.cache_dir({registry.CACHE_ENV: str(tmp_path)}) == tmp_path
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # platformdirs' user cache folder on Linux
    assert registry.cache_dir({}) == tmp_path / "lmms_emi" / "estimators"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert registry.cache_dir({}) == tmp_path / "home" / ".cache" / "lmms_emi" / "estimators"


# --- the offline folder --------------------------------------------------------------------------------
def test_offline_folder_serves_the_file_with_no_request(
    env, tmp_path, monkeypatch, reference_checkpoint, serve
):
    server = serve({})
    offline = tmp_path / "offline"
    offline.mkdir()
    (offline / "CLUB_global.pt").symlink_to(reference_checkpoint)  # a link: the file is never copied
    monkeypatch.setenv(registry.DIR_ENV, str(offline))
    assert registry.resolve(NAME) == offline / "CLUB_global.pt"

    club, info = fixed_estimator(EstimatorPolicy(NAME), PAPER_ENCODERS)
    reference = CLUB.from_checkpoint(reference_checkpoint)
    for key, value in reference.state_dict().items():
        assert torch.equal(club.state_dict()[key], value)
    assert (info.source, info.name, info.comparability) == ("registry", NAME, "global")
    assert info.sha256 == registry.registry_entry(NAME).sha256 and info.path == str(
        offline / "CLUB_global.pt"
    )
    assert info.to_dict()["name"] == NAME and info.to_dict()["sha256"] == info.sha256  # the results JSON keys
    # the default for the paper's encoders is the registered estimator; other encoders fit their own
    _, default = fixed_estimator(EstimatorPolicy(None), PAPER_ENCODERS)
    assert (default.source, default.name, default.sha256) == ("registry", NAME, info.sha256)
    assert "registered estimator of these encoders" in default.note
    assert fixed_estimator(EstimatorPolicy(None), OTHER_SPEC) is None
    # the same file given by path is recognised by its hash
    _, by_path = fixed_estimator(EstimatorPolicy(str(reference_checkpoint)), PAPER_ENCODERS)
    assert (by_path.source, by_path.name, by_path.sha256) == ("checkpoint", NAME, info.sha256)
    # a registered estimator is refused for other encoders, before anything is loaded
    with pytest.raises(EncoderMismatchError, match=r"paper-global.*other encoders"):
        EstimatorPolicy(NAME).check(OTHER_SPEC)
    assert server.requests == [] and _files(env) == []


def test_hand_placed_file_with_the_wrong_hash_is_refused(env, tmp_path, monkeypatch, reference_bytes):
    offline = tmp_path / "offline"
    offline.mkdir()
    bad = bytearray(reference_bytes)
    bad[-1] ^= 1
    (offline / "CLUB_global.pt").write_bytes(bytes(bad))
    monkeypatch.setenv(registry.DIR_ENV, str(offline))
    with pytest.raises(CheckpointError) as err:
        registry.resolve(NAME)
    message = str(err.value)
    assert str(offline / "CLUB_global.pt") in message and registry.registry_entry(NAME).sha256 in message
    assert "\n" not in message
    # the same in the cache folder (placed by hand there): refused, not replaced behind the user's back
    monkeypatch.delenv(registry.DIR_ENV)
    env.mkdir()
    (env / "CLUB_global.pt").write_bytes(reference_bytes[:1000])
    with pytest.raises(CheckpointError, match="1000 bytes, expected 3083960"):
        registry.resolve(NAME)
    monkeypatch.setenv(registry.DIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(UsageError, match="is not a folder"):
        registry.resolve(NAME)


# --- the download ------------------------------------------------------------------------------------
def test_download_once_then_reuse(env, serve, reference_bytes, capsys):
    server = serve({"CLUB_global.pt": reference_bytes})
    assert main(["estimators"]) == 0
    assert f"{NAME}: not downloaded" in capsys.readouterr().out
    path = registry.resolve(NAME, progress=False)
    assert path == env / "CLUB_global.pt" and path.read_bytes() == reference_bytes
    assert server.requests == ["/mirror/CLUB_global.pt"] and _files(env) == ["CLUB_global.pt"]  # no temp file
    assert registry.resolve(NAME) == path and len(server.requests) == 1  # reused: no second request
    _, info = fixed_estimator(EstimatorPolicy(None), PAPER_ENCODERS)
    assert info.name == NAME and info.path == str(path) and len(server.requests) == 1
    assert main(["estimators"]) == 0
    assert f"{NAME}: ready at {path}" in capsys.readouterr().out
    assert main(["estimators", "--fetch", "-q"]) == 0 and len(server.requests) == 1  # already here
    assert f"{NAME}: {path}" in capsys.readouterr().out
    assert main(["estimators", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["cache"] == str(env)
    assert (
        listed["estimators"][0]["status"] == "ready" and listed["estimators"][0]["encoders"] == PAPER_ENCODERS
    )


@pytest.mark.parametrize("damage", ["wrong hash", "short file", "dropped connection"])
def test_bad_download_is_refused_and_leaves_nothing(env, serve, reference_bytes, damage):
    if damage == "wrong hash":
        body = bytearray(reference_bytes)
        body[12345] ^= 0xFF
        serve({"CLUB_global.pt": bytes(body)})
        match = "does not have the registered sha256 99ab0626"
    elif damage == "short file":
        serve({"CLUB_global.pt": reference_bytes[: len(reference_bytes) // 2]})
        match = r"does not have the registered sha256 99ab0626\w+ \(3083960 bytes\)"
    else:
        serve({"CLUB_global.pt": reference_bytes[:100_000]}, lie_length=len(reference_bytes))
        match = "does not have the registered sha256|could not be downloaded"
    with pytest.raises(CheckpointError, match=match) as err:
        registry.resolve(NAME, progress=False)
    assert "nothing" in str(err.value) and "\n" not in str(err.value)
    assert _files(env) == []  # no file, no temp file


def test_offline_and_absent_is_one_line_naming_url_hash_and_folder(env, tmp_path, capsys):
    entry = registry.registry_entry(NAME)
    with pytest.raises(CheckpointError) as err:
        registry.resolve(NAME, progress=False)
    message = str(err.value)
    assert "\n" not in message and entry.download_url() in message and entry.sha256 in message
    assert str(env / entry.file) in message and registry.DIR_ENV in message and "--estimator fit" in message
    assert _files(env) == []
    # through the command line: one error line, exit 2, before any data is read
    responses = tmp_path / "responses"
    responses.mkdir()
    out = tmp_path / "out"
    code = main(["score", "--responses", str(responses), "--estimator", NAME, "--output-path", str(out)])
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err_lines) == 1 and entry.sha256 in err_lines[0]
    assert err_lines[0].startswith("lmms-emi score: error: estimator 'paper-global'") and _files(out) == []
    code = main(
        ["score", "--responses", str(responses), "--estimator", "paper-glob", "--output-path", str(out)]
    )
    assert code == 2 and NAME in capsys.readouterr().err


def test_cache_path_that_is_not_a_folder(env, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv(registry.CACHE_ENV, str(blocker))
    with pytest.raises(UsageError, match="is not a folder"):
        registry.resolve(NAME)


def test_unwritable_cache_is_a_clear_error(env, serve, reference_bytes, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv(registry.CACHE_ENV, str(blocker / "cache"))  # cannot be created, even by root
    serve({"CLUB_global.pt": reference_bytes})
    with pytest.raises(UsageError, match="cannot write the estimator cache"):
        registry.resolve(NAME, progress=False)


# --- a run with the paper's encoders -----------------------------------------------------------------------
def test_a_run_with_the_paper_encoders_uses_the_registered_estimator(env, tmp_path, capsys):
    """Local folders holding the paper's encoder configs (no weights) give the paper's encoder spec: with no
    --estimator the run takes `paper-global`; absent and offline, that is one error line before any embedding
    (no weights are ever needed to get there)."""
    from test_embed_lazy import clip_b32_config, config_folder, xlmr_base_config

    demo = tmp_path / "demo"
    scenarios = ["llava_bench_coco", "llava_bench_coco_frost_1"]
    assert main(["demo-data", str(demo), "--scenarios", *scenarios, "--n-images", "2"]) == 0
    capsys.readouterr()
    clip = config_folder(tmp_path, "my-clip", "clip", clip_b32_config())
    xlmr = config_folder(tmp_path, "my-xlmr", "xlmr", xlmr_base_config())
    args = ["score", "--dataset", str(demo / "dataset"), "--responses", str(demo / "responses")]
    args += ["--vision-encoder", str(clip), "--text-encoder", str(xlmr), "--emi-cache", "off", "-q"]
    out = tmp_path / "out"
    assert main([*args, "--output-path", str(out)]) == 2
    *_, line = capsys.readouterr().err.strip().splitlines()  # after the data-loading notes
    entry = registry.registry_entry(NAME)
    assert line.startswith("lmms-emi score: error: estimator 'paper-global'") and entry.sha256 in line
    assert "--estimator fit" in line and _files(out) == []


# --- the download's deadline and the temp files of dead downloads (issue 17) ------------------------------
class _Trickle:
    """A real HTTP server on 127.0.0.1 that announces the registered size and then sends one byte every
    0.2 s, until closed (the server that keeps a download alive without ever finishing it)."""

    def __init__(self, size: int) -> None:
        self.stop = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(size))
                self.end_headers()
                try:
                    while not outer.stop.wait(0.2):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                except OSError:
                    pass
                self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/mirror"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_trickling_download_is_given_up_at_its_deadline_leaving_nothing(env, monkeypatch):
    import time

    entry = registry.registry_entry(NAME)
    server = _Trickle(entry.size)
    monkeypatch.setenv(registry.MIRROR_ENV, server.url)
    monkeypatch.setenv(registry.DEADLINE_ENV, "1")
    env.mkdir()
    stale = env / f"{entry.file}.0123456789abcdef.partial"  # what a download killed by SIGTERM left
    stale.write_bytes(b"half")
    try:
        start = time.monotonic()
        with pytest.raises(CheckpointError) as err:
            registry.resolve(NAME, progress=False)
        took = time.monotonic() - start
        # the partial file of the given-up download is gone at once, though its thread still receives
        assert _files(env) == []
    finally:
        server.close()
    message = str(err.value)
    assert 0.9 < took < 5 and "\n" not in message
    assert f"download of {server.url}/{entry.file} did not finish within 1 s" in message
    assert (
        registry.DEADLINE_ENV in message and "nothing was saved" in message and "--estimator fit" in message
    )


def test_the_deadline_setting_is_checked(env, monkeypatch):
    assert registry.download_deadline({}) == registry.DEFAULT_DEADLINE_S
    assert registry.download_deadline({registry.DEADLINE_ENV: "2.5"}) == 2.5
    for bad in ("0", "-1", "soon", "inf", "nan"):
        with pytest.raises(UsageError, match=rf"\${registry.DEADLINE_ENV}={bad}: must be a positive number"):
            registry.download_deadline({registry.DEADLINE_ENV: bad})
    monkeypatch.setenv(registry.DEADLINE_ENV, "soon")
    with pytest.raises(UsageError, match=registry.DEADLINE_ENV):
        registry.resolve(NAME, progress=False)


def test_partial_files_of_dead_downloads_are_swept_and_held_ones_kept(env):
    env.mkdir()
    dead = env / "CLUB_global.pt.aaaa.partial"
    dead.write_bytes(b"x")
    held = env / "CLUB_global.pt.bbbb.partial"
    other = env / "unrelated.bin"
    other.write_bytes(b"y")
    with open(held, "wb") as fh:  # a running download holds its temp file open
        fh.write(b"z")
        fh.flush()
        assert registry.sweep_partials(env) == [dead]
        assert sorted(p.name for p in env.iterdir()) == [held.name, other.name]
    assert registry.sweep_partials(env) == [held]
    assert registry.sweep_partials(env / "missing") == []


def test_the_cli_says_a_given_up_download_in_one_line(env, monkeypatch, capsys):
    entry = registry.registry_entry(NAME)
    server = _Trickle(entry.size)
    monkeypatch.setenv(registry.MIRROR_ENV, server.url)
    monkeypatch.setenv(registry.DEADLINE_ENV, "0.5")
    try:
        code = main(["estimators", "--fetch", "-q"])
    finally:
        server.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "did not finish within 0.5 s" in err[0], err
    assert _files(env) == []

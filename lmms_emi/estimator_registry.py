"""Pre-trained CLUB estimators by name: the registry (``estimator_ckpt/registry.json``), where their files
are found on this machine, and their verified download (torch is imported only to download:
``torch.hub.download_url_to_file``).

A registered name resolves to a local file, first found of:

1. ``$LMMS_EMI_ESTIMATOR_DIR/<file>`` — a folder of files placed by hand (offline machines);
2. ``<estimator_ckpt>/<file>`` — a file shipped beside the registry (the wheel or the checkout);
3. ``<cache>/<file>`` — downloaded before, or placed there by hand; the cache folder is
   ``$LMMS_EMI_ESTIMATOR_CACHE``, else ``<user cache>/lmms_emi/estimators``;
4. otherwise it is downloaded from the entry's URL (or ``$LMMS_EMI_ESTIMATOR_MIRROR/<file>``) into the
   cache.

Every file found or downloaded must have the registered size and sha256; a download is moved into the cache
only after its sha256 matches, so a wrong or truncated download leaves nothing there. Problems are one-line
:class:`~lmms_emi.errors.LmmsEmiError` messages naming the file, the URL, the hash and the way out.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from lmms_emi.encoder_spec import PAPER_ENCODERS
from lmms_emi.environment import getenv
from lmms_emi.errors import CheckpointError, UsageError
from lmms_emi.paths import estimator_ckpt_dirs, user_cache_dir

__all__ = [
    "CACHE_ENV",
    "DEADLINE_ENV",
    "DIR_ENV",
    "MIRROR_ENV",
    "REGISTRY_FILE",
    "RegistryEntry",
    "cache_dir",
    "download_deadline",
    "entry_for_sha256",
    "file_sha256",
    "find_local",
    "is_registry_name",
    "load_registry",
    "registry_entry",
    "resolve",
    "sweep_partials",
]

REGISTRY_FILE = "registry.json"
DIR_ENV = "LMMS_EMI_ESTIMATOR_DIR"  # a folder of estimator files placed by hand
CACHE_ENV = "LMMS_EMI_ESTIMATOR_CACHE"  # the download cache folder
MIRROR_ENV = "LMMS_EMI_ESTIMATOR_MIRROR"  # base URL serving <file> in place of each entry's URL
DEADLINE_ENV = "LMMS_EMI_ESTIMATOR_DOWNLOAD_TIMEOUT"  # seconds a whole download may take
_TIMEOUT_S = 60.0  # seconds one network operation may wait
DEFAULT_DEADLINE_S = 600.0  # a 3 MB file: minutes even on a slow line; a trickling server is given up on
PARTIAL_SUFFIX = ".partial"  # torch.hub's temp file beside the destination: <dest>.<uuid hex>.partial
_STARTED = time.time()  # about when this process started (this module is imported early)


@dataclass(frozen=True)
class RegistryEntry:
    """One registered estimator. ``encoders``: the encoder spec it was trained on, or the name of an encoder
    profile (``"paper"``: :data:`lmms_emi.encoder_spec.PAPER_ENCODERS`)."""

    name: str
    file: str
    url: str
    sha256: str
    size: int
    encoders: str | dict[str, Any]
    license: str = ""
    source: str = ""
    trained_on: str = ""

    def download_url(self, environ: Mapping[str, str] | None = None) -> str:
        """The URL to fetch: ``$LMMS_EMI_ESTIMATOR_MIRROR/<file>`` when set, else the registered one."""
        mirror = (getenv(MIRROR_ENV, environ) or "").strip()
        return f"{mirror.rstrip('/')}/{self.file}" if mirror else self.url

    def encoder_spec(self) -> dict[str, Any]:
        """The encoder spec the estimator was trained on."""
        if self.encoders == "paper":
            return dict(PAPER_ENCODERS)
        if isinstance(self.encoders, Mapping):
            return dict(self.encoders)
        raise CheckpointError(f"registered estimator {self.name!r} names unknown encoders {self.encoders!r}")


def _registry_path() -> Path:
    for folder in estimator_ckpt_dirs():
        if (folder / REGISTRY_FILE).is_file():
            return folder / REGISTRY_FILE
    raise CheckpointError(
        f"the estimator registry ({REGISTRY_FILE}) is missing from "
        f"{[str(d) for d in estimator_ckpt_dirs()]}; reinstall lmms-emi"
    )


@lru_cache(maxsize=4)
def _read_registry(path: Path) -> dict[str, RegistryEntry]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = [RegistryEntry(**item) for item in data["estimators"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"estimator registry {path} is unreadable ({exc}); reinstall lmms-emi"
        ) from None
    for e in entries:
        if len(e.sha256) != 64 or e.size < 1 or not e.file or "/" in e.file:
            raise CheckpointError(
                f"estimator registry {path}: entry {e.name!r} has a bad file, size or sha256"
            )
    return {e.name: e for e in entries}


def load_registry(path: str | os.PathLike | None = None) -> dict[str, RegistryEntry]:
    """The registered estimators by name (``path``: another registry file, default the shipped one)."""
    return dict(_read_registry(Path(path) if path is not None else _registry_path()))


def is_registry_name(value: str | None) -> bool:
    """True when ``value`` is a registered estimator name."""
    return value is not None and value in load_registry()


def registry_entry(name: str) -> RegistryEntry:
    """The entry of ``name``; :class:`UsageError` listing the known names otherwise."""
    registry = load_registry()
    if name not in registry:
        raise UsageError(
            f"unknown estimator {name!r}: registered estimators are {', '.join(sorted(registry))} "
            "(`lmms-emi estimators` lists them); or give a checkpoint file, or 'fit'"
        )
    return registry[name]


def entry_for_sha256(sha256: str | None) -> RegistryEntry | None:
    """The registered estimator whose file has this sha256 (a file given by path may be one of them)."""
    return next((e for e in load_registry().values() if e.sha256 == sha256), None)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The download cache: ``$LMMS_EMI_ESTIMATOR_CACHE``, else ``<user cache>/lmms_emi/estimators``."""
    value = getenv(CACHE_ENV, environ)
    return Path(value).expanduser() if value else user_cache_dir("estimators")


def _offline_dir() -> Path | None:
    raw = (getenv(DIR_ENV) or "").strip()
    if not raw:
        return None
    folder = Path(raw).expanduser()
    if not folder.is_dir():
        raise UsageError(f"${DIR_ENV}={raw} is not a folder: point it at the folder holding estimator files")
    return folder


def _placement_hint(entry: RegistryEntry, *, url: bool = True) -> str:
    return (
        f"download {entry.download_url() if url else 'it'} (sha256 {entry.sha256}, {entry.size} bytes) and "
        f"put it at {cache_dir() / entry.file} or in the folder named by ${DIR_ENV}"
    )


def _exists(path: Path, what: str) -> bool:
    """Whether ``path`` exists; a folder that cannot be read is an error, not an absence."""
    try:
        return path.is_file()
    except OSError as exc:
        raise UsageError(
            f"{what} {path.parent} cannot be read ({exc.strerror or exc}); fix its permissions or set "
            f"${CACHE_ENV} / ${DIR_ENV} to another folder"
        ) from None


def _verify(entry: RegistryEntry, path: Path) -> Path:
    """``path`` if it has the entry's size and sha256; CheckpointError naming both otherwise."""
    size = path.stat().st_size
    digest = file_sha256(path) if size == entry.size else None
    if digest != entry.sha256:
        got = f"sha256 {digest}" if digest else f"{size} bytes"
        raise CheckpointError(
            f"{path} is not the registered estimator {entry.name!r}: it has {got}, expected "
            f"{entry.size} bytes with sha256 {entry.sha256}; delete it and {_placement_hint(entry)}"
        )
    return path


def find_local(entry: RegistryEntry) -> Path | None:
    """The verified local file of ``entry`` (offline folder, shipped folder, cache, in that order), or None.

    A file of the entry's name with another size or hash is an error (:class:`CheckpointError`), never
    skipped."""
    places = [(d, f"${DIR_ENV} folder") for d in [_offline_dir()] if d is not None]
    places += [(d, "estimator folder") for d in estimator_ckpt_dirs()]
    root = cache_dir()
    if root.exists() and not root.is_dir():
        raise UsageError(
            f"estimator cache {root} is not a folder; remove it or set ${CACHE_ENV} to another folder"
        )
    places.append((root, "estimator cache"))
    for folder, what in places:
        path = folder / entry.file
        if _exists(path, what):
            return _verify(entry, path)
    return None


def download_deadline(environ: Mapping[str, str] | None = None) -> float:
    """Seconds a whole estimator download may take: ``$LMMS_EMI_ESTIMATOR_DOWNLOAD_TIMEOUT``, else
    :data:`DEFAULT_DEADLINE_S`; a value that is not a positive number is a UsageError naming the variable."""
    raw = (getenv(DEADLINE_ENV, environ) or "").strip()
    if not raw:
        return DEFAULT_DEADLINE_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value != float("inf")):
        raise UsageError(f"${DEADLINE_ENV}={raw}: must be a positive number of seconds")
    return value


def resolve(
    name: str,
    *,
    download: bool = True,
    progress: bool = True,
    timeout: float = _TIMEOUT_S,
    deadline: float | None = None,
) -> Path:
    """The verified local file of the registered estimator ``name``, downloaded into the cache when it is
    nowhere on this machine (``download=False``: a CheckpointError saying where to put it instead).
    ``timeout``: seconds one network operation may wait; ``deadline``: seconds the whole download may take
    (default :func:`download_deadline`)."""
    entry = registry_entry(name)
    found = find_local(entry)
    if found is not None:
        return found
    if not download:
        raise CheckpointError(
            f"estimator {entry.name!r} ({entry.file}) is not on this machine: {_placement_hint(entry)}"
        )
    limit = download_deadline() if deadline is None else deadline
    return _download(entry, cache_dir() / entry.file, progress=progress, timeout=timeout, deadline=limit)


def _partials(dest: Path) -> set[Path]:
    try:
        return set(dest.parent.glob(f"{dest.name}.*{PARTIAL_SUFFIX}"))
    except OSError:
        return set()


def _open_files() -> set[str] | None:
    """Every file some process holds open (Linux ``/proc``); None where that cannot be told."""
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    held: set[str] = set()
    for fd_dir in proc.glob("[0-9]*/fd"):
        try:
            for fd in os.scandir(fd_dir):
                try:
                    held.add(os.readlink(fd.path))
                except OSError:
                    pass
        except OSError:
            pass  # another user's process, or gone
    return held


def sweep_partials(folder: Path) -> list[Path]:
    """Remove the download temp files (``*.partial``) in ``folder`` that no writer holds any more (a
    download killed by a signal leaves one; torch.hub removes its own only when it gets to): on Linux those
    no process has open, elsewhere those older than this process. Returns what was removed."""
    try:
        partials = [p for p in folder.iterdir() if p.name.endswith(PARTIAL_SUFFIX)]
    except OSError:
        return []
    if not partials:
        return []
    held = _open_files()
    removed = []
    for path in partials:
        try:
            dead = str(path.resolve()) not in held if held is not None else path.stat().st_mtime < _STARTED
            if dead:
                path.unlink()
                removed.append(path)
        except OSError:
            pass
    return removed


def _download(entry: RegistryEntry, dest: Path, *, progress: bool, timeout: float, deadline: float) -> Path:
    """Fetch ``entry`` into ``dest`` with ``torch.hub.download_url_to_file``: it writes a temp file beside
    ``dest``, checks the sha256 and only then moves it into place (a refused or broken download leaves no
    file). ``timeout``: seconds any one network operation may wait; ``deadline``: seconds the whole download
    may take (it runs in a worker thread; past the deadline it is given up and its temp file removed, also
    from a server that keeps sending a byte now and then). Temp files of earlier downloads that died are
    removed first (:func:`sweep_partials`)."""
    import threading

    from torch.hub import download_url_to_file

    url = entry.download_url()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(
            f"cannot write the estimator cache {dest.parent} ({exc.strerror or exc}); set ${CACHE_ENV} to a "
            "writable folder"
        ) from None
    sweep_partials(dest.parent)
    before = _partials(dest)
    outcome: dict[str, BaseException | None] = {}

    def fetch() -> None:
        try:
            download_url_to_file(url, str(dest), hash_prefix=entry.sha256, progress=progress)
            outcome["error"] = None
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(min(timeout, deadline))  # urlopen in torch.hub takes no timeout of its own
    try:
        worker = threading.Thread(target=fetch, name=f"lmms-emi download {entry.file}", daemon=True)
        worker.start()
        worker.join(deadline)
    finally:
        socket.setdefaulttimeout(previous)
    if worker.is_alive():  # still receiving: given up on; the daemon thread dies with the process
        for path in _partials(dest) - before:
            path.unlink(missing_ok=True)  # its writer may keep writing into the unlinked file: harmless
        raise CheckpointError(
            f"download of {url} did not finish within {deadline:g} s (${DEADLINE_ENV}): given up, nothing "
            f"was saved; {_placement_hint(entry, url=False)}; or fit one on the run with --estimator fit"
        )
    error = outcome.get("error")
    if isinstance(error, RuntimeError):  # the downloaded bytes have another sha256
        raise CheckpointError(
            f"download of {url} does not have the registered sha256 {entry.sha256} ({entry.size} bytes): "
            f"refused, nothing was saved (a changed, truncated or wrong file; check ${MIRROR_ENV})"
        ) from None
    if isinstance(error, (OSError, http.client.HTTPException, ValueError)):
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(
                f"cannot save the estimator download in {dest.parent}: {error.strerror}; free some space or "
                f"set ${CACHE_ENV} to another folder (nothing was saved)"
            ) from None
        reason = getattr(error, "reason", None) or error.__class__.__name__
        raise CheckpointError(
            f"estimator {entry.name!r} ({entry.file}) is not on this machine and could not be downloaded "
            f"from {url} ({reason}; nothing was saved): {_placement_hint(entry, url=False)}; or fit one on "
            "the run with --estimator fit"
        ) from None
    if error is not None:
        raise error
    return _verify(entry, dest)

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

import hashlib
import http.client
import json
import os
import socket
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
    "DIR_ENV",
    "MIRROR_ENV",
    "REGISTRY_FILE",
    "RegistryEntry",
    "cache_dir",
    "entry_for_sha256",
    "file_sha256",
    "find_local",
    "is_registry_name",
    "load_registry",
    "registry_entry",
    "resolve",
]

REGISTRY_FILE = "registry.json"
DIR_ENV = "LMMS_EMI_ESTIMATOR_DIR"  # a folder of estimator files placed by hand
CACHE_ENV = "LMMS_EMI_ESTIMATOR_CACHE"  # the download cache folder
MIRROR_ENV = "LMMS_EMI_ESTIMATOR_MIRROR"  # base URL serving <file> in place of each entry's URL
_TIMEOUT_S = 60.0


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


def resolve(name: str, *, download: bool = True, progress: bool = True, timeout: float = _TIMEOUT_S) -> Path:
    """The verified local file of the registered estimator ``name``, downloaded into the cache when it is
    nowhere on this machine (``download=False``: a CheckpointError saying where to put it instead)."""
    entry = registry_entry(name)
    found = find_local(entry)
    if found is not None:
        return found
    if not download:
        raise CheckpointError(
            f"estimator {entry.name!r} ({entry.file}) is not on this machine: {_placement_hint(entry)}"
        )
    return _download(entry, cache_dir() / entry.file, progress=progress, timeout=timeout)


def _download(entry: RegistryEntry, dest: Path, *, progress: bool, timeout: float) -> Path:
    """Fetch ``entry`` into ``dest`` with ``torch.hub.download_url_to_file``: it writes a temp file beside
    ``dest``, checks the sha256 and only then moves it into place (a refused or broken download leaves no
    file). ``timeout``: seconds any one network operation may wait."""
    from torch.hub import download_url_to_file

    url = entry.download_url()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(
            f"cannot write the estimator cache {dest.parent} ({exc.strerror or exc}); set ${CACHE_ENV} to a "
            "writable folder"
        ) from None
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # urlopen in torch.hub takes no timeout of its own
    try:
        download_url_to_file(url, str(dest), hash_prefix=entry.sha256, progress=progress)
    except RuntimeError:  # the downloaded bytes have another sha256
        raise CheckpointError(
            f"download of {url} does not have the registered sha256 {entry.sha256} ({entry.size} bytes): "
            f"refused, nothing was saved (a changed, truncated or wrong file; check ${MIRROR_ENV})"
        ) from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc.__class__.__name__
        raise CheckpointError(
            f"estimator {entry.name!r} ({entry.file}) is not on this machine and could not be downloaded "
            f"from {url} ({reason}; nothing was saved): {_placement_hint(entry, url=False)}; or fit one on "
            "the run with --estimator fit"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
    return _verify(entry, dest)

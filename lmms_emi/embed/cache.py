"""Content-addressed on-disk cache of embedding vectors.

Key: ``sha256(encoder cache id | layer | projection | content hash)``; one safetensors file per
entry at ``<root>/<key[:2]>/<key>.safetensors``.  The file's metadata carries the key and the
sha256 of the vector's bytes, so a truncated or corrupted entry is detected on read (and treated
as a miss: the caller recomputes and overwrites it).  Writes go through :func:`lmms_emi._io.atomic_write`
(a uniquely named temp file in the same directory, then ``os.replace``): readers never see half a file,
and concurrent writers of the same key (several ranks) simply race to an identical result. Where the
filesystem has ``O_TMPFILE`` and can link it (Linux; not every sandbox), a new entry is written to an unnamed
file that is linked into place when complete; otherwise the named temp file of a writer killed mid-write is
removed by the next cache that opens the folder (the writer's pid is in its name).

The key does not include the batch size or device: a vector differs by ~1e-7 between them (padding, kernel
choice), and the first computed one is served from then on, so a run is bit-reproducible given its cache.
Each entry records what produced it (``produced_by`` metadata: batch size, device, torch version).

Each entry also binds its key to its encoder spec: :func:`cache_key` returns a :class:`CacheKey` that carries
``spec`` (sha256 of the encoder cache id, layer and projection), written into the entry's metadata; an entry
whose recorded spec differs from the reader's (moved or copied from another key, with its key field edited)
is a miss, recomputed and overwritten, with one warning per read. Entries written before the binding existed
(no ``spec``) are served as before. The checks detect corruption and misplaced entries, not a deliberate
rewrite by someone who can write the folder: see ``docs/CACHE.md`` (the trust model).
A folder that cannot be created or written is refused at construction (``OSError``); the embedder then runs
without a cache, with one warning.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as st_save

from lmms_emi._io import atomic_write, ensure_writable_dir, sweep_dead_writers
from lmms_emi.environment import getenv
from lmms_emi.paths import user_cache_dir

_FORMAT = "lmms_emi.embedding.v1"


def default_cache_dir() -> Path:
    """``$LMMS_EMI_EMBEDDING_CACHE``, else the plugin's user cache folder for embeddings
    (:func:`lmms_emi.paths.user_cache_dir`: ``$XDG_CACHE_HOME/lmms_emi/embeddings`` or
    ``~/.cache/lmms_emi/embeddings`` on Linux)."""
    env = getenv("LMMS_EMI_EMBEDDING_CACHE")
    if env:
        return Path(env).expanduser()
    return user_cache_dir("embeddings")


def user_warning(message: str, *, stacklevel: int = 2) -> None:
    """``warnings.warn(message, UserWarning)`` that is shown even under a blanket ignore filter (importing
    ``lmms_eval.utils`` ignores every warning in the process; a repaired cache must still be reported)."""
    with warnings.catch_warnings():
        warnings.simplefilter("default", UserWarning)
        warnings.warn(message, UserWarning, stacklevel=stacklevel + 1)


class CacheKey(str):
    """An entry's address (the hex key, compared and hashed as the plain string) that also carries ``spec``,
    the sha256 of the encoder spec it was made for (:func:`spec_hash`), which the entry records and a read
    checks. A plain ``str`` key works as before: nothing is recorded or checked."""

    spec: str

    def __new__(cls, key: str, spec: str = "") -> CacheKey:
        obj = super().__new__(cls, key)
        obj.spec = spec
        return obj


@functools.lru_cache(maxsize=64)  # a run has a few specs and many keys
def spec_hash(encoder_id: str, layer: int, projection: str) -> str:
    """sha256 over the encoder identity, layer and projection: what an entry is bound to."""
    return hashlib.sha256(f"{encoder_id}\x1f{layer}\x1f{projection}".encode()).hexdigest()


def cache_key(encoder_id: str, layer: int, projection: str, content_hash: str) -> CacheKey:
    """The entry's address: sha256 over the encoder identity, layer, projection and content hash (a
    :class:`CacheKey` carrying the :func:`spec_hash` of the first three)."""
    raw = f"{encoder_id}\x1f{layer}\x1f{projection}\x1f{content_hash}".encode()
    return CacheKey(hashlib.sha256(raw).hexdigest(), spec_hash(encoder_id, layer, projection))


class EmbeddingCache:
    """Directory of verified embedding vectors (float32, 1-D)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        """Create ``root`` if needed; OSError when it cannot be created or written."""
        self.root = ensure_writable_dir(root)  # a read-only folder fails here, not deep inside a run
        # temp files of writers killed mid-write (SIGKILL) go now: never read, but they must not pile up
        sweep_dead_writers(d for d in self.root.iterdir() if d.is_dir())

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str, dim: int) -> tuple[torch.Tensor | None, bool]:
        """Return ``(vector, corrupt)``; ``vector`` is None on a miss or when the entry is bad
        (truncated, bit-flipped, wrong key/shape, non-finite): the caller recomputes and overwrites it."""
        rows, found, corrupt = self.get_many([key], dim)
        return (torch.from_numpy(rows[0]) if found[0] else None), bool(corrupt)

    def get_many(self, keys: Sequence[str], dim: int) -> tuple[np.ndarray, list[bool], int]:
        """Read many entries at once: ``(rows, found, corrupt)`` with ``rows`` a float32 ``[len(keys), dim]``
        array (rows not found are zero), ``found[i]`` whether entry ``i`` was read and verified, and the
        number of bad entries (counted as not found, like a miss). An entry bound to another encoder spec than
        its :class:`CacheKey`'s is a miss too, with one warning for all of them."""
        rows = np.zeros((len(keys), dim), dtype=np.float32)
        found = [False] * len(keys)
        corrupt = foreign = 0
        root = os.fspath(self.root)
        for i, key in enumerate(keys):
            try:
                with open(f"{root}/{key[:2]}/{key}.safetensors", "rb") as fh:  # = self.path(key), faster
                    data = fh.read()
            except FileNotFoundError:
                continue
            except OSError:
                corrupt += 1
                continue
            vec, recorded = _decode_entry(data, key, dim)
            if vec is None:
                corrupt += 1
            elif recorded and getattr(key, "spec", "") and recorded != key.spec:
                foreign += 1  # bound to another encoder: moved or copied here
            else:
                rows[i] = vec
                found[i] = True
        if foreign:
            user_warning(
                f"{foreign} embedding cache entr{'y' if foreign == 1 else 'ies'} under {self.root} recorded "
                "another encoder than the one reading them (moved or copied from another key?): recomputing "
                "and overwriting",
                stacklevel=3,
            )
        return rows, found, corrupt

    def put(self, key: str, vec: torch.Tensor, *, produced_by: Mapping[str, object] | None = None) -> None:
        """Atomically write one vector (temp file in the same directory, then ``os.replace``);
        ``produced_by`` (batch size, device, ...) is recorded in the entry, not read back."""
        p = self.path(key)
        arr = vec.detach().to("cpu", torch.float32).contiguous()
        digest = hashlib.sha256(arr.numpy().tobytes()).hexdigest()
        meta = {"format": _FORMAT, "key": str(key), "sha256": digest}
        if getattr(key, "spec", ""):
            meta["spec"] = key.spec  # binds the entry to its encoder spec
        if produced_by:
            meta["produced_by"] = json.dumps(dict(produced_by), sort_keys=True)
        blob = st_save({"z": arr}, metadata=meta)
        if not _publish_unnamed(p, blob):
            atomic_write(p, lambda tmp: tmp.write_bytes(blob))  # replaces a bad entry; or no O_TMPFILE


class CacheWriter:
    """Stores rows in an :class:`EmbeddingCache` from one background thread, so that writes overlap the next
    forward passes. The first ``OSError`` (read-only folder, disk full) stops the writing and is kept: the
    values are still the caller's, only not stored."""

    def __init__(self, cache: EmbeddingCache, produced_by: Mapping[str, object] | None = None) -> None:
        self.cache = cache
        self.produced_by = produced_by
        self.error: OSError | None = None
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._writes: list[Future[None]] = []

    def submit(self, keys: Sequence[str], rows: torch.Tensor) -> None:
        """Queue ``rows[i]`` under ``keys[i]``."""
        self._writes.append(self._pool.submit(self._write, list(keys), rows))

    def _write(self, keys: list[str], rows: torch.Tensor) -> None:
        for key, row in zip(keys, rows, strict=True):
            if self.error is not None:
                return
            try:
                self.cache.put(key, row, produced_by=self.produced_by)
            except OSError as exc:
                self.error = exc

    def wait(self) -> OSError | None:
        """Wait until every queued entry is on disk; raise what a write raised other than ``OSError``, and
        return the ``OSError`` that stopped the writing (None when all were written)."""
        for write in self._writes:
            write.result()
        return self.error

    def close(self) -> None:
        """Finish the queued writes and stop the thread."""
        self._pool.shutdown(wait=True)


def _publish_unnamed(path: Path, blob: bytes) -> bool:
    """Write ``blob`` to an unnamed file in ``path``'s folder and link it as ``path`` once complete (Linux
    ``O_TMPFILE``): nothing is left behind if the process dies. False when ``path`` exists or the
    filesystem cannot do it (the caller then uses a named temp file)."""
    flag = getattr(os, "O_TMPFILE", 0)
    if not flag or path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path.parent, flag | os.O_WRONLY, 0o666)  # the umask applies, as for open()
    except OSError:
        return False
    try:
        view = memoryview(blob)
        while view:
            view = view[os.write(fd, view) :]
        try:
            os.link(f"/proc/self/fd/{fd}", path)  # follows the fd's link to the unnamed file
        except FileExistsError:
            return True  # another writer published the same key first: identical content
        except OSError:
            return False
        return True
    finally:
        os.close(fd)


def _decode(data: bytes, key: str, dim: int) -> np.ndarray | None:
    """The vector of one verified entry (:func:`_decode_entry`), or None when anything is off."""
    return _decode_entry(data, key, dim)[0]


def _decode_entry(data: bytes, key: str, dim: int) -> tuple[np.ndarray | None, str]:
    """Parse and verify one entry (a safetensors file holding one float32 vector ``z``): its header names
    this key and the sha256 of the vector's bytes, which must match. Returns (the vector, or None when
    anything is off; the encoder spec hash the entry records, '' for entries written before it existed)."""
    try:
        if len(data) < 8:
            return None, ""
        (n,) = struct.unpack("<Q", data[:8])
        if n > len(data) - 8:
            return None, ""
        header = json.loads(data[8 : 8 + n])
        meta = header.get("__metadata__", {})
        if meta.get("format") != _FORMAT or meta.get("key") != key or set(header) != {"__metadata__", "z"}:
            return None, ""
        z = header["z"]
        begin, end = (int(x) for x in z["data_offsets"])
        if z["dtype"] != "F32" or list(z["shape"]) != [dim] or (begin, end) != (0, 4 * dim):
            return None, ""
        if 8 + n + end != len(data):
            return None, ""
        payload = memoryview(data)[8 + n :]
        if hashlib.sha256(payload).hexdigest() != meta.get("sha256"):
            return None, ""
        vec = np.frombuffer(payload, dtype="<f4")
        spec = meta.get("spec", "")
    except Exception:  # any parse failure means a bad entry, never a crash
        return None, ""
    if not bool(np.isfinite(vec).all()) or not isinstance(spec, str):
        return None, ""
    return vec, spec

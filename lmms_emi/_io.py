"""Atomic file writes and the one JSONL reader, shared by every layer (no project imports here)."""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

TEMP_SUFFIX = ".tmp"
PROBE_BYTES = 4096  # what the writability probe writes: a full disk refuses it (creating a file alone passes)
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class WriteFailed(OSError):
    """Writing a file failed (disk full, quota, I/O error, ...): ``filename`` is the file that was to be
    written, ``strerror`` the cause; :func:`atomic_write` published nothing and left the earlier file
    untouched. Its message is one line."""

    def __str__(self) -> str:
        hint = "; free some space or choose another folder" if self.errno in _NO_SPACE else ""
        return f"cannot write {self.filename}: {self.strerror}{hint} (nothing was written)"


def os_error_of(exc: BaseException) -> OSError | None:
    """The operating-system error behind ``exc``: ``exc`` itself when it is an OSError, else one rebuilt from
    the text of a library that reports it as its own type (safetensors' Rust writer: ``SafetensorError: ...
    Os { code: 28, kind: StorageFull, message: "No space left on device" }``); None for other errors."""
    if isinstance(exc, OSError):
        return exc
    found = re.search(r"Os \{ code: (\d+)|\[Errno (\d+)\]", str(exc))
    if found is None:
        return None
    code = int(found.group(1) or found.group(2))
    return OSError(code, os.strerror(code))


def _write_failed(path: Path, exc: BaseException) -> BaseException:
    """``exc`` as a :class:`WriteFailed` naming ``path`` when an OS error is behind it (an existing name
    refused by ``overwrite=False`` stays a FileExistsError); else ``exc`` unchanged."""
    if isinstance(exc, (WriteFailed, FileExistsError)) or not isinstance(exc, Exception):
        return exc
    cause = os_error_of(exc)
    if cause is None or cause.errno is None:
        return exc
    return WriteFailed(cause.errno, cause.strerror or os.strerror(cause.errno), str(path))


def _create_temp(folder: Path, name: str) -> Path:
    """A new empty file ``.<name>.<pid>.<random>.tmp`` in ``folder``, created with mode 0666 so that the
    process umask (and a default ACL) applies exactly as for ``open(path, "w")``; ``O_EXCL`` makes it ours."""
    while True:
        tmp = folder / f".{name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], *, overwrite: bool = True) -> Path:
    """Write ``path`` atomically: ``write(tmp)`` fills a temp file in the same folder, then ``os.replace``.

    The temp file is removed if ``write`` fails, so readers never see a partial file or a leftover. The
    result keeps the mode of the file it replaces, or gets the umask's mode for a new file (not the 0600 of
    a temp file). ``overwrite=False`` publishes with a hard link instead, which fails with
    :class:`FileExistsError` (and leaves the existing file untouched) when ``path`` exists: two writers
    racing for one name cannot both win.

    A failure of the operating system (a full disk, a quota, an I/O error; also when the writer reports it
    as its own exception type, as safetensors does) is a :class:`WriteFailed` naming ``path`` and the cause.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # the writer's pid in the name: a process killed mid-write leaves a file sweep_dead_writers() removes
        tmp = _create_temp(path.parent, path.name)  # a new file's mode: what open() gives it
    except OSError as exc:
        raise _write_failed(path, exc) from exc
    try:
        mode: int | None = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = None
    try:
        write(tmp)
        if mode is not None:  # a replaced file keeps its mode
            os.chmod(tmp, mode)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # atomic, and refuses an existing name
            os.unlink(tmp)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        failed = _write_failed(path, exc)
        if failed is exc:
            raise
        raise failed from exc
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    """Atomic UTF-8 text write (``overwrite=False``: refuse an existing file, see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=overwrite)


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create the folder ``path`` if needed and prove it writable with an unnamed temp file holding
    :data:`PROBE_BYTES` bytes (nothing is left behind): creating a file alone succeeds on a full disk, writing
    to it does not. OSError (read-only, under a regular file, no space, ...) otherwise."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder) as fh:
        written = os.write(fh.fileno(), bytes(PROBE_BYTES))
        if written < PROBE_BYTES:  # a short write: the filesystem ran out of room
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder))
    return folder


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes free for this user on the filesystem of ``path`` (its nearest existing folder); None when it
    cannot be told."""
    import shutil

    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def reserve_file(path: str | os.PathLike) -> bool:
    """Create ``path`` empty if no file has that name (atomic ``O_EXCL``); False when it exists.

    Claims a name for one writer among several processes sharing a folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or unknown: keep its folder
    return True


def scratch_dir(prefix: str, parent: str | os.PathLike | None = None) -> Path:
    """A new private folder ``<parent>/<prefix><pid>_XXXX`` for this process (``parent``: the system temp
    dir), after removing the folders of that prefix left there by processes that no longer run (a run killed
    with SIGKILL cannot clean up itself). The caller removes its own folder when done."""
    import shutil

    root = Path(tempfile.gettempdir() if parent is None else parent)
    for old in root.glob(f"{prefix}*_*"):
        pid_text = old.name[len(prefix) :].split("_", 1)[0]
        if old.is_dir() and pid_text.isdigit() and not pid_alive(int(pid_text)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}_", dir=root))


def sweep_dead_writers(folders: Iterable[Path]) -> int:
    """Remove the temp files :func:`atomic_write` left in ``folders`` when its process was killed (the pid in
    the name no longer runs); files of running writers are kept. Returns how many were removed."""
    removed = 0
    for folder in folders:
        try:
            names = [n for n in os.listdir(folder) if n.startswith(".") and n.endswith(TEMP_SUFFIX)]
        except OSError:
            continue
        for name in names:
            parts = name.rsplit(".", 3)  # .<target name>.<pid>.<random>.tmp
            if len(parts) == 4 and parts[1].isdigit() and not pid_alive(int(parts[1])):
                try:
                    os.unlink(os.path.join(folder, name))
                    removed += 1
                except OSError:
                    pass
    return removed


def json_lines(path: str | os.PathLike, error: type[Exception]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) for each non-blank line of a JSONL file. A line that is not UTF-8, not
    JSON or not a JSON object raises ``error`` with one line naming ``path:line`` and what is wrong."""
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise error(
                    f"{where}: not UTF-8 text (byte {raw[exc.start]:#04x} at column {exc.start + 1})"
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise error(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield line_no, obj

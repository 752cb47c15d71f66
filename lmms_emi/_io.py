"""Atomic file writes, shared by every layer (no project imports here)."""

from __future__ import annotations

import os
import secrets
import stat
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

TEMP_SUFFIX = ".tmp"


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


def atomic_write(
    path: str | os.PathLike, write: Callable[[Path], object], *, overwrite: bool = True
) -> Path:
    """Write ``path`` atomically: ``write(tmp)`` fills a temp file in the same folder, then ``os.replace``.

    The temp file is removed if ``write`` fails, so readers never see a partial file or a leftover. The
    result keeps the mode of the file it replaces, or gets the umask's mode for a new file (not the 0600 of
    a temp file). ``overwrite=False`` publishes with a hard link instead, which fails with
    :class:`FileExistsError` (and leaves the existing file untouched) when ``path`` exists: two writers
    racing for one name cannot both win.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the writer's pid in the name: a process killed mid-write leaves a file sweep_dead_writers() can remove
    tmp = _create_temp(path.parent, path.name)  # a new file's mode: what open() gives it
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
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    """Atomic UTF-8 text write (``overwrite=False``: refuse an existing file, see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=overwrite)


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create the folder ``path`` if needed and prove it writable with an unnamed temp file (nothing is left
    behind); OSError (read-only, under a regular file, ...) otherwise."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder):
        pass
    return folder


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

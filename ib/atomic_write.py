"""Files that appear whole or not at all: a temp file next to the target, fsynced, then renamed over it.

A reader (or a resumed run) sees the old file or the new one, never half of one. A process killed mid-write
(SIGKILL, OOM, a node failure) leaves its temp file behind; `remove_stale_temp_files` clears those at the
next start.
"""
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _temp_prefix(name: str) -> str:
    return f".{name}."


@contextmanager
def atomic_path(path: str | Path):
    """Yields a temp path in `path`'s folder to write to; on success it gets the usual mode (0666 & ~umask;
    mkstemp and safetensors make files private), is fsynced and renamed over `path`. On failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path.name), suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # make the rename itself durable


@contextmanager
def atomic_folder(path: str | Path):
    """Yields a temp folder beside `path` to fill; on success it replaces `path` (a folder) whole, on failure
    it is removed. Between the old folder's removal and the rename a reader finds no folder, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path.name), dir=path.parent))
    try:
        yield tmp
        for entry in [tmp, *tmp.rglob("*")]:  # mkdtemp and safetensors make them private
            entry.chmod((0o777 if entry.is_dir() else 0o666) & ~_umask())
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def write_json(path: str | Path, value, **dump_options) -> None:
    """JSON (indent 1 unless told otherwise), whole or not at all."""
    write_text(path, json.dumps(value, **{"indent": 1, **dump_options}) + "\n")


def remove_stale_temp_files(folder: str | Path, suffix: str = "") -> list[Path]:
    """Delete temp files that `atomic_path` left in `folder` for targets ending in `suffix` (a killed write)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = sorted(folder.glob(f"{_temp_prefix('*' + suffix)}*.tmp"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems do not let a folder be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

"""Checkpoint files: atomic writes, weights-only reads (a Lightning CheckpointIO plugin, see conf/default.yaml).

Lightning's own writer serialises to memory, then lets fsspec write a temp file in the *system* temp folder
and move it over the target: across file systems (node-local /tmp, shared checkpoint folder) that move is a
copy, and a job killed during it leaves a truncated last.ckpt. Here the temp file sits next to the target,
is fsynced, and os.replace swaps it in, so a reader sees the old file or the new one, never half of one.
"""
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class SafeCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: fsspec's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        save_atomic(checkpoint, Path(path))

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        # ib checkpoints hold tensors and plain containers only (hyper-parameters are dicts on purpose), so
        # nothing in them needs pickle's power to run code: refuse it whatever the caller asked for.
        return super().load_checkpoint(path, map_location=map_location or "cpu", weights_only=True)


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temp file in the target's folder, fsync, then rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; a checkpoint gets the usual mode
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # make the rename itself durable


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

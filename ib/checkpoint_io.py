"""Checkpoint files: atomic writes, weights-only reads (a Lightning CheckpointIO plugin, see conf/default.yaml).

Lightning's own writer serialises to memory, then lets fsspec write a temp file in the *system* temp folder
and move it over the target: across file systems (node-local /tmp, shared checkpoint folder) that move is a
copy, and a job killed during it leaves a truncated last.ckpt. Here the temp file sits next to the target
(ib.atomic_write), so a reader sees the old file or the new one. A write the disk refuses (full, quota)
stops the run with one line and keeps the previous file.
"""
import io
import pickle
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ib.atomic_write import atomic_path
from ib.errors import ConfigError, StorageError


class SafeCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: fsspec's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        buffer = io.BytesIO()  # torch's zip writer turns a refused write into an opaque RuntimeError
        torch.save(checkpoint, buffer)
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                f.write(buffer.getbuffer())
        except OSError as e:
            kept = f"the previous {path.name} is kept" if path.exists() else f"no {path.name} was written"
            raise StorageError(f"checkpoint: cannot write {path}: {e.strerror or e}; {kept}") from e

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        # ib checkpoints hold tensors and plain containers only (hyper-parameters are dicts on purpose), so
        # nothing in them needs pickle's power to run code: refuse it whatever the caller asked for.
        try:
            return super().load_checkpoint(path, map_location=map_location or "cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
            raise ConfigError(_unreadable(path, e)) from e


def check_checkpoint_file(path: str, field_name: str = "--ckpt_path") -> dict:
    """A checkpoint named on the command line: there, readable without running code (mmap: no tensor data is
    read) and holding a state_dict. -> its contents, for the caller's further checks."""
    if not Path(path).is_file():
        raise ConfigError(f"{field_name}: file not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise ConfigError(f"{field_name}: {_unreadable(path, e)}") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError(f"{field_name}: {path} is not a Lightning checkpoint (no state_dict)")
    return ckpt


def _unreadable(path, e: BaseException) -> str:
    if isinstance(e, pickle.UnpicklingError):
        return f"{path} is not a weights-only checkpoint (loading it could run code): refused"
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
    return f"cannot read {path}: {first}"

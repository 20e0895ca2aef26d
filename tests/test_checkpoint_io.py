"""Checkpoint files: a save that dies midway leaves the previous file intact; loading never runs pickled code."""
import os
import stat

import pytest
import torch

import ib.checkpoint_io
from ib.checkpoint_io import SafeCheckpointIO
from ib.errors import ConfigError, StorageError


def _checkpoint(step: int) -> dict:
    torch.manual_seed(step)
    return {"global_step": step, "state_dict": {"w": torch.randn(256, 256)}, "loops": {"fit": [1, 2]}}


def test_save_failing_midway_keeps_previous_last_ckpt(tmp_path, monkeypatch):
    io, last = SafeCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint(_checkpoint(1), last)
    good = last.read_bytes()
    assert stat.S_IMODE(last.stat().st_mode) == 0o666 & ~_umask()

    real_open = open

    class FillsUp:  # writes half the bytes, then the disk fills up
        def __init__(self, path, mode):
            self.f = real_open(path, mode)

        def write(self, data):
            self.f.write(bytes(data)[: len(data) // 2])
            raise OSError(28, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(ib.checkpoint_io, "open", FillsUp, raising=False)
    with pytest.raises(StorageError, match="No space left on device; the previous last.ckpt is kept"):
        io.save_checkpoint(_checkpoint(2), last)
    monkeypatch.undo()

    assert last.read_bytes() == good
    assert io.load_checkpoint(last)["global_step"] == 1
    assert os.listdir(last.parent) == ["last.ckpt"]  # the temp file is gone too

    io.save_checkpoint(_checkpoint(2), last)  # and a save that completes replaces it
    assert io.load_checkpoint(last)["global_step"] == 2


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_load_refuses_pickled_code_even_when_asked(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Payload()}, path)
    for weights_only in (None, False):
        with pytest.raises(ConfigError, match="is not a weights-only checkpoint"):
            SafeCheckpointIO().load_checkpoint(path, weights_only=weights_only)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class Marker:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("what", ["pickle", "missing", "not_torch", "not_lightning"])
def test_fit_ckpt_path_that_is_not_a_safe_checkpoint_is_one_line(tmp_path, capsys, what):
    """LightningCLI reads an explicit --ckpt_path before anything else; a pickle gave a multi-line traceback."""
    from ib.cli import main
    from tests.conftest import DEFAULT_CONFIG

    marker, ckpt = tmp_path / "MARKER", tmp_path / "evil.ckpt"
    if what == "pickle":
        torch.save({"state_dict": {}, "payload": Marker(marker)}, ckpt)
    elif what == "not_torch":
        ckpt.write_text("hello")
    elif what == "not_lightning":  # weights alone: the trainer would fail on the missing loop state
        torch.save({"state_dict": {}}, ckpt)
    run = tmp_path / "run"
    code = main(["fit", "--config", str(DEFAULT_CONFIG), "--ckpt_path", str(ckpt),
                 "--trainer.default_root_dir", str(run)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("ib: error: --ckpt_path: "), err
    assert {"pickle": "is not a weights-only checkpoint", "missing": "file not found",
            "not_torch": "cannot read", "not_lightning": "is not a Lightning checkpoint"}[what] in err[0]
    assert not marker.exists() and not run.exists()

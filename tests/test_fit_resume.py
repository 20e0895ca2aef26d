"""Real Trainer fits through the real CLI: checkpoints in the run folder, resume at the saved step."""
import logging
import shutil
import subprocess

import lightning as L
import pytest
import torch

from ib.cli import main
from ib.fit_cli import InstantBoothCLI
from ib.data.datamodule import InstantBoothDataModule
from ib.lit_module import InstantBoothModule
from tests.conftest import edit_config, run_config

pytestmark = pytest.mark.slow


class RecordFirstStep(L.Callback):
    def __init__(self):
        self.first_step = None

    def on_train_batch_start(self, trainer, *args):
        if self.first_step is None:
            self.first_step = trainer.global_step


def test_fit_writes_checkpoints_and_resumes_at_saved_step(tmp_path, synthetic_shards):
    config = run_config(tmp_path, synthetic_shards)
    run = tmp_path / "run"
    assert main(["fit", "--config", str(config), "--ckpt_path", "last"]) == 0

    last = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 4
    # Trainable weights and their optimizer state only: no frozen key, one AdamW entry per trainable tensor.
    module = InstantBoothModule(**{k: v for k, v in ckpt["hyper_parameters"].items()})
    assert set(ckpt["state_dict"]) == {f"model.{k}" for k in module.model.trainable_state_dict()}
    assert not any(k.startswith(("model.ldm.", "model.image_encoder.")) for k in ckpt["state_dict"])
    n_trainable = sum(1 for p in module.parameters() if p.requires_grad)
    assert len(ckpt["optimizer_states"][0]["state"]) == n_trainable == len(ckpt["state_dict"])
    assert (run / "checkpoints" / "step0000002.ckpt").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert list((run / "tensorboard" / "images").glob("*.png"))  # the validation image grid

    # Same command again with a later max_steps, as a cluster requeue would: it resumes from last.ckpt.
    cli = InstantBoothCLI(InstantBoothModule, InstantBoothDataModule, run=False,
                          save_config_kwargs={"overwrite": True},
                          args=["--config", str(config), "--trainer.max_steps", "7"])
    recorder = RecordFirstStep()
    cli.trainer.callbacks.append(recorder)
    saved = {k: v.clone() for k, v in ckpt["state_dict"].items()}
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path="last")
    assert recorder.first_step == 4
    assert cli.trainer.global_step == 7
    resumed = torch.load(last, weights_only=True, map_location="cpu")
    assert resumed["global_step"] == 7
    assert set(resumed["state_dict"]) == set(saved)
    assert any(not torch.equal(resumed["state_dict"][k], v) for k, v in saved.items())


def test_resume_from_another_architecture_is_one_line_error(tmp_path, synthetic_shards, capsys):
    """The config changed the UNet width but the run folder holds the old last.ckpt: refuse in one line,
    whether the checkpoint is named `last` (as `make train` does) or by its path."""
    config = run_config(tmp_path, synthetic_shards, random_ldm=True, max_steps=2)  # the UNet from the config
    assert main(["fit", "--config", str(config)]) == 0
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    wider = edit_config(config, fields={"model.ldm.unet.block_out_channels": [96, 128]}, out=tmp_path / "wider.yaml")
    capsys.readouterr()
    assert main(["fit", "--config", str(wider), "--trainer.max_steps", "4", "--ckpt_path", "last"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ib: error: checkpoint: weights do not fit this model:"), err[-3:]
    assert "expected (96," in err[-1]
    assert main(["fit", "--config", str(wider), "--trainer.max_steps", "4", "--ckpt_path", str(last)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ib: error: checkpoint: weights do not fit this model:"), err[-3:]
    assert torch.load(last, weights_only=True, map_location="cpu")["global_step"] == 2  # left alone


def test_full_disk_keeps_last_ckpt_and_says_so(tmp_path, synthetic_shards, capsys):
    config = run_config(tmp_path, synthetic_shards, max_steps=2, val_check_interval=1000)
    config = edit_config(config, checkpoint={"every_n_train_steps": 1000})  # only last.ckpt, at the end
    assert main(["fit", "--config", str(config)]) == 0
    folder = tmp_path / "run" / "checkpoints"
    last = folder / "last.ckpt"
    good = last.read_bytes()
    # A real full disk: a tmpfs over the checkpoint folder with room for the old last.ckpt, not a new one.
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={len(good) + 64 * 1024}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        last.write_bytes(good)
        capsys.readouterr()
        code = main(["fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_steps", "4"])
        err = capsys.readouterr().err
        assert code == 2, err[-3000:]
        line = err.strip().splitlines()[-1]
        assert line == (f"ib: error: checkpoint: cannot write {last}: No space left on device; "
                        "the previous last.ckpt is kept")
        assert last.read_bytes() == good
        assert [p.name for p in folder.iterdir()] == ["last.ckpt"]  # no temp file
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_resume_cleans_stale_temp_files_and_keeps_one_last_ckpt_after_a_move(tmp_path, synthetic_shards):
    """A save killed mid-write (SIGKILL) leaves its temp file; a run folder moved between runs used to get a
    last-v1.ckpt beside a stale last.ckpt."""
    config = run_config(tmp_path, synthetic_shards, max_steps=2, val_check_interval=1000)
    assert main(["fit", "--config", str(config)]) == 0
    moved = tmp_path / "moved"
    (tmp_path / "run").rename(moved)
    config = edit_config(config, fields={"trainer.default_root_dir": str(moved)})
    stale = moved / "checkpoints" / ".last.ckpt.k1ll3d.tmp"  # the name SafeCheckpointIO's temp files get
    stale.write_bytes((moved / "checkpoints" / "last.ckpt").read_bytes()[:1000])
    assert main(["fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_steps", "4"]) == 0
    names = sorted(p.name for p in (moved / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step0000002.ckpt", "step0000004.ckpt"], names
    assert torch.load(moved / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


class RecordTraining(L.Callback):
    def __init__(self):
        self.lrs, self.skipped = [], []

    def on_train_start(self, trainer, pl_module):
        self.skipped.append(pl_module.skipped_samples)

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.lrs.append({g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups})
        self.skipped.append(pl_module.skipped_samples)


def test_resume_applies_changed_learning_rates_and_carries_skip_counts(tmp_path, synthetic_shards, caplog):
    # A shard of undecodable samples beside the good ones: every step skips some.
    import webdataset as wds
    shards = tmp_path / "shards"
    shutil.copytree(synthetic_shards / "train", shards)
    with wds.TarWriter(str(shards / "bad.tar")) as sink:
        for i in range(8):
            sink.write({"__key__": f"bad{i}", "jpg": b"not a jpeg", "png": b"x", "txt": "a ball", "json": "{}"})
    config = edit_config(run_config(tmp_path, synthetic_shards, max_steps=3, val_check_interval=1000),
                         fields={"data.train_shards": str(shards), "model.optim.warmup_steps": 0,
                                 "model.optim.lr_heads": 1e-3, "model.optim.lr_adapters": 1e-4})
    first = RecordTraining()
    cli = InstantBoothCLI(InstantBoothModule, InstantBoothDataModule, run=False,
                          save_config_kwargs={"overwrite": True}, args=["--config", str(config)])
    cli.trainer.callbacks.append(first)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["skipped_samples"] == first.skipped[-1] > 0

    resumed = RecordTraining()
    cli = InstantBoothCLI(InstantBoothModule, InstantBoothDataModule, run=False,
                          save_config_kwargs={"overwrite": True},
                          args=["--config", str(config), "--trainer.max_steps", "5",
                                "--model.optim.lr_heads", "0.002", "--model.optim.lr_adapters", "0.0003"])
    cli.trainer.callbacks.append(resumed)
    with caplog.at_level(logging.INFO):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path="last")
    assert first.lrs[-1] == {"heads": 1e-3, "adapters": 1e-4}
    assert resumed.lrs == [{"heads": 2e-3, "adapters": 3e-4}] * 2  # was: the checkpoint's 1e-3 / 1e-4
    assert "heads learning rate 0.001 -> 0.002" in caplog.text
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["lr_schedulers"][0]["base_lrs"] == [2e-3, 3e-4]
    # The skip count goes on from the checkpoint's (it restarted at 0).
    assert resumed.skipped[0] == saved["skipped_samples"]
    assert ckpt["skipped_samples"] == resumed.skipped[-1] > saved["skipped_samples"]
    # Resuming from a checkpoint named by its path applies the command line too (Lightning's CLI used to put
    # the checkpoint's hyper-parameters over it when --ckpt_path was a file, but not for `last`).
    assert main(["fit", "--config", str(config), "--ckpt_path", str(tmp_path / "run" / "checkpoints" / "last.ckpt"),
                 "--trainer.max_steps", "6", "--model.optim.lr_heads", "0.004", "--model.optim.lr_adapters", "0.0005"]) == 0
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6 and ckpt["lr_schedulers"][0]["base_lrs"] == [4e-3, 5e-4]

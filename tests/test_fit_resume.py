"""Real Trainer fits through the real CLI: checkpoints in the run folder, resume at the saved step."""
import lightning as L
import pytest
import torch

from ib.cli import InstantBoothCLI, main
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
    """The config changed the UNet width but the run folder holds the old last.ckpt: refuse in one line.
    (`--ckpt_path last`, as `make train` does: with an explicit file LightningCLI takes the model config
    from the checkpoint's hyper-parameters instead.)"""
    config = run_config(tmp_path, synthetic_shards, max_steps=2)
    assert main(["fit", "--config", str(config)]) == 0
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    wider = edit_config(config, fields={"model.ldm.unet.block_out_channels": [64, 128]}, out=tmp_path / "wider.yaml")
    capsys.readouterr()
    assert main(["fit", "--config", str(wider), "--trainer.max_steps", "4", "--ckpt_path", "last"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ib: error: checkpoint: weights do not fit this model:"), err[-3:]
    assert "expected (64," in err[-1]
    assert torch.load(last, weights_only=True, map_location="cpu")["global_step"] == 2  # left alone

"""Real Trainer fits through the real CLI: checkpoints in the run folder, resume at the saved step."""
import subprocess
import sys

import lightning as L
import pytest
import torch
import yaml

from ib.cli import InstantBoothCLI, main
from ib.data.datamodule import InstantBoothDataModule
from ib.lit_module import InstantBoothModule
from tests.conftest import ROOT, run_config

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


def _ib(*args, cwd):
    return subprocess.run([sys.executable, "-m", "ib.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_bad_input_one_line_error_and_no_run_folder(tmp_path, synthetic_shards):
    config = run_config(tmp_path, synthetic_shards)
    cfg = yaml.safe_load(config.read_text())
    cases = {}
    bad = dict(cfg, data=dict(cfg["data"], train_shards=str(tmp_path / "missing_shards")))
    cases["missing_shards"] = (bad, "data.train_shards")
    bad = dict(cfg, model=dict(cfg["model"], no_such_key=1))
    cases["unknown_key"] = (bad, "no_such_key")
    for name, (content, expected) in cases.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(content))
        r = _ib("fit", "--config", str(path), cwd=ROOT)
        assert r.returncode == 2, (name, r.stderr[-2000:])
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("ib: error:") and expected in last, (name, last)
        assert not (tmp_path / "run").exists(), name

    unreadable = tmp_path / "unreadable.yaml"
    unreadable.write_text("model: [unclosed")
    for path, expected in ((unreadable, "unreadable.yaml"), (tmp_path / "absent.yaml", "absent.yaml")):
        r = _ib("fit", "--config", str(path), cwd=ROOT)
        assert r.returncode == 2
        assert r.stderr.strip().splitlines()[-1].startswith("ib: error:") and expected in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "run").exists()

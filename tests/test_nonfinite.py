"""NaN guard: a non-finite step is skipped and counted; K in a row stop training with last.ckpt of the last
good weights and a one-line message."""
import lightning as L
import pytest
import torch

from ib.cli import main
from ib.fit_cli import InstantBoothCLI
from tests.conftest import edit_config, run_config
from tests.helpers import trainable_state

pytestmark = pytest.mark.slow


class RecordSteps(L.Callback):
    def __init__(self):
        self.weights, self.nonfinite_logged = {0: None}, {}

    def on_train_start(self, trainer, pl_module):
        self.weights[0] = trainable_state(pl_module)

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.weights[trainer.global_step] = trainable_state(pl_module)
        self.nonfinite_logged[trainer.global_step] = float(trainer.callback_metrics["train/nonfinite_steps"])


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_nonfinite_steps_skipped_counted_then_stop(tmp_path, synthetic_shards, monkeypatch, capsys):
    # Step 2 alone is bad (skipped, training goes on); steps 4 and 5 are bad in a row: K = 2 stops at step 5.
    config = edit_config(run_config(tmp_path, synthetic_shards, max_steps=10, val_check_interval=1000),
                         fields={"model.max_nonfinite_steps": 2},
                         callbacks=[{"class_path": "tests.helpers.InjectNaN", "init_args": {"at_steps": [2, 4, 5]}}],
                         checkpoint={"every_n_train_steps": 1000})  # last.ckpt can only come from the stop
    recorder = RecordSteps()
    monkeypatch.setattr(InstantBoothCLI, "before_fit", lambda self: self.trainer.callbacks.append(recorder),
                        raising=False)
    assert main(["fit", "--config", str(config)]) == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("ib: error: model.max_nonfinite_steps: 2 consecutive") and "steps 4..5" in message

    w = recorder.weights
    assert not _same(w[1], w[0])      # a good step moves the weights
    assert _same(w[2], w[1])          # the NaN step did not touch them (nor AdamW's moments: step 3 is clean)
    assert not _same(w[3], w[2])
    assert torch.isfinite(torch.cat([v.flatten() for v in w[3].values()])).all()
    assert _same(w[4], w[3])
    assert recorder.nonfinite_logged == {1: 0.0, 2: 1.0, 3: 1.0, 4: 2.0}
    assert 5 not in w                 # stopped inside step 5

    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 4   # skipped steps count as steps: the bad batches are not replayed
    assert _same({k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}, w[3])
    assert ckpt["nonfinite_steps"] == 3

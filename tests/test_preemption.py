"""Preemption: a real `ib fit` killed with SIGTERM writes last.ckpt at the step it stopped at, and resuming
restores weights, optimizer, LR scheduler and RNG exactly; SLURM's early-warning signal does the same and
requeues the job once the checkpoint is on disk."""
import os
import signal
import time

import lightning as L
import pytest
import torch

from ib.callbacks.rng_state import collect_rng_state
from ib.cli import main
from ib.fit_cli import InstantBoothCLI
from ib.data.datamodule import InstantBoothDataModule
from ib.lit_module import InstantBoothModule
from tests.conftest import edit_config, run_config, start_fit, wait_for_step
from tests.helpers import trainable_state

pytestmark = pytest.mark.slow


def assert_same(a, b, where="checkpoint"):
    """Recursive exact equality of nested dicts / lists / tensors / scalars."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


class RecordRestored(L.Callback):
    """What training starts from after the restore (runs after RNGState, which is earlier in the list)."""

    def on_train_start(self, trainer, pl_module):
        self.step = trainer.global_step
        self.weights = trainable_state(pl_module)
        self.optimizer = _clone(trainer.optimizers[0].state_dict())
        self.scheduler = _clone(trainer.lr_scheduler_configs[0].scheduler.state_dict())
        self.rng = collect_rng_state()


def test_sigterm_writes_last_ckpt_and_resume_restores_exact_state(tmp_path, synthetic_shards):
    marker = tmp_path / "step.txt"
    config = edit_config(run_config(tmp_path, synthetic_shards, max_steps=100_000, val_check_interval=1000),
                         callbacks=[{"class_path": "tests.helpers.StepMarker", "init_args": {"path": str(marker)}}],
                         checkpoint={"every_n_train_steps": 1000})  # last.ckpt can only come from the stop
    proc = start_fit(["--config", str(config), "--ckpt_path", "last"])
    try:
        wait_for_step(proc, marker, 3, timeout=240)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        print(f"SIGTERM to exit: {time.monotonic() - sent:.2f} s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err[-3000:]
    assert "resume" in err.strip().splitlines()[-1]

    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt"]  # no temp file left behind
    ckpt = torch.load(ckpt_dir / "last.ckpt", weights_only=True, map_location="cpu")
    stopped = int(marker.read_text())
    assert ckpt["global_step"] == stopped >= 3

    # `make train` again: resume in-process and look at the state training starts from.
    cli = InstantBoothCLI(InstantBoothModule, InstantBoothDataModule, run=False, save_config_kwargs={"overwrite": True},
                          args=["--config", str(config), "--trainer.max_steps", str(stopped + 1)])
    assert set(ckpt["state_dict"]) == {f"model.{k}" for k in cli.model.model.trainable_state_dict()}
    recorder = RecordRestored()
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path="last")

    assert recorder.step == stopped
    assert_same(recorder.weights, {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}, "weights")
    assert_same(recorder.optimizer, ckpt["optimizer_states"][0], "optimizer")
    assert recorder.optimizer["state"], "AdamW moments were saved"
    assert_same(recorder.scheduler, ckpt["lr_schedulers"][0], "scheduler")
    assert_same(recorder.rng, ckpt["callbacks"]["RNGState"]["per_rank"][0], "rng")
    assert cli.trainer.global_step == stopped + 1


def test_slurm_warning_signal_checkpoints_then_requeues(tmp_path, synthetic_shards, monkeypatch, capsys):
    """SIGUSR1 (`#SBATCH --signal=USR1@...`) mid-run: stop after the step, last.ckpt, then `scontrol requeue`."""
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls.txt"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"  # a stand-in that records its arguments and whether last.ckpt existed
    scontrol.write_text(f'#!/bin/sh\necho "$@ $(test -f {ckpt} && echo ckpt-present)" >> {calls}\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")

    class SignalAtStep2(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == 1:
                os.kill(os.getpid(), signal.SIGUSR1)

    config = edit_config(run_config(tmp_path, synthetic_shards, max_steps=50, val_check_interval=1000),
                         checkpoint={"every_n_train_steps": 1000})
    cli_args = ["fit", "--config", str(config), "--ckpt_path", "last"]
    previous = signal.getsignal(signal.SIGUSR1)
    monkeypatch.setattr(InstantBoothCLI, "before_fit", lambda self: self.trainer.callbacks.append(SignalAtStep2()),
                        raising=False)
    assert main(cli_args) == 143
    assert signal.getsignal(signal.SIGUSR1) is previous  # handlers put back
    assert torch.load(ckpt, weights_only=True, map_location="cpu")["global_step"] == 2
    assert calls.read_text().split() == ["requeue", "4242", "ckpt-present"]
    assert "resume" in capsys.readouterr().err

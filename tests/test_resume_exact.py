"""Preemption as a cluster delivers it, and exact resume.

SLURM and most schedulers signal every process of the job step, DataLoader workers included
(`kill -TERM -- -PGID`). A real `ib fit` with DataLoader workers gets the signal that way, must write last.ckpt
at the step it stopped at and exit 143; run again, it must continue as if it had never stopped: the same
sample keys in the same order and bitwise the same weights as an uninterrupted run to the same step.
"""
import json
import os
import signal
import pytest
import torch

from ib.cli import main
from tests.conftest import edit_config, run_config, start_fit, wait_for_step

pytestmark = pytest.mark.slow

# The same thread count in every run, so CPU kernels reduce in the same order.
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _config(tmp_path, shards, name: str, **fields):
    run = tmp_path / name
    config = run_config(tmp_path, shards, max_steps=100_000, val_check_interval=3)
    out = tmp_path / f"{name}.yaml"
    return edit_config(config, out=out, fields={
        "trainer.default_root_dir": str(run),
        "data.loader.num_workers": 2, "data.batches_per_epoch": 4,  # epochs end inside the runs below
        "data.loader.shuffle_buffer": 6, **fields,
    }, callbacks=[{"class_path": "tests.helpers.KeyRecorder", "init_args": {"path": str(run / "keys.rank")}},
                  {"class_path": "tests.helpers.StepMarker", "init_args": {"path": str(run / "step.txt")}},
                  {"class_path": "tests.helpers.WeightsEveryStep", "init_args": {"out_dir": str(run / "weights")}}],
        checkpoint={"every_n_train_steps": 1000}), run


def _fit(config, *args) -> int:
    """`ib fit` in this process (a subprocess would spend ~9 s importing); its threads: THREADS (tests/conftest.py
    sets OMP_NUM_THREADS=1 before torch is imported)."""
    assert os.environ.get("OMP_NUM_THREADS") == THREADS["OMP_NUM_THREADS"]
    return main(["fit", "--config", str(config), *args])


def _stop_with_group_signal(config, run, signum, env=None) -> tuple[int, str]:
    proc = start_fit(["--config", str(config), "--ckpt_path", "last"], env={**THREADS, **(env or {})})
    try:
        wait_for_step(proc, run / "step.txt", 3, timeout=300)
        os.killpg(proc.pid, signum)  # the whole job: main process and DataLoader workers
        _, err = proc.communicate(timeout=120)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.returncode, err


def _keys(run) -> list[tuple[int, list[str]]]:
    lines = (run / "keys.rank0").read_text().splitlines()
    return [(r["step"], r["keys"]) for r in map(json.loads, lines)]


def _last(run) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")


def test_group_sigterm_with_workers_then_resume_equals_uninterrupted_run(tmp_path, synthetic_shards):
    config, run = _config(tmp_path, synthetic_shards, "stopped")
    ref_config, ref_run = _config(tmp_path, synthetic_shards, "reference")
    # The uninterrupted run goes on beside the one to stop (one thread each), until it is past the resumed one.
    reference = start_fit(["--config", str(ref_config), "--trainer.enable_progress_bar", "false"], env=THREADS)
    try:
        code, err = _stop_with_group_signal(config, run, signal.SIGTERM)
        assert code == 143, err[-3000:]
        assert "resume" in err.strip().splitlines()[-1]
        stopped = _last(run)["global_step"]
        assert stopped == int((run / "step.txt").read_text()) >= 3
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]

        total = 2 * stopped + 1  # past at least one epoch end and a validation after the restart
        assert _fit(config, "--ckpt_path", "last", "--trainer.max_steps", str(total)) == 0
        wait_for_step(reference, ref_run / "step.txt", total + 1, timeout=300)  # step {total}'s weights are saved
    finally:
        if reference.poll() is None:
            os.killpg(reference.pid, signal.SIGKILL)

    keys, ref_keys = _keys(run), _keys(ref_run)
    assert [s for s, _ in keys] == list(range(1, total + 1))  # no step lost or repeated
    assert keys == ref_keys[:total]  # the same samples in the same order, across the restart and epoch ends
    a = _last(run)
    b = torch.load(ref_run / "weights" / f"step{total}.pt", weights_only=True)
    assert a["global_step"] == total
    diff = max((a["state_dict"][f"model.{k}"] - v).abs().max().item() for k, v in b.items())
    print(f"stopped at {stopped}, resumed to {total}: max abs weight diff {diff:g}")
    assert diff == 0.0


def test_group_sigusr1_with_workers_checkpoints_and_requeues(tmp_path, synthetic_shards):
    """SLURM's early warning (`--signal=USR1@120`) to the whole job: checkpoint, `scontrol requeue`, exit 143."""
    config, run = _config(tmp_path, synthetic_shards, "requeued")
    ckpt = run / "checkpoints" / "last.ckpt"
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls.txt"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"  # a stand-in that records its arguments and whether last.ckpt existed
    scontrol.write_text(f'#!/bin/sh\necho "$@ $(test -f {ckpt} && echo ckpt-present)" >> {calls}\n')
    scontrol.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    code, err = _stop_with_group_signal(config, run, signal.SIGUSR1, env=env)
    assert code == 143, err[-3000:]
    assert calls.read_text().split() == ["requeue", "4242", "ckpt-present"]
    stopped = _last(run)["global_step"]
    assert stopped == int((run / "step.txt").read_text()) >= 3
    assert [s for s, _ in _keys(run)] == list(range(1, stopped + 1))


def test_resume_after_max_steps_inside_an_epoch_finishes_that_epoch_first(tmp_path, synthetic_shards):
    """A run that ends at max_steps inside an epoch: Lightning counts that epoch as done, so a resume with a
    higher max_steps used to start the next epoch's stream and the rest of the cut epoch was never read."""
    config, run = _config(tmp_path, synthetic_shards, "two_stages")
    ref_config, ref_run = _config(tmp_path, synthetic_shards, "one_go")
    assert _fit(config, "--trainer.max_steps", "6") == 0  # batches_per_epoch 4: stops 2 batches into epoch 1
    assert _fit(config, "--ckpt_path", "last", "--trainer.max_steps", "11") == 0
    assert _fit(ref_config, "--trainer.max_steps", "11") == 0
    keys, ref_keys = _keys(run), _keys(ref_run)
    assert [s for s, _ in keys] == list(range(1, 12))
    assert keys == ref_keys
    a, b = _last(run), _last(ref_run)
    assert max((a["state_dict"][k] - v).abs().max().item() for k, v in b["state_dict"].items()) == 0.0

"""A real 2-process DDP run on CPU (gloo) through the CLI, as a user launches it: ranks see different samples
and keep identical weights (also through a NaN on one rank only), one set of checkpoints is written,
validation runs on every rank although there is a single val shard, and val/loss is reduced across ranks."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, edit_config, run_config, subprocess_env

pytestmark = pytest.mark.slow


def test_two_process_ddp_fit(tmp_path, synthetic_shards):
    report = tmp_path / "report"
    config = edit_config(
        run_config(tmp_path, synthetic_shards, max_steps=3, val_check_interval=2),
        # One val shard for two ranks: split by shard, one rank would get nothing and the other would wait.
        fields={"data.val_shards": str(synthetic_shards / "val" / "shard-000000*.tar")},
        callbacks=[{"class_path": "tests.helpers.RankReport", "init_args": {"out_dir": str(report)}},
                   {"class_path": "tests.helpers.InjectNaN", "init_args": {"at_steps": [2], "rank": 1}}])
    proc = subprocess.Popen([sys.executable, "-m", "ib.cli", "fit", "--config", str(config), "--trainer.accelerator",
                             "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"],
                            cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:  # a hang: take the whole process group (rank 1 is a child) down
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, err[-4000:]

    ranks = [json.loads((report / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["pid"] != ranks[1]["pid"]
    assert ranks[0]["concepts"] != ranks[1]["concepts"], "both ranks trained on the same samples"

    # Identical weights after every step; step 2 (NaN on rank 1 only) was skipped on both ranks.
    assert ranks[0]["checksums"] == ranks[1]["checksums"]
    c = ranks[0]["checksums"]
    assert c[1] == c[0] and c[2] != c[1], c
    assert ranks[0]["nonfinite"] == ranks[1]["nonfinite"] == 1
    final = [torch.load(report / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])

    # Validation ran on both ranks (one batch each, different samples), and val/loss is their mean on both.
    local = [r["val_local"] for r in ranks]
    assert len(local[0]) == len(local[1]) == 1 and local[0] != local[1]
    synced = [r["val_synced"][0] for r in ranks]
    assert synced[0] == synced[1] == pytest.approx((local[0][0] + local[1][0]) / 2, rel=1e-5)

    # One writer: each checkpoint once, no per-rank copies or leftovers; last.ckpt = the ranks' weights.
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt", "step0000002.ckpt"]
    ckpt = torch.load(ckpt_dir / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 3
    assert all(torch.equal(ckpt["state_dict"][f"model.{k}"], v) for k, v in final[0].items())
    rng = ckpt["callbacks"]["RNGState"]["per_rank"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])  # a stream per rank

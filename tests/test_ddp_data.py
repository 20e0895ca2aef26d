"""A real 2-process DDP fit on CPU through `ib fit`: shards split by rank, fewer validation shards than
ranks (validation must not hang), bad samples skipped in one rank and their count logged to TensorBoard."""
import subprocess
import sys

import pytest
import webdataset as wds

from tests.conftest import ROOT, edit_config, run_config, subprocess_env
from tests.test_streams import good_sample, write_shard

pytestmark = pytest.mark.slow


def test_ddp_fit_with_one_val_shard_and_bad_samples(tmp_path, synthetic_shards):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train, val = tmp_path / "train", tmp_path / "val"
    train.mkdir(), val.mkdir()
    raw = list(wds.WebDataset(sorted(str(p) for p in (synthetic_shards / "train").glob("*.tar")),
                              shardshuffle=False))
    write_shard(train / "a.tar", raw[:8])                       # rank 0's shard
    bad = [dict(good_sample(f"bad{i}", size=64), jpg=b"garbage") for i in range(4)]
    write_shard(train / "b.tar", [*bad, *raw[8:10]])            # rank 1's: 4 bad, then 2 good per pass
    write_shard(val / "only.tar", raw[10:17])                   # 7 samples, 1 shard, 2 ranks

    config = edit_config(
        run_config(tmp_path, synthetic_shards, accelerator="cpu", devices=2, strategy="ddp",
                   log_every_n_steps=1, limit_val_batches=None),
        fields={"data.train_shards": str(train), "data.val_shards": str(val), "data.val_batches": None,
                "data.resampled": False, "data.loader.shuffle_buffer": 0})
    r = subprocess.run([sys.executable, "-m", "ib.cli", "fit", "--config", str(config)], cwd=ROOT,
                       env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipping sample: bad0: cannot decode" in r.stderr

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    skipped = [e.value for e in events.Scalars("data/skipped_samples")]
    # Rank 1 reads 4 bad samples before every 2 good ones (no shuffle): 4 skipped per step of batch 2, also
    # across the end of the 3-batch epoch.
    assert skipped == [4, 8, 12, 16]
    assert len(events.Scalars("val/loss_own")) == 2  # both validations finished on both ranks

"""Synthetic-world shards round-trip through the schema and the DataModule."""
import json
import tarfile

import torch

from ib.data.datamodule import InstantBoothDataModule
from ib.data.shards import decode_sample
from ib.errors import ConfigError

import pytest
import webdataset as wds


def test_shards_round_trip_through_schema(synthetic_shards):
    manifest = json.loads((synthetic_shards / "manifest.json").read_text())
    assert manifest["samples"] == {"train": 24, "val": 12}
    members = tarfile.open(next((synthetic_shards / "train").glob("*.tar"))).getnames()
    assert {m.rsplit(".", 1)[1] for m in members} == {"jpg", "png", "txt", "json"}

    train_concepts, val_concepts = set(), set()
    for split, seen in (("train", train_concepts), ("val", val_concepts)):
        urls = sorted(str(p) for p in (synthetic_shards / split).glob("*.tar"))
        for raw in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
            s = decode_sample(raw)
            assert s["image"].dtype.name == "uint8" and s["image"].shape == (64, 64, 3)
            assert s["mask"].shape == (64, 64) and 0.05 < s["mask"].mean() < 0.75
            assert s["meta"]["class"] in s["caption"]
            x0, y0, x1, y1 = s["meta"]["bbox"]
            assert s["mask"][y0:y1, x0:x1].sum() == s["mask"].sum()
            seen.add(s["meta"]["concept"])
    assert len(train_concepts) == 6 and len(val_concepts) == 3
    assert not train_concepts & val_concepts  # split by concept


def test_datamodule_batches(synthetic_shards):
    dm = InstantBoothDataModule(str(synthetic_shards / "train"), str(synthetic_shards / "val"), image_size=48,
                                reference_size=32, batch_size=3, batches_per_epoch=4, val_batches=2)
    batches = list(dm.train_dataloader())
    assert len(batches) == 4
    b = batches[0]
    assert b["image"].shape == (3, 3, 48, 48) and b["refs"].shape == (3, 1, 3, 32, 32)
    assert b["mask"].shape == (3, 1, 48, 48) and b["mask"].dtype == torch.bool and b["mask"].any()
    assert b["image"].dtype == torch.uint8 and b["skipped"].item() == 0  # float on the device, after the transfer
    b = dm.on_after_batch_transfer(b, 0)
    assert b["image"].dtype == torch.float32 and 0 <= b["image"].min() and b["image"].max() <= 1
    assert b["refs"].dtype == torch.float32 and b["refs"].max() <= 1
    assert all(" sks " in f" {c} " and len(c.split()) > 2 for c in b["caption"])
    for c in b["caption"]:
        words = c.split()
        assert words[words.index("sks") + 1] in {"ball", "box", "kite", "star", "ring", "tent"}
    val = list(dm.val_dataloader())
    assert len(val) == 2 and val[0]["image"].shape[1:] == (3, 48, 48)  # val_batches caps the 12 samples
    # Validation is deterministic; training references are augmented afresh each time.
    again = list(dm.val_dataloader())
    assert torch.equal(val[0]["refs"], again[0]["refs"])


def test_missing_shards_name_the_field(tmp_path, synthetic_shards):
    with pytest.raises(ConfigError, match="data.train_shards"):
        InstantBoothDataModule(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="data.val_shards: no shards"):
        InstantBoothDataModule(str(synthetic_shards / "train"), val_shards=str(tmp_path / "empty"))

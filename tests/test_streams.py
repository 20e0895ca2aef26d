"""The DataModule at scale: bad samples skipped and counted, rank/worker splits, per-rank shuffles, validation
shares under DDP, augmentations consistent between image and mask.

Ranks are simulated with the RANK / WORLD_SIZE environment variables, which is what webdataset's
pytorch_worker_info (and so the DataModule outside a Trainer) reads; DataLoader workers are real processes.
The real 2-process DDP run is in test_ddp_data.py.
"""
import io
import json
import logging
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from ib.data.datamodule import InstantBoothDataModule, SampleTransform, batch_to_float
from ib.data.shards import decode_sample
from ib.data.transforms import ReferenceAugment, mask_crop, target_transform
from ib.errors import ConfigError

SIZE = 32


def encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def good_sample(key: str, size: int = SIZE, caption: str = "a photo of a ball on the grass") -> dict:
    rng = np.random.default_rng(abs(hash(key)) % 2**32)
    image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4: size * 3 // 4, size // 4: size // 2] = 255
    meta = {"class": "ball", "concept": key, "bbox": [size // 4, size // 4, size // 2, size * 3 // 4]}
    return {"__key__": key, "jpg": encode(image, "JPEG"), "png": encode(mask, "PNG"), "txt": caption,
            "json": json.dumps(meta)}


def write_shard(path, samples):
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)


@pytest.fixture
def corrupt_shards(tmp_path):
    """5 good samples and 6 bad ones, one of every kind the loader must survive."""
    undecodable = dict(good_sample("undecodable"), jpg=b"not a jpeg at all")
    full = good_sample("truncated_member")
    truncated_member = dict(full, jpg=full["jpg"][: len(full["jpg"]) // 2])  # a cut JPEG inside a sound tar
    missing_mask = {k: v for k, v in good_sample("missing_mask").items() if k != "png"}
    wrong_size = dict(good_sample("mask_wrong_size"), png=encode(np.full((SIZE // 2, SIZE), 255, np.uint8), "PNG"))
    empty_caption = good_sample("empty_caption", caption="   ")
    write_shard(tmp_path / "a.tar", [good_sample("good0"), undecodable, good_sample("good1"), truncated_member,
                                     missing_mask, good_sample("good2"), wrong_size, empty_caption])
    # A shard cut off in the middle of its third sample: two good samples, then the tar ends.
    write_shard(tmp_path / "b.tar", [good_sample("good3"), good_sample("good4"), good_sample("cut_off", size=64)])
    data = (tmp_path / "b.tar").read_bytes()
    second_end = data.index(b"cut_off.jpg")  # the third sample's first header
    (tmp_path / "b.tar").write_bytes(data[: second_end + 512 + 300])  # header + 300 bytes of the JPEG
    return tmp_path, {"good0", "good1", "good2", "good3", "good4"}, 6


def test_corrupt_samples_are_skipped_and_counted(corrupt_shards, caplog):
    folder, good, bad = corrupt_shards
    dm = InstantBoothDataModule(str(folder), str(folder), image_size=24, reference_size=16, batch_size=2,
                                val_batches=3)  # one pass: 5 good samples in batches of 2
    with caplog.at_level(logging.WARNING):
        batches = list(dm.val_dataloader())
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == sorted(good)
    assert sum(int(b["skipped"]) for b in batches) == bad
    log = caplog.text
    for what in ("cannot decode", "truncated", "missing 'png'", "does not match image", "empty caption",
                 "b.tar: unreadable"):
        assert what in log, what


def test_skip_counts_cross_worker_processes(corrupt_shards):
    folder, good, bad = corrupt_shards
    dm = InstantBoothDataModule(str(folder), image_size=24, reference_size=16, batch_size=1,
                                batches_per_epoch=len(good) + 1, resampled=False,
                                loader={"num_workers": 1, "shuffle_buffer": 0})
    batches = list(dm.train_dataloader())
    assert len(batches) == len(good) + 1
    # Every skip of the first pass reaches the main process by the first batch of the second pass.
    assert bad <= sum(int(b["skipped"]) for b in batches) <= 2 * bad


def _keys(dm) -> list[str]:
    return [k for b in dm.train_dataloader() for k in b["key"]]


def test_two_ranks_two_workers_disjoint_and_complete(synthetic_shards, monkeypatch):
    # 24 training samples in 3 shards of 8: too few for 2 x 2; rebuild as 8 shards of 3.
    from data_tools.synthetic_world import build
    world = build(synthetic_shards.parent / "small_shards", concepts=6, val_concepts=1, images_per_concept=4,
                  size=32, shard_size=3, seed=0)
    shards = sorted((world / "train").glob("*.tar"))
    assert len(shards) == 8
    seen = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        # Each (rank, worker) owns 2 shards = 6 samples: 2 workers x 6 batches of 1 is exactly one pass.
        dm = InstantBoothDataModule(str(world / "train"), image_size=16, reference_size=16, batch_size=1,
                                    batches_per_epoch=12, resampled=False,
                                    loader={"num_workers": 2, "shuffle_buffer": 4})
        seen[rank] = _keys(dm)
        assert len(seen[rank]) == len(set(seen[rank])) == 12  # the two workers do not overlap
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 24


def test_too_few_shards_for_ranks_and_workers_is_a_config_error(synthetic_shards, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    dm = InstantBoothDataModule(str(synthetic_shards / "train"), resampled=False)  # 3 shards
    with pytest.raises(ConfigError, match="data.train_shards: 3 shards cannot be split over 4 ranks"):
        dm.train_dataloader()


def test_resampled_streams_differ_by_rank_and_repeat_by_seed(synthetic_shards, monkeypatch):
    def stream(rank: int, seed: int) -> list[str]:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = InstantBoothDataModule(str(synthetic_shards / "train"), image_size=16, reference_size=16,
                                    batch_size=2, batches_per_epoch=6, loader={"seed": seed, "shuffle_buffer": 8})
        return _keys(dm)

    first = stream(0, seed=0)
    assert stream(0, seed=0) == first          # reproducible
    assert stream(1, seed=0) != first          # another rank, another stream
    assert stream(0, seed=1) != first          # another seed, another stream


def test_augmented_batches_repeat_by_seed_in_workers_too(synthetic_shards):
    """Same loader.seed, same pixels (target crop/flip, reference jitter and augmentations), in the main process
    and in a DataLoader worker; another seed, other augmentations of the same samples."""
    def batches(seed: int, workers: int) -> list[dict]:
        dm = InstantBoothDataModule(str(synthetic_shards / "train"), image_size=48, reference_size=32,
                                    batch_size=4, batches_per_epoch=3,
                                    loader={"seed": seed, "shuffle_buffer": 8, "num_workers": workers})
        return list(dm.train_dataloader())

    for workers in (0, 1):
        first, again = batches(0, workers), batches(0, workers)
        for a, b in zip(first, again, strict=True):
            assert a["key"] == b["key"]
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["refs"], b["refs"])
            assert torch.equal(a["mask"], b["mask"])

    # The transform alone: the seed fixes the draws, which still differ from call to call.
    sample = good_sample("ball0", size=48)
    decoded = decode_sample({**sample, "txt": sample["txt"].encode(), "json": sample["json"].encode()})
    def draws(seed: int) -> list[torch.Tensor]:
        t = SampleTransform(48, 32, "sks", ReferenceAugment(), train=True, seed=seed)
        return [torch.cat([t(decoded)["refs"].flatten(), t(decoded)["image"].flatten()]) for _ in range(4)]
    a, b, c = draws(0), draws(0), draws(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1])
    assert not any(torch.equal(x, y) for x, y in zip(a, c))
    # Reseeding (the stream does it at every epoch start) restarts the draws.
    t = SampleTransform(48, 32, "sks", ReferenceAugment(), train=True)
    t.reseed(7)
    first = [t(decoded)["refs"] for _ in range(2)]
    t.reseed(7)
    assert all(torch.equal(t(decoded)["refs"], x) for x in first)


def test_validation_shares_with_more_ranks_than_shards(synthetic_shards, monkeypatch):
    val = synthetic_shards / "val"  # 12 samples in 2 shards
    assert len(list(val.glob("*.tar"))) == 2
    shares = {}
    for rank in range(5):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "5")
        dm = InstantBoothDataModule(str(synthetic_shards / "train"), str(val), image_size=16,
                                    reference_size=16, val_batch_size=2)
        batches = list(dm.val_dataloader())
        assert len(batches) == 2  # the largest share (3 samples) in batches of 2, on every rank
        shares[rank] = [k for b in batches for k in b["key"]]
    firsts = [keys[: 3 if r < 2 else 2] for r, keys in shares.items()]  # share sizes 3, 3, 2, 2, 2
    assert sum(len(f) for f in firsts) == len({k for f in firsts for k in f}) == 12  # disjoint and complete
    for rank in (2, 3, 4):  # shorter shares wrap around to their own first sample
        assert shares[rank][2] == shares[rank][0]


def test_target_transform_moves_image_and_mask_together():
    rng = np.random.default_rng(0)
    mask = np.zeros((40, 60), bool)
    mask[5:30, 8:20] = True
    mask[10:14, 20:50] = True  # asymmetric: a flip or a shifted crop shows
    image = np.where(mask[..., None], np.uint8([255, 0, 0]), rng.integers(0, 100, (40, 60, 3)).astype(np.uint8))
    flips = 0
    tf = target_transform(24, train=True)
    for _ in range(20):
        out = tf(image=image, mask=mask.astype(np.uint8))
        red = (out["image"][..., 0] > 127) & (out["image"][..., 1] < 128)
        m = out["mask"].astype(bool)
        assert out["image"].shape == (24, 24, 3) and m.shape == (24, 24)
        iou = lambda a, b: (a & b).sum() / (a | b).sum()
        assert iou(red, m) > 0.8 > 0.5 > iou(red, m[:, ::-1])  # resizing blurs the edge only; a stray flip shows
        flips += m[:, 12:].sum() < m[:, :12].sum()  # unflipped, most of the object is on the right
    assert 0 < flips < 20


def test_mask_crop_fills_background_and_jitters_inside_the_frame():
    image = np.full((50, 40, 3), 7, np.uint8)
    mask = np.zeros((50, 40), bool)
    mask[10:30, 5:25] = True
    crop = mask_crop(image, mask, fill=255, jitter=0.0, rng=None)
    assert crop.shape == (20, 20, 3) and (crop == 7).all()
    mask[12, 5:10] = False  # a background hole inside the box is filled
    assert (mask_crop(image, mask, 255, 0.0, None)[2, 0:5] == 255).all()
    rng = np.random.default_rng(0)
    sizes = {mask_crop(image, mask, 255, 0.5, rng).shape[:2] for _ in range(30)}
    assert len(sizes) > 5 and all(1 <= h <= 50 and 1 <= w <= 40 for h, w in sizes)


def test_noun_synonym_gets_the_identifier():
    t = SampleTransform(16, 16, "sks", ReferenceAugment(), train=False)
    s = {"__key__": "k", "image": np.zeros((20, 20, 3), np.uint8), "mask": np.ones((20, 20), bool),
         "caption": "two Puppies on a sofa", "meta": {"class": "dog", "noun": "Puppies"}}
    out = t(s)
    assert out["caption"] == "two sks Puppies on a sofa"
    assert out["image"].dtype == torch.uint8 and out["mask"].dtype == torch.bool
    batch = batch_to_float({"image": out["image"][None], "refs": out["refs"][None]})
    assert batch["image"].dtype == torch.float32 and batch["image"].max() <= 1


def _worker_pids(iterator) -> list[int]:
    return [w.pid for w in iterator._workers]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_workers_outlive_stop_signals_sent_to_the_whole_job(synthetic_shards, signum):
    """A scheduler signals every process of the job; the workers must keep serving the main process, which
    checkpoints and then shuts them down. Sent by another process (`kill`), as a scheduler's would be."""
    dm = InstantBoothDataModule(str(synthetic_shards / "train"), image_size=16, reference_size=16, batch_size=2,
                                batches_per_epoch=8, loader={"num_workers": 2, "shuffle_buffer": 4})
    it = iter(dm.train_dataloader())
    next(it)
    pids = _worker_pids(it)
    subprocess.run(["kill", f"-{signal.Signals(signum).name[3:]}", *map(str, pids)], check=True)
    time.sleep(1.0)  # time for a worker to die of it
    assert len(list(it)) == 7  # was: RuntimeError: DataLoader worker (pid ...) is killed by signal


def test_a_sigterm_from_the_main_process_still_ends_a_worker(synthetic_shards):
    """How the DataLoader ends a worker that does not answer its shutdown request."""
    dm = InstantBoothDataModule(str(synthetic_shards / "train"), image_size=16, reference_size=16, batch_size=2,
                                batches_per_epoch=8, loader={"num_workers": 1, "shuffle_buffer": 4})
    it = iter(dm.train_dataloader())
    next(it)
    worker = it._workers[0]
    os.kill(worker.pid, signal.SIGTERM)
    worker.join(timeout=30)
    assert not worker.is_alive()
    it._shutdown_workers()


@pytest.mark.parametrize("workers", [0, 1])
def test_a_stream_with_nothing_good_stops_with_one_line(tmp_path, workers):
    """resampled: true draws shards forever; with every sample bad it used to skip forever."""
    write_shard(tmp_path / "bad.tar", [dict(good_sample(f"bad{i}"), jpg=b"not a jpeg") for i in range(3)])
    (tmp_path / "empty.tar").write_bytes(b"\0" * 1024)  # a valid tar without members
    for shards in ("bad.tar", "empty.tar"):
        dm = InstantBoothDataModule(str(tmp_path / shards), image_size=16, reference_size=16, batch_size=2,
                                    max_consecutive_bad=50, loader={"num_workers": workers})
        start = time.monotonic()
        with pytest.raises(ConfigError) as e:
            list(dm.train_dataloader())
        assert time.monotonic() - start < 60
        message = str(e.value)
        assert "\n" not in message and message.startswith("data.train_shards: 50 bad samples in a row"), message
        assert "data.max_consecutive_bad" in message


@pytest.mark.parametrize("resampled", [True, False])
def test_resumed_stream_continues_where_the_delivered_batches_end(synthetic_shards, corrupt_shards, resampled):
    """Positions recorded from the batches (as a checkpoint keeps them) restart every worker exactly there,
    bad samples included: the rest of the epoch and the next epoch are the uninterrupted ones."""
    folder = corrupt_shards[0]
    for shards in (synthetic_shards / "train", folder):
        kw = dict(image_size=16, reference_size=16, batch_size=2, batches_per_epoch=6, resampled=resampled,
                  loader={"num_workers": 2, "shuffle_buffer": 4, "seed": 3})
        full = InstantBoothDataModule(str(shards), **kw)
        loader = full.train_dataloader()
        epochs = [[b["key"] for b in loader] for _ in range(2)]
        for k in (1, 3, 6):  # mid-epoch, odd (one worker ahead), at the epoch's end
            stopped = InstantBoothDataModule(str(shards), **kw)
            positions = {}
            delivered = [b for _, b in zip(range(k), stopped.train_dataloader())]
            for b in delivered:
                epoch, worker, n, samples = b["stream"].tolist()
                positions[worker] = (n, samples)
            resumed = InstantBoothDataModule(str(shards), **kw)
            resumed.load_state_dict({"per_rank": [{"epoch": 0, "num_workers": 2, "workers": positions}]})
            loader = resumed.train_dataloader()
            rest = [[b["key"] for b in loader] for _ in range(2)]
            assert [b["key"] for b in delivered] + rest[0] == epochs[0], k
            assert rest[1] == epochs[1], k

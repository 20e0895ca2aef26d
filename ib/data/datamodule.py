"""Streams WebDataset shards of masked text-image pairs into InstantBooth training batches.

Batch: image (B, 3, S, S) in [0, 1] (the full target), refs (B, 1, 3, R, R) in [0, 1] (the augmented,
masked object crop), caption (B strings, identifier inserted before the class noun), concept (B strings).
"""
import logging
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
import webdataset as wds

from ib.data.shards import BadSample, decode_sample, resolve_shards
from ib.data.transforms import ReferenceAugment, mask_crop, reference_transform, target_transform
from ib.errors import ConfigError
from ib.models.identifier import insert_identifier

log = logging.getLogger(__name__)


@dataclass
class LoaderConfig:
    num_workers: int = 0
    prefetch_factor: int = 2
    pin_memory: bool = False
    shuffle_buffer: int = 500


class SampleTransform:
    """Decoded sample -> training example. Picklable, so it runs inside DataLoader workers."""

    def __init__(self, image_size: int, reference_size: int, identifier: str, augment: ReferenceAugment,
                 train: bool):
        self.identifier, self.augment, self.train = identifier, augment, train
        self.target = target_transform(image_size, train)
        self.reference = reference_transform(reference_size, augment, train)

    def __call__(self, s: dict) -> dict:
        caption = insert_identifier(s["caption"], s["meta"]["class"], self.identifier)
        if caption is None:
            raise BadSample(f"{s['__key__']}: class noun '{s['meta']['class']}' not in caption")
        rng = np.random.default_rng() if self.train else None
        obj = mask_crop(s["image"], s["mask"], self.augment.fill, self.augment.bbox_jitter, rng)
        ref = self.reference(image=obj)["image"]
        tgt = self.target(image=s["image"], mask=s["mask"].astype(np.uint8))["image"]
        to_tensor = lambda a: torch.from_numpy(np.array(a, copy=True)).permute(2, 0, 1).float() / 255
        return {"image": to_tensor(tgt), "refs": to_tensor(ref)[None], "caption": caption,
                "concept": str(s["meta"].get("concept", s["__key__"]))}


def _skip_bad(exn: Exception) -> bool:
    """webdataset handler: log the bad sample and continue; anything else is a real bug."""
    log.warning("skipping sample: %s", exn)
    return True


class InstantBoothDataModule(L.LightningDataModule):
    """
    train_shards / val_shards: a folder of .tar shards, a glob, or a brace pattern.
    batches_per_epoch: training streams resampled shards forever; an "epoch" is this many batches per rank
        (keeps DDP ranks in step). Validation reads its shards once, in order, up to val_batches batches.
    """

    def __init__(self, train_shards: str, val_shards: str | None = None, image_size: int = 64,
                 reference_size: int = 64, batch_size: int = 4, val_batch_size: int | None = None,
                 batches_per_epoch: int = 100, val_batches: int | None = None, identifier: str = "sks",
                 augment: ReferenceAugment | None = None,
                 loader: LoaderConfig | None = None):
        super().__init__()
        for name, value in (("batch_size", batch_size), ("batches_per_epoch", batches_per_epoch),
                            ("image_size", image_size), ("reference_size", reference_size)):
            if value < 1:
                raise ConfigError(f"data.{name}: must be >= 1, got {value}")
        self.train_urls = resolve_shards(train_shards, "data.train_shards")
        self.val_urls = resolve_shards(val_shards, "data.val_shards") if val_shards else None
        self.image_size, self.reference_size = image_size, reference_size
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.batches_per_epoch, self.val_batches = batches_per_epoch, val_batches
        self.identifier = identifier
        self.augment = augment or ReferenceAugment()
        self.loader = loader or LoaderConfig()

    def _transform(self, train: bool) -> SampleTransform:
        return SampleTransform(self.image_size, self.reference_size, self.identifier, self.augment, train)

    def _loader(self, dataset, workers: int) -> torch.utils.data.DataLoader:
        extra = {"prefetch_factor": self.loader.prefetch_factor, "persistent_workers": True} if workers else {}
        return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                           pin_memory=self.loader.pin_memory, **extra)

    def train_dataloader(self):
        workers = self.loader.num_workers
        ds = (wds.WebDataset(self.train_urls, resampled=True, shardshuffle=False, nodesplitter=wds.split_by_node,
                             handler=_skip_bad)
              .shuffle(self.loader.shuffle_buffer)
              .map(decode_sample, handler=_skip_bad)
              .map(self._transform(train=True), handler=_skip_bad)
              .batched(self.batch_size, partial=False)
              .with_epoch(-(-self.batches_per_epoch // max(1, workers))))  # per worker
        return self._loader(ds, workers)

    def val_dataloader(self):
        if not self.val_urls:
            return []
        ds = (wds.WebDataset(self.val_urls, shardshuffle=False, nodesplitter=wds.split_by_node,
                             workersplitter=wds.split_by_worker, empty_check=False, handler=_skip_bad)
              .map(decode_sample, handler=_skip_bad)
              .map(self._transform(train=False), handler=_skip_bad)
              .batched(self.val_batch_size, partial=True))
        if self.val_batches:
            ds = ds.slice(self.val_batches)
        return self._loader(ds, 0)

"""Streams WebDataset shards of masked text-image pairs into InstantBooth training batches.

Batch (on the device): image (B, 3, S, S) in [0, 1] (the full target), mask (B, 1, S, S) bool (the
object in the target, cropped and flipped with it), refs (B, 1, 3, R, R) in [0, 1] (the augmented, masked
object crop), caption (B strings, identifier inserted before the class noun), concept and key (B strings),
skipped (bad samples skipped since the previous batch of the same worker; ib/data/streams.py), and in
training stream (epoch, worker, batches, samples: where that worker's stream stands, for the checkpoint).
latent_moments (B, 2C, h, w) float16, only from shards made by data_tools.encode_latents: the VAE
posterior of the (centre-cropped, maybe flipped) target, so training skips the VAE encoder.
crop (B, 4) int: each target's original height and width and its crop's top-left corner (SDXL's size
conditioning; ib.data.transforms.crop_geometry).
The DataLoaders yield image and refs as uint8 0..255; `on_after_batch_transfer` (or `batch_to_float`
outside a Trainer) makes them float in [0, 1] on the device.
"""
import random
from dataclasses import dataclass

import cv2
import lightning as L
import numpy as np
import torch
import webdataset as wds
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ib.data.shards import BadSample, count_samples, decode_sample, resolve_shards
from ib.data.streams import TrainStream, val_batches_per_rank, val_stream
from ib.data.concepts import HeldOutConcept, read_held_out_concepts
from ib.data.references import reference_crop
from ib.data.transforms import ReferenceAugment, crop_geometry, mask_crop, reference_transform, target_transform
from ib.distributed import gather_from_ranks
from ib.errors import ConfigError
from ib.preemption import WorkerSignalsLoader, ignore_stop_signals
from ib.identifier import insert_identifier
from ib.ranges import NonNegativeInt, PositiveInt, check_arguments
from ib.threads import available_cpus, set_compute_threads

@dataclass
class LoaderConfig:
    num_workers: NonNegativeInt = 0
    prefetch_factor: PositiveInt = 2
    pin_memory: bool = False
    shuffle_buffer: NonNegativeInt = 500      # raw samples per worker (about 100 kB each at 512 px)
    seed: int = 0                  # shard and sample order and the augmentations; mixed with epoch, rank,
                                   # worker and each sample's place in the stream


class SampleTransform:
    """Decoded sample -> training example. Picklable, so it runs inside DataLoader workers.

    In training the random draws (target crop and flip, reference box jitter and augmentations) come from
    generators that `reseed` sets and that then run on from sample to sample; the training stream reseeds them
    at the start of every epoch of every worker, from (seed, epoch, rank, worker), so the same seed gives the
    same pixels, run after run (until reseeded they start from `seed`). Left alone, albumentations' Compose
    and np.random.default_rng() take fresh OS entropy, which neither `seed_everything` nor the DataLoader's
    worker seeding reaches.
    """

    def __init__(self, image_size: int, reference_size: int, identifier: str, augment: ReferenceAugment,
                 train: bool, seed: int = 0):
        self.identifier, self.augment, self.train = identifier, augment, train
        self.target = target_transform(image_size, train)
        self.fixed_target = target_transform(image_size, train=False)  # the crop precomputed latents were made from
        self.reference = reference_transform(reference_size, augment, train)
        self.reference_size = reference_size
        self.seed = seed
        self._rng: np.random.Generator | None = None  # set in the process that runs the transform

    def reseed(self, seed: int) -> None:
        # One generator shared by all steps of a Compose: Compose(seed=...) would give every step its own copy
        # of the same stream, so that e.g. the flip and the colour jitter draw the same numbers.
        for i, compose in enumerate((self.target, self.reference), start=1):
            compose.set_random_state(np.random.default_rng([seed, i]), random.Random(f"{seed}/{i}"))
        self._rng = np.random.default_rng([seed, 0])

    def __call__(self, s: dict) -> dict:
        noun = s["meta"].get("noun") or s["meta"]["class"]  # the word in the caption (a synonym or plural)
        caption = insert_identifier(s["caption"], noun, self.identifier)
        if caption is None:
            raise BadSample(f"{s['__key__']}: class noun '{noun}' not in caption")
        if self.train and self._rng is None:
            self.reseed(self.seed)
        rng = self._rng if self.train else None
        if self.train:  # a random crop of the object, heavily augmented
            obj = mask_crop(s["image"], s["mask"], self.augment.fill, self.augment.bbox_jitter, rng)
            ref = self.reference(image=obj)["image"]
        else:  # what inference gets (ib.data.references)
            ref = reference_crop(s["image"], s["mask"], self.reference_size, self.augment.fill)
        to_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))  # a CHW uint8 copy
        out = {}
        moments = s.get("latent_moments")
        if moments is None:
            tgt = self.target(image=s["image"], mask=s["mask"].astype(np.uint8))
            flip = any(name == "HorizontalFlip" for name, _ in tgt["applied_transforms"])
        else:  # latents fix the crop; the flip picks the mirrored moments
            tgt = self.fixed_target(image=s["image"], mask=s["mask"].astype(np.uint8))
            flip = bool(self.train and rng.random() < 0.5)
            if flip:
                tgt = {**tgt, "image": tgt["image"][:, ::-1], "mask": tgt["mask"][:, ::-1]}
            out["latent_moments"] = torch.from_numpy(np.ascontiguousarray(moments[int(flip)]))
        out["crop"] = torch.tensor(crop_geometry(s["image"].shape, tgt["applied_transforms"], flip))
        out.update({"image": to_tensor(tgt["image"]), "mask": torch.from_numpy(np.ascontiguousarray(tgt["mask"]) > 0)[None],
                    "refs": to_tensor(ref)[None], "caption": caption,
                    "concept": str(s["meta"].get("concept", s["__key__"])), "key": s["__key__"]})
        return out


def batch_to_float(batch: dict) -> dict:
    """uint8 image and refs -> float in [0, 1]. The loader ships uint8 (4x less to stack, to pass between
    processes and to copy to the device) and Lightning calls this on the device, after the transfer."""
    for name in ("image", "refs"):
        if batch[name].dtype == torch.uint8:
            batch[name] = batch[name].float().div_(255)
    return batch


class InstantBoothDataModule(L.LightningDataModule):
    """
    train_shards / val_shards: a folder of .tar shards, a glob, a brace pattern or one .tar file.
    batches_per_epoch: an "epoch" is this many batches per rank (rounded up to a multiple of
        loader.num_workers), whatever the shards hold: keeps DDP ranks in step.
    resampled: training draws shards with replacement on every rank and worker (true), or splits the shards
        by rank and worker and reads each share pass after pass (false). See ib/data/streams.py.
    val_batches: validation batches per rank; null = each rank's share of the whole validation set.
    max_consecutive_bad: this many unusable samples (or empty shards) in a row stop training with an error;
        a data set with nothing good in it would otherwise be read forever.

    Its checkpoint state is where every rank's and worker's training stream stands, so a resumed run
    continues the stream instead of replaying it (ib/data/streams.py).
    """

    def __init__(self, train_shards: str, val_shards: str | None = None, image_size: PositiveInt = 64,
                 reference_size: PositiveInt = 64, batch_size: PositiveInt = 4, val_batch_size: PositiveInt | None = None,
                 batches_per_epoch: PositiveInt = 100, val_batches: PositiveInt | None = None, identifier: str = "sks",
                 resampled: bool = True, augment: ReferenceAugment = ReferenceAugment(),
                 loader: LoaderConfig = LoaderConfig(), max_consecutive_bad: PositiveInt = 1000):
        check_arguments(InstantBoothDataModule, locals(), "data.")
        super().__init__()
        self.max_consecutive_bad = max_consecutive_bad
        self.train_urls = resolve_shards(train_shards, "data.train_shards")
        self.val_urls = resolve_shards(val_shards, "data.val_shards") if val_shards else None
        self.image_size, self.reference_size = image_size, reference_size
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.batches_per_epoch, self.val_batches = batches_per_epoch, val_batches
        self.identifier, self.resampled = identifier, resampled
        # Dataclasses from the CLI, plain dicts from Python callers.
        self.augment = augment if isinstance(augment, ReferenceAugment) else ReferenceAugment(**(augment or {}))
        self.loader = loader if isinstance(loader, LoaderConfig) else LoaderConfig(**(loader or {}))
        self._val_samples: int | None = None
        self._delivered: dict = {"epoch": 0, "workers": {}}  # this rank's stream: {worker: (batches, samples)}
        self._resume: list[dict] | None = None  # every rank's, from a checkpoint

    def setup(self, stage: str) -> None:
        if self.trainer is not None:
            # Training's DataLoader workers share the rank's CPUs with its compute (ib/threads.py).
            workers = self.loader.num_workers if stage == "fit" else 0
            on_cpu = isinstance(self.trainer.accelerator, CPUAccelerator)
            n = set_compute_threads(self.trainer.num_devices, workers, on_cpu)
            if n is not None:
                rank_zero_info(f"torch threads per rank: {n} ({available_cpus()} CPUs, {self.trainer.num_devices} "
                               f"rank(s) here, {workers} DataLoader worker(s) each); OMP_NUM_THREADS overrides")

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        rank, world, _, _ = wds.utils.pytorch_worker_info()  # env RANK/WORLD_SIZE or torch.distributed
        return rank, world

    def _transform(self, train: bool) -> SampleTransform:
        return SampleTransform(self.image_size, self.reference_size, self.identifier, self.augment, train,
                               self.loader.seed)

    def _loader(self, dataset, workers: int) -> torch.utils.data.DataLoader:
        extra = {}
        if workers:
            extra = {"prefetch_factor": self.loader.prefetch_factor, "persistent_workers": True,
                     "worker_init_fn": ignore_stop_signals}  # the main process stops them (ib/preemption.py)
            # OpenCV's thread pool does not survive fork: a forked worker that touches it can deadlock
            # (seen in cv2.setNumThreads). Serial OpenCV before forking; the workers are the parallelism.
            cv2.setNumThreads(0)
        # Its own generator: starting workers would otherwise draw from the global one, which a resumed
        # run restores, and so shift training's noise and timesteps.
        return WorkerSignalsLoader(dataset, batch_size=None, num_workers=workers,
                                   pin_memory=self.loader.pin_memory,
                                   generator=torch.Generator().manual_seed(self.loader.seed), **extra)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # Where the stream stands once this batch is trained on (read on the CPU: no device sync).
        if "stream" in batch and self.trainer is not None and self.trainer.training:
            epoch, worker, batches, samples = batch["stream"].tolist()
            if epoch != self._delivered["epoch"]:
                self._delivered = {"epoch": epoch, "workers": {}}
            self._delivered["workers"][worker] = (batches, samples)
        return batch

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        return batch_to_float(batch)

    def state_dict(self) -> dict:
        # Called on every rank when a checkpoint is made; rank 0 writes it, so it holds every rank's.
        mine = {"epoch": self._delivered["epoch"], "num_workers": self.loader.num_workers,
                "workers": {int(w): list(p) for w, p in self._delivered["workers"].items()}}
        return {"per_rank": gather_from_ranks(mine)}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume = state_dict.get("per_rank")

    def _resume_point(self, epoch: int, rank: int, world: int) -> tuple[int, dict[int, tuple[int, int]] | None]:
        """(the stream's epoch to start at, {worker: (batches, samples)} this rank had delivered in it) from
        the checkpoint; (epoch, None) for a fresh epoch."""
        saved, self._resume = self._resume, None
        if not saved:
            return epoch, None
        if len(saved) != world or saved[rank]["num_workers"] != self.loader.num_workers:
            rank_zero_warn(f"the checkpoint's data stream was read by {len(saved)} ranks x "
                           f"{saved[0]['num_workers']} workers, this run has {world} x {self.loader.num_workers}: "
                           f"epoch {epoch} starts afresh and samples of it may repeat")
            return epoch, None
        mine = saved[rank]
        delivered = {int(w): tuple(p) for w, p in mine["workers"].items()}
        if mine["epoch"] >= epoch:
            return epoch, delivered if mine["epoch"] == epoch else None
        # Lightning is ahead of the stream: a run that ended at max_steps inside an epoch has that epoch counted
        # as done. The stream goes on from its own count and finishes it first (its epochs then run behind
        # Lightning's count, and the data is what one uninterrupted run reads).
        if self._epoch_complete(delivered):
            return mine["epoch"] + 1, None
        return mine["epoch"], delivered

    def _epoch_complete(self, delivered: dict[int, tuple[int, int]]) -> bool:
        workers = max(1, self.loader.num_workers)
        per_worker = -(-self.batches_per_epoch // workers)
        return len(delivered) == workers and all(batches >= per_worker for batches, _ in delivered.values())

    def held_out_concepts(self, count: int, per_concept: int, size: int) -> list[HeldOutConcept]:
        """The first validation concepts with references at `size` (IdentityEval's; ib.data.concepts)."""
        if not self.val_urls:
            raise ConfigError("data.val_shards: not set; held-out concepts come from the validation shards")
        return read_held_out_concepts(self.val_urls, count, per_concept, size, self.augment.fill)

    def train_dataloader(self):
        workers = self.loader.num_workers
        rank, world = self._rank_world()
        epoch, resume = self._resume_point(self.trainer.current_epoch if self.trainer is not None else 0, rank, world)
        self._delivered = {"epoch": epoch, "workers": dict(resume or {})}
        ds = TrainStream(self.train_urls, decode_sample, self._transform(train=True), batch_size=self.batch_size,
                         batches_per_worker=-(-self.batches_per_epoch // max(1, workers)),  # as _epoch_complete
                         resampled=self.resampled, rank=rank, world=world, workers=workers,
                         seed=self.loader.seed, shuffle_buffer=self.loader.shuffle_buffer,
                         max_consecutive_bad=self.max_consecutive_bad, first_epoch=epoch, resume=resume)
        return self._loader(ds, workers)

    def val_dataloader(self):
        if not self.val_urls:
            return []
        rank, world = self._rank_world()
        if self._val_samples is None and (world > 1 or not self.val_batches):
            self._val_samples = count_samples(self.val_urls)
            if self._val_samples < world:  # a rank with nothing to validate would leave the others waiting
                raise ConfigError(f"data.val_shards: {self._val_samples} samples cannot be shared by {world} ranks")
        batches = self.val_batches or val_batches_per_rank(self._val_samples, world, self.val_batch_size)
        ds = val_stream(self.val_urls, decode_sample, self._transform(train=False), batch_size=self.val_batch_size,
                        batches=batches, rank=rank, world=world)
        return self._loader(ds, 0)

"""WebDataset streams for training and validation: which rank and worker reads what, in which order.

Training, resampled (default): every (rank, worker) draws shards with replacement from the whole list,
    seeded by (seed, rank, worker, pass): a different stream on every rank and worker, reproducible.
    Nothing to split: the draws are independent. Suits any number of shards, ranks and workers.
Training, not resampled: the shard list is split by rank, then by worker, so every (rank, worker) owns a
    disjoint set of shards; it reads them in a freshly shuffled order each pass, pass after pass.
    Needs at least ranks x workers shards.
Both cut an epoch at a fixed number of batches per worker, so every DDP rank runs the same number of
steps however unequal the shards are.

Validation: every rank reads all shards in order and keeps the samples i = rank (mod world) - a fixed,
    disjoint share that works with fewer shards than ranks. Every rank runs the same number of batches
    (DDP validation would hang otherwise); a rank whose share is shorter wraps around to its first samples,
    as torch's DistributedSampler pads.

Bad samples are skipped (a warning) and counted per process; each batch carries the count since the
previous batch as `skipped`, so counts made inside DataLoader workers reach the training step.
"""
import itertools
import logging
import math
import random
from functools import partial

import torch
import webdataset as wds

from ib.data.shards import BadSample, read_tar_samples
from ib.errors import ConfigError

log = logging.getLogger(__name__)


def worker_id() -> int:
    return wds.utils.pytorch_worker_info()[2]  # the DataLoader worker (or env WORKER), 0 in the main process


class SkipCounter:
    """Skips bad samples and counts them. Each DataLoader worker holds its own copy (pickled or forked)."""

    def __init__(self):
        self.pending = 0

    def skip(self, exn: Exception) -> bool:
        """webdataset handler: warn, count, continue."""
        self.pending += 1
        if isinstance(exn, BadSample):
            log.warning("skipping sample: %s", exn)
        else:  # not a known kind of bad data: say what broke
            log.warning("skipping sample: %s: %s", type(exn).__name__, exn)
        return True

    def attach(self, batch: dict) -> dict:
        batch["skipped"] = torch.tensor(self.pending)
        self.pending = 0
        return batch


class SplitByRank:
    """Every world-th item starting at rank (shards for training, samples for validation)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def __call__(self, src):
        return itertools.islice(src, self.rank, None, self.world)


class StreamSeed:
    """Seed source for wds.ResampledShards: distinct per (rank, worker)."""

    def __init__(self, rank: int):
        self.rank = rank

    def __call__(self) -> int:
        return wds.utils.make_seed(self.rank, worker_id())


class SeededShuffle(wds.PipelineStage):
    """Buffer shuffle seeded by (seed, rank, worker, pass): reproducible, different on every stream."""

    def __init__(self, bufsize: int, seed: int, rank: int):
        self.bufsize, self.seed, self.rank, self.passes = bufsize, seed, rank, 0

    def run(self, src):
        self.passes += 1
        rng = random.Random(wds.utils.make_seed(self.seed, self.rank, worker_id(), self.passes))
        return wds.filters.shuffle(self.bufsize, initial=self.bufsize, rng=rng)(src)


def _samples_to_batches(counter: SkipCounter, decode, transform, batch_size: int, partial_batches: bool):
    return [wds.map(decode, handler=counter.skip), wds.map(transform, handler=counter.skip),
            wds.batched(batch_size, partial=partial_batches), wds.map(counter.attach)]


def train_stream(urls: list[str], decode, transform, *, batch_size: int, batches_per_worker: int,
                 resampled: bool, rank: int, world: int, workers: int, seed: int,
                 shuffle_buffer: int) -> wds.DataPipeline:
    counter = SkipCounter()
    if resampled:
        shards = [wds.ResampledShards(urls, seed=seed, worker_seed=StreamSeed(rank), deterministic=True)]
    else:
        if len(urls) < world * max(1, workers):
            raise ConfigError(f"data.train_shards: {len(urls)} shards cannot be split over {world} ranks x "
                              f"{max(1, workers)} workers; use more shards or data.resampled: true")
        shards = [wds.SimpleShardList(urls), SplitByRank(rank, world), wds.split_by_worker,
                  SeededShuffle(len(urls), seed, rank)]
    sample_shuffle = [SeededShuffle(shuffle_buffer, seed, rank)] if shuffle_buffer > 1 else []
    return wds.DataPipeline(
        *shards, partial(read_tar_samples, on_error=counter.skip), *sample_shuffle,
        *_samples_to_batches(counter, decode, transform, batch_size, partial_batches=False),
    ).with_epoch(nbatches=batches_per_worker)


def val_batches_per_rank(samples: int, world: int, batch_size: int) -> int:
    """Batches every rank runs to see the whole validation set: its largest share, batched."""
    largest_share = math.ceil(samples / world)
    return math.ceil(largest_share / batch_size)


def val_stream(urls: list[str], decode, transform, *, batch_size: int, batches: int, rank: int,
               world: int) -> wds.DataPipeline:
    counter = SkipCounter()
    return wds.DataPipeline(
        wds.SimpleShardList(urls), partial(read_tar_samples, on_error=counter.skip), SplitByRank(rank, world),
        *_samples_to_batches(counter, decode, transform, batch_size, partial_batches=True),
    ).with_epoch(nbatches=batches)

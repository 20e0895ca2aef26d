"""WebDataset streams for training and validation: which rank and worker reads what, in which order.

Training (`TrainStream`) is a function of (loader seed, epoch, rank, worker) and nothing else: epoch e of a
resumed run is epoch e of an uninterrupted one, and a run resumed inside an epoch skips exactly what its
workers had delivered (the positions come from the checkpoint; see InstantBoothDataModule.state_dict).
The augmentations draw from generators that run on from sample to sample, so a resumed worker re-runs the
transforms of what it had delivered (and throws the results away) to bring them to the same state.
Exact as long as the shards, ranks, workers, batch size and seed stay the same.
  resampled (default): every (rank, worker) draws shards with replacement from the whole list. Suits any
    number of shards, ranks and workers.
  not resampled: the shard list is split by rank, then by worker, so every (rank, worker) owns a disjoint
    set of shards; it reads them in a freshly shuffled order each pass, pass after pass. Needs at least
    ranks x workers shards.
Both cut an epoch at a fixed number of batches per worker, so every DDP rank runs the same number of
steps however unequal the shards are.

Validation: every rank reads all shards in order and keeps the samples i = rank (mod world) - a fixed,
    disjoint share that works with fewer shards than ranks. Every rank runs the same number of batches
    (DDP validation would hang otherwise); a rank whose share is shorter wraps around to its first samples,
    as torch's DistributedSampler pads.

Bad samples are skipped (a warning) and counted per process; each batch carries the count since the
previous batch as `skipped`, so counts made inside DataLoader workers reach the training step. A stream
that meets `max_consecutive_bad` bad samples (or empty shards) in a row stops with a ConfigError: a data
set with nothing usable in it would otherwise be read forever.
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
    """Skips bad samples and counts them; too many in a row stop the stream. One per stream and process."""

    def __init__(self, field_name: str, max_consecutive: int | None = None):
        self.field_name, self.max_consecutive = field_name, max_consecutive
        self.pending = 0      # since the last batch
        self.consecutive = 0  # since the last good sample

    def skip(self, exn: Exception) -> bool:
        """webdataset handler: warn, count, continue."""
        self.pending += 1
        self.consecutive += 1
        if isinstance(exn, BadSample):
            log.warning("skipping sample: %s", exn)
        else:  # not a known kind of bad data: say what broke
            log.warning("skipping sample: %s: %s", type(exn).__name__, exn)
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise ConfigError(f"{self.field_name}: {self.consecutive} bad samples in a row, nothing to train on "
                              f"(data.max_consecutive_bad); last: {exn}")
        return True

    def good(self, sample):
        self.consecutive = 0
        return sample

    def attach(self, batch: dict) -> dict:
        batch["skipped"] = torch.tensor(self.pending)
        self.pending = 0
        return batch


class SplitByRank:
    """Every world-th item starting at rank (samples for validation)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def __call__(self, src):
        return itertools.islice(src, self.rank, None, self.world)


class TrainStream(torch.utils.data.IterableDataset):
    """Training batches, one epoch of `batches_per_worker` per __iter__ in every worker.

    first_epoch: the epoch the first __iter__ is (each DataLoader worker keeps its own copy and counts on).
    resume: {worker: (batches, samples)} already delivered in first_epoch, from a checkpoint.
    Each batch carries `stream` = (epoch, worker, batches delivered, raw samples read) for the checkpoint.
    A "worker" here is a stream: the DataLoader takes batches from its worker processes in turn, starting
    with process 0, so a resumed epoch hands process 0 the stream whose turn was next.
    """

    def __init__(self, urls: list[str], decode, transform, *, batch_size: int, batches_per_worker: int,
                 resampled: bool, rank: int, world: int, workers: int, seed: int, shuffle_buffer: int,
                 max_consecutive_bad: int | None = None, first_epoch: int = 0,
                 resume: dict[int, tuple[int, int]] | None = None):
        if not resampled and len(urls) < world * max(1, workers):
            raise ConfigError(f"data.train_shards: {len(urls)} shards cannot be split over {world} ranks x "
                              f"{max(1, workers)} workers; use more shards or data.resampled: true")
        self.urls, self.decode, self.transform = urls, decode, transform
        self.batch_size, self.batches_per_worker = batch_size, batches_per_worker
        self.resampled, self.rank, self.world, self.workers = resampled, rank, world, max(1, workers)
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.first_epoch, self.resume, self.epochs_started = first_epoch, resume or {}, 0
        self.next_turn = sum(batches for batches, _ in self.resume.values()) % self.workers
        # One per process (each worker has its own copy), across epochs: skips after an epoch's last batch
        # are reported with the next epoch's first.
        self.counter = SkipCounter("data.train_shards", max_consecutive_bad)

    def __iter__(self):
        epoch = self.first_epoch + self.epochs_started
        self.epochs_started += 1
        worker = worker_id()
        if epoch == self.first_epoch:
            worker = (worker + self.next_turn) % self.workers
        delivered, read = self.resume.get(worker, (0, 0)) if epoch == self.first_epoch else (0, 0)
        seed = wds.utils.make_seed(self.seed, epoch, self.rank, worker)
        self.transform.reseed(seed)
        counter, position = self.counter, read

        def examples():
            nonlocal position
            for index, raw in enumerate(self._raw_samples(seed, worker, counter)):
                replay = index < read  # delivered before the checkpoint: re-run for the augmentations' state
                try:
                    example = self.transform(self.decode(raw))
                except ConfigError:
                    raise
                except Exception as e:  # noqa: BLE001 — any broken sample is skipped and counted
                    if not replay:
                        position = index + 1
                        counter.skip(e)
                    continue
                if not replay:
                    position = index + 1
                    yield counter.good(example)

        # Batched here, not with wds.batched: that reads the next batch's first sample before it yields, and
        # `position` must end at this batch's last one.
        examples, batch, n = examples(), [], delivered
        while n < self.batches_per_worker:
            batch.append(next(examples))
            if len(batch) == self.batch_size:
                n += 1
                out = wds.filters.default_collation_fn(batch)
                out["stream"] = torch.tensor([epoch, worker, n, position])
                yield counter.attach(out)
                batch = []

    def _raw_samples(self, seed: int, worker: int, counter: SkipCounter):
        """Endless raw samples of this (rank, worker, epoch): shards drawn or passes over its own shards."""
        for shards, shuffle_seed in self._shards(seed, worker):
            samples = self._read(shards, counter)
            if self.shuffle_buffer > 1:
                samples = wds.filters.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer,
                                              rng=random.Random(shuffle_seed))(samples)
            yield from samples

    def _shards(self, seed: int, worker: int):
        if self.resampled:  # one endless pass of shards drawn with replacement
            rng = random.Random(seed)
            yield (rng.choice(self.urls) for _ in itertools.count()), wds.utils.make_seed(seed, 1)
            return
        own = self.urls[self.rank::self.world][worker::self.workers]
        for n in itertools.count():
            order = list(own)
            random.Random(wds.utils.make_seed(seed, n)).shuffle(order)
            yield order, wds.utils.make_seed(seed, n, 1)

    @staticmethod
    def _read(shards, counter: SkipCounter):
        """Samples of the shards in turn; a shard with none in it counts as a bad sample (or every shard
        of a data set of empty shards would be read forever)."""
        for url in shards:
            before, found = counter.consecutive, False
            for sample in read_tar_samples([{"url": url}], on_error=counter.skip):
                found = True
                yield sample
            if not found and counter.consecutive == before:  # no error was reported for it either
                counter.skip(BadSample(f"{url}: no samples in shard"))


def val_batches_per_rank(samples: int, world: int, batch_size: int) -> int:
    """Batches every rank runs to see the whole validation set: its largest share, batched."""
    largest_share = math.ceil(samples / world)
    return math.ceil(largest_share / batch_size)


def val_stream(urls: list[str], decode, transform, *, batch_size: int, batches: int, rank: int,
               world: int) -> wds.DataPipeline:
    counter = SkipCounter("data.val_shards")
    return wds.DataPipeline(
        wds.SimpleShardList(urls), partial(read_tar_samples, on_error=counter.skip), SplitByRank(rank, world),
        wds.map(decode, handler=counter.skip), wds.map(transform, handler=counter.skip),
        wds.batched(batch_size, partial=True), wds.map(counter.attach),
    ).with_epoch(nbatches=batches)

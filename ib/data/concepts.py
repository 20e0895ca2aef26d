"""Held-out concepts read whole from validation shards: their references and the full images to compare with."""
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds

from ib.data.references import prepare_references
from ib.data.shards import BadSample, decode_sample
from ib.data.transforms import ReferenceAugment
from ib.errors import ConfigError


@dataclass
class HeldOutConcept:
    name: str
    class_noun: str
    refs: torch.Tensor   # (N, 3, S, S) in [0, 1]: the masked object crops the model is given
    reals: torch.Tensor  # (N, 3, H, W) uint8: the full images the metrics compare with
    object_pixels: torch.Tensor  # (P, 3) uint8: the object's pixels in those images (under their masks)


def _chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image.copy()).permute(2, 0, 1)


def read_held_out_concepts(urls: list[str], count: int, per_concept: int, size: int,
                           fill: int = ReferenceAugment.fill, field: str = "data.val_shards") -> list[HeldOutConcept]:
    """The first `count` concepts of the shards (all of them when they hold fewer), `per_concept` samples each,
    references at `size`. Every rank reads the same concepts (no node splitting); shards are read in order and
    only as far as needed."""
    groups: dict[str, list[dict]] = {}
    for raw in wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None,
                              empty_check=False, handler=wds.warn_and_continue):
        try:
            s = decode_sample(raw)
        except BadSample:
            continue  # the training stream already warns about these
        groups.setdefault(str(s["meta"].get("concept", s["__key__"])), []).append(s)
        first = list(groups.values())[:count]
        if len(first) == count and all(len(g) >= per_concept for g in first):
            break
    if not groups:
        raise ConfigError(f"{field}: held-out concepts asked, the shards hold none")
    concepts = []
    for name, samples in list(groups.items())[:count]:
        samples = samples[:per_concept]
        refs = prepare_references([s["image"] for s in samples], [s["mask"] for s in samples], size=size,
                                  fill=fill, field=field)
        concepts.append(HeldOutConcept(name, samples[0]["meta"]["class"], refs,
                                       torch.stack([_chw(s["image"]) for s in samples]),
                                       torch.from_numpy(np.concatenate([s["image"][s["mask"]] for s in samples]))))
    return concepts

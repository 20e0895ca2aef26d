"""Shard lists from a folder, a glob or a brace pattern; reading tar shards into samples; decoding one sample."""
import glob
import io
import json
import tarfile
from pathlib import Path

import braceexpand
import numpy as np
import webdataset as wds

from ib.data.images import read_image
from ib.data.masks import MaskError, load_mask
from ib.errors import ConfigError


class BadSample(ValueError):
    """A sample that cannot be used; the pipeline skips and counts it."""


def resolve_shards(spec: str, field_name: str) -> list[str]:
    """'dir/' (every .tar inside), 'dir/*.tar' or 'dir/shard-{000000..000009}.tar' -> existing shard paths."""
    path = Path(spec).expanduser()
    if path.is_dir():
        urls = sorted(str(p) for p in path.glob("*.tar"))
    elif any(c in spec for c in "*?["):
        urls = sorted(glob.glob(str(path)))
    elif "{" not in spec:
        if path.is_file():
            return [str(path)]
        raise ConfigError(f"{field_name}: not found: {spec}")
    else:
        urls = list(braceexpand.braceexpand(str(path)))
        missing = [u for u in urls if not Path(u).is_file()]
        if missing:
            raise ConfigError(f"{field_name}: shard not found: {missing[0]}")
    if not urls:
        raise ConfigError(f"{field_name}: no shards found at {spec}")
    return urls


def read_tar_samples(src, on_error):
    """Pipeline stage: {"url": ...} items -> raw samples {"__key__", "__url__", ext: bytes, ...}.

    Members are grouped by key the way webdataset groups them. A shard that ends early or has a broken
    header reports ONE error to `on_error` (the sample being read is dropped, nothing after it exists) and
    the stream goes on with the next shard. webdataset's own reader reports such a shard once or twice
    depending on where the cut falls, which would make skip counts depend on byte offsets.
    """
    for item in src:
        url, key, sample = item["url"], None, {}
        try:
            with wds.gopen(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    if not member.isreg() or Path(member.name).name.startswith("__"):
                        continue
                    prefix, ext = wds.tariterators.base_plus_ext(member.name)
                    if prefix is None:
                        continue
                    if prefix != key:
                        if sample:
                            yield sample
                        key, sample = prefix, {"__key__": prefix, "__url__": url}
                    sample[ext.lower()] = tar.extractfile(member).read()
            if sample:
                yield sample
        except (tarfile.TarError, OSError) as e:
            on_error(BadSample(f"{url}: unreadable after '{key}': {e}"))


def count_samples(urls: list[str]) -> int:
    """Samples in local shards, from the tar headers only; a damaged shard counts up to the damage."""
    keys = 0
    for url in urls:
        seen = set()
        try:
            with tarfile.open(url) as tar:
                for member in tar:
                    seen.add(wds.tariterators.base_plus_ext(member.name)[0])
        except (tarfile.TarError, OSError):
            pass
        keys += len(seen - {None})
    return keys


def decode_sample(sample: dict) -> dict:
    """Raw tar members -> image (H, W, 3) uint8, mask (H, W) bool, caption, metadata. Raises BadSample."""
    key = sample.get("__key__", "?")
    for field in ("jpg", "png", "txt", "json"):
        if field not in sample:
            raise BadSample(f"{key}: missing '{field}'")
    try:
        image = read_image(sample["jpg"])
        meta = json.loads(sample["json"])
        caption = sample["txt"].decode("utf-8").strip()
    except Exception as e:  # undecodable bytes of any kind (ImageError included), truncated images too
        raise BadSample(f"{key}: cannot decode: {e}") from e
    try:
        mask = load_mask(sample["png"], image.shape[:2])
    except MaskError as e:
        raise BadSample(f"{key}: {e}") from e
    if not mask.any():
        raise BadSample(f"{key}: empty mask")
    if not caption:
        raise BadSample(f"{key}: empty caption")
    if not isinstance(meta, dict) or not meta.get("class"):
        raise BadSample(f"{key}: metadata has no class noun")
    out = {"__key__": key, "image": image, "mask": mask, "caption": caption, "meta": meta}
    if LATENTS_MEMBER in sample:
        out["latent_moments"] = decode_latent_moments(key, sample[LATENTS_MEMBER])
    return out


LATENTS_MEMBER = "latents.npy"  # optional, written by data_tools.encode_latents


def decode_latent_moments(key: str, data: bytes) -> np.ndarray:
    """-> (2, 2C, h, w) float16: VAE posterior (mean, logvar) of the centre-cropped target and of its mirror."""
    try:
        moments = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # noqa: BLE001 — any unreadable bytes
        raise BadSample(f"{key}: cannot decode {LATENTS_MEMBER}: {e}") from e
    if moments.ndim != 4 or moments.shape[0] != 2 or moments.shape[1] % 2 or not np.isfinite(moments).all():
        raise BadSample(f"{key}: {LATENTS_MEMBER} is not finite (2, 2C, h, w) moments: shape {moments.shape}")
    return moments

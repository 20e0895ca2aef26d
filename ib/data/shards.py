"""Shard lists from a folder, a glob or a brace pattern; decoding and validating one sample."""
import glob
import io
import json
from pathlib import Path

import braceexpand
import numpy as np
from PIL import Image

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
        raise ConfigError(f"{field_name}: not found: {spec}")
    else:
        urls = list(braceexpand.braceexpand(str(path)))
        missing = [u for u in urls if not Path(u).is_file()]
        if missing:
            raise ConfigError(f"{field_name}: shard not found: {missing[0]}")
    if not urls:
        raise ConfigError(f"{field_name}: no shards found at {spec}")
    return urls


def decode_sample(sample: dict) -> dict:
    """Raw tar members -> image (H, W, 3) uint8, mask (H, W) bool, caption, metadata. Raises BadSample."""
    key = sample.get("__key__", "?")
    for field in ("jpg", "png", "txt", "json"):
        if field not in sample:
            raise BadSample(f"{key}: missing '{field}'")
    try:
        image = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
        mask = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("L")) > 127
        meta = json.loads(sample["json"])
        caption = sample["txt"].decode("utf-8").strip()
    except Exception as e:  # undecodable bytes of any kind
        raise BadSample(f"{key}: cannot decode: {e}") from e
    if mask.shape != image.shape[:2]:
        raise BadSample(f"{key}: mask {mask.shape} does not match image {image.shape[:2]}")
    if not mask.any():
        raise BadSample(f"{key}: empty mask")
    if not caption:
        raise BadSample(f"{key}: empty caption")
    if not meta.get("class"):
        raise BadSample(f"{key}: metadata has no class noun")
    return {"__key__": key, "image": image, "mask": mask, "caption": caption, "meta": meta}

"""The synthetic object world: concepts (shape + texture + colours) in several images each, with masks.

Identity lives in the pixels only: captions name the class noun and the context, never the colours or the
texture, so a model can only get a concept's look from its reference images. Train and validation are
split by concept. Output (WebDataset shards, schema in docs/data.md):

    OUTPUT/train/shard-000000.tar ...   OUTPUT/val/shard-000000.tar ...   OUTPUT/manifest.json

The folder appears only when complete (built in a temporary sibling, then renamed); re-running with the
same settings does nothing.
"""
import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from ib.atomic_write import atomic_folder

SHAPES = {"ball": "circle", "box": "square", "kite": "diamond", "star": "star", "ring": "ring", "tent": "triangle"}
TEXTURES = ("solid", "stripes", "dots", "checker", "split")
COLOURS = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (240, 220, 40), "green": (40, 170, 60),
    "cyan": (40, 200, 210), "blue": (40, 70, 220), "purple": (140, 50, 190), "pink": (240, 120, 190),
    "white": (245, 245, 245), "black": (25, 25, 25), "brown": (130, 80, 40), "grey": (128, 128, 128),
}
CONTEXTS = {  # phrase -> background colour
    "on the grass": (70, 140, 60), "on the beach": (225, 200, 150), "in the snow": (235, 240, 245),
    "at night": (20, 25, 60), "on a wooden table": (150, 100, 60), "under a blue sky": (120, 170, 235),
    "on the road": (90, 90, 95), "in a red room": (160, 50, 50),
}
TEXTURE_WORDS = {"solid": "", "stripes": "striped", "dots": "dotted", "checker": "checkered", "split": "two-tone"}
TEMPLATES = ("a photo of a {noun} {context}", "a {noun} {context}", "a picture of a {noun} {context}",
             "a close-up photo of a {noun} {context}")


def concept_spec(rng: np.random.Generator, index: int) -> dict:
    noun = list(SHAPES)[index % len(SHAPES)]
    c1, c2 = rng.choice(list(COLOURS), size=2, replace=False)
    return {"concept": f"{noun}_{index:03d}", "class": noun, "shape": SHAPES[noun],
            "texture": str(rng.choice(TEXTURES)), "colours": [str(c1), str(c2)],
            "frequency": float(rng.uniform(2.5, 5.0)), "angle": float(rng.uniform(0, np.pi))}


def describe(spec: dict) -> str:
    """A concept's look in words, 'pink and black striped' ('pink' when solid). Captions never hold it; the toy
    base reads it in a share of its captions (so that, like a real base, it can draw a look it is told)."""
    if spec["texture"] == "solid":
        return spec["colours"][0]
    return f"{spec['colours'][0]} and {spec['colours'][1]} {TEXTURE_WORDS[spec['texture']]}"


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Object coordinates u, v in [-0.5, 0.5] -> inside mask."""
    r = np.hypot(u, v)
    if shape == "circle":
        return r < 0.5
    if shape == "square":
        return (np.abs(u) < 0.42) & (np.abs(v) < 0.42)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) < 0.5
    if shape == "ring":
        return (r < 0.5) & (r > 0.27)
    if shape == "triangle":
        return (v < 0.4) & (v > -0.45 + 2 * 0.85 * np.abs(u))
    theta = np.arctan2(v, u)  # star: five points
    return r < 0.3 + 0.2 * np.cos(5 * theta) ** 2


def texture(spec: dict, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    c1, c2 = (np.array(COLOURS[c], dtype=np.float32) for c in spec["colours"])
    f, a = spec["frequency"], spec["angle"]
    kind = spec["texture"]
    if kind == "solid":
        second = np.zeros_like(u, dtype=bool)
    elif kind == "stripes":
        second = ((u * np.cos(a) + v * np.sin(a)) * f * 2) % 1 < 0.5
    elif kind == "dots":
        second = np.hypot((u * f * 1.5) % 1 - 0.5, (v * f * 1.5) % 1 - 0.5) < 0.3
    elif kind == "checker":
        second = (np.floor((u + 0.5) * f) + np.floor((v + 0.5) * f)) % 2 == 1
    else:  # split
        second = u * np.cos(a) + v * np.sin(a) > 0
    return np.where(second[..., None], c2, c1)


def render(spec: dict, rng: np.random.Generator, size: int, context: str) -> tuple[np.ndarray, np.ndarray]:
    """One image (size, size, 3) uint8 and its mask (size, size) bool; object area ≈ 0.12–0.5 of the frame."""
    ss = size * 2  # supersampled, then downsampled: smooth edges
    bg = np.array(CONTEXTS[context], dtype=np.float32)
    y, x = np.mgrid[0:ss, 0:ss].astype(np.float32) / ss
    image = bg + rng.normal(0, 8, (ss, ss, 3)) + 25 * (y[..., None] - 0.5) * rng.choice([-1, 1])
    side = rng.uniform(0.45, 0.8)
    cx, cy = rng.uniform(side / 2, 1 - side / 2, size=2)
    rot = rng.uniform(-0.4, 0.4)
    du, dv = (x - cx) / side, (y - cy) / side
    u, v = du * np.cos(rot) + dv * np.sin(rot), -du * np.sin(rot) + dv * np.cos(rot)
    inside = shape_mask(spec["shape"], u, v)
    shade = 1.0 + 0.15 * (-u - v)[..., None]  # a little light from the top-left
    image = np.where(inside[..., None], texture(spec, u, v) * shade, image)
    img = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    mask = Image.fromarray(inside.astype(np.uint8) * 255).resize((size, size), Image.BILINEAR)
    return np.asarray(img), np.asarray(mask) > 127


def encode(image: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **kw)
    return buf.getvalue()


def make_sample(spec: dict, j: int, rng: np.random.Generator, size: int) -> dict:
    context = str(rng.choice(list(CONTEXTS)))
    image, mask = render(spec, rng, size, context)
    ys, xs = np.nonzero(mask)
    caption = str(rng.choice(TEMPLATES)).format(noun=spec["class"], context=context)
    meta = {"class": spec["class"], "concept": spec["concept"], "context": context,
            "bbox": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
            "mask_area": float(mask.mean())}
    return {"__key__": f"{spec['concept']}_{j:02d}", "jpg": encode(image, "JPEG", quality=95),
            "png": encode(mask.astype(np.uint8) * 255, "PNG"), "txt": caption, "json": json.dumps(meta)}


def build(output: Path, concepts: int, val_concepts: int, images_per_concept: int, size: int,
          shard_size: int, seed: int) -> Path:
    settings = dict(concepts=concepts, val_concepts=val_concepts, images_per_concept=images_per_concept,
                    size=size, shard_size=shard_size, seed=seed)
    manifest = output / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("settings") == settings:
        print(f"synthetic world already at {output}")
        return output
    if output.exists() and not output.is_dir():
        raise SystemExit(f"error: --output is a file: {output}")
    with atomic_folder(output) as tmp:
        rng = np.random.default_rng(seed)
        specs = [concept_spec(rng, i) for i in range(concepts + val_concepts)]
        splits = {"train": specs[:concepts], "val": specs[concepts:]}
        counts = {}
        with tqdm(total=len(specs) * images_per_concept, desc="synthetic world", unit="img") as bar:
            for split, split_specs in splits.items():
                (tmp / split).mkdir()
                with wds.ShardWriter(str(tmp / split / "shard-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
                    for spec in split_specs:
                        for j in range(images_per_concept):
                            sink.write(make_sample(spec, j, rng, size))
                            bar.update()
                counts[split] = len(split_specs) * images_per_concept
        (tmp / "concepts.json").write_text(json.dumps(specs, indent=1))
        (tmp / "manifest.json").write_text(json.dumps({"settings": settings, "samples": counts}, indent=1))
    print(f"synthetic world: {counts} samples at {output}")
    return output


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", type=Path, required=True)
    # The defaults are the embedded default's world, the one assets/toy-base was trained on (its train split).
    p.add_argument("--concepts", type=int, default=480, help="training concepts")
    p.add_argument("--val-concepts", type=int, default=24, help="held-out concepts (never seen in training)")
    p.add_argument("--images-per-concept", type=int, default=8)
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--shard-size", type=int, default=200, help="samples per shard")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    for name in ("concepts", "val_concepts", "images_per_concept", "size", "shard_size"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    build(a.output, a.concepts, a.val_concepts, a.images_per_concept, a.size, a.shard_size, a.seed)


if __name__ == "__main__":
    sys.exit(main())

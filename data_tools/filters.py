"""One input item -> one training sample, or the reason it was dropped (the paper's data filters).

Kept: a readable image whose shorter side is at least `min_size`, a caption that names exactly one class of
the vocabulary, and a mask (provided or computed) holding exactly one object that covers `min_area` to
`max_area` of the frame. Connected parts smaller than `min_object` of the frame are specks: they are erased
from the mask and do not count as objects.
"""
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from data_tools.classes import ClassVocabulary
from data_tools.sources import Item
from ib.data.images import ORIENTATION, ImageError, read_image
from ib.data.masks import MaskError, get_mask_backend, load_mask, mask_bbox, split_objects

# Every reason a sample can be dropped for; report.json counts them.
DROP_REASONS = ("unreadable_shard", "unreadable_image", "too_small", "no_caption", "no_class_noun",
                "several_classes", "no_mask", "bad_mask", "mask_failed", "mask_too_small", "mask_too_large",
                "several_objects")


@dataclass
class FilterConfig:
    classes: dict[str, list[str]]                 # class -> synonyms (ClassVocabulary's input)
    mask_backend: str = "grabcut"                 # "provided", a registered backend, or module:factory
    mask_options: dict = field(default_factory=dict)
    min_area: float = 0.1
    max_area: float = 0.7
    min_object: float = 0.02
    min_size: int = 256
    max_side: int = 0                             # downscale so the long side is at most this; 0 keeps
    jpeg_quality: int = 95


class Dropped(Exception):
    def __init__(self, reason: str, detail: str = ""):
        assert reason in DROP_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _read(source: str | bytes) -> bytes:
    return Path(source).read_bytes() if isinstance(source, str) else source


def _read_caption(path: str | None) -> str:
    try:
        return Path(path).read_text(encoding="utf-8") if path else ""
    except (OSError, UnicodeDecodeError):
        return ""  # missing or unusable: dropped as having no caption


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A bool mask resized with its downscaled image: area-averaged, then thresholded at half (stays binary)."""
    if mask.shape == tuple(shape):
        return mask
    resized = cv2.resize(mask.astype(np.uint8) * 255, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
    return resized > 127


def _encode(array: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


class SampleBuilder:
    """Holds the vocabulary and the mask backend (built once per worker process)."""

    def __init__(self, cfg: FilterConfig):
        self.cfg = cfg
        self.vocabulary = ClassVocabulary(cfg.classes)
        self.backend = None if cfg.mask_backend == "provided" else get_mask_backend(cfg.mask_backend,
                                                                                    **cfg.mask_options)

    def _image(self, item: Item) -> tuple[np.ndarray, bytes | None, tuple[int, int]]:
        """(RGB pixels, downscaled to max_side; the original bytes when they can be stored unchanged;
        the (H, W) read, which a provided mask must have)."""
        try:
            data = _read(item.image)
            image = read_image(data)  # any bit depth and mode, EXIF rotation applied
        except (OSError, ImageError) as e:
            raise Dropped("unreadable_image", str(e)) from e
        with Image.open(io.BytesIO(data)) as pil:  # the header: can the bytes be stored as they are?
            rotated = pil.getexif().get(ORIENTATION, 1) != 1  # phones store rotation as a tag
            unchanged = not rotated and pil.format == "JPEG" and pil.mode == "RGB"
        read_shape = image.shape[:2]
        if min(read_shape) < self.cfg.min_size:
            raise Dropped("too_small", f"{read_shape[::-1]}")
        if self.cfg.max_side and max(read_shape) > self.cfg.max_side:
            scale = self.cfg.max_side / max(read_shape)
            size = (round(read_shape[1] * scale), round(read_shape[0] * scale))
            image = np.asarray(Image.fromarray(image).resize(size, Image.LANCZOS))
            unchanged = False
        return image, (data if unchanged else None), read_shape

    def _mask(self, item: Item, image: np.ndarray, read_shape: tuple[int, int], noun: str) -> np.ndarray:
        if self.backend is None:
            if item.mask is None:
                raise Dropped("no_mask")
            try:
                mask = load_mask(_read(item.mask), read_shape)
            except (OSError, MaskError) as e:
                raise Dropped("bad_mask", str(e)) from e
            return resize_mask(mask, image.shape[:2])
        try:
            mask = np.asarray(self.backend(image, prompt=noun), dtype=bool)
        except Exception as e:  # one odd image must not end a long build; the report counts it
            raise Dropped("mask_failed", f"{type(e).__name__}: {e}") from e
        if mask.shape != image.shape[:2]:
            raise Dropped("mask_failed", f"backend returned {mask.shape} for {image.shape[:2]}")
        return mask

    def build(self, item: Item) -> dict:
        """The sample (the schema of docs/data.md) or Dropped."""
        caption = " ".join((item.caption if item.caption is not None else _read_caption(item.caption_file)).split())
        if not caption:
            raise Dropped("no_caption")
        matches = self.vocabulary.find(caption)
        if not matches:
            raise Dropped("no_class_noun", caption)
        if len({m.cls for m in matches}) > 1:
            raise Dropped("several_classes", ", ".join(sorted({m.cls for m in matches})))
        image, original, read_shape = self._image(item)
        mask, objects = split_objects(self._mask(item, image, read_shape, matches[0].cls), self.cfg.min_object)
        area = float(mask.mean())
        if objects != 1 and area > 0:
            raise Dropped("several_objects", f"{objects}")
        if area < self.cfg.min_area:
            raise Dropped("mask_too_small", f"{area:.3f}")
        if area > self.cfg.max_area:
            raise Dropped("mask_too_large", f"{area:.3f}")
        meta = {"class": matches[0].cls, "noun": matches[0].noun, "concept": item.key, "bbox": mask_bbox(mask),
                "mask_area": round(area, 4), "mask_backend": self.cfg.mask_backend, "source": item.source,
                "width": image.shape[1], "height": image.shape[0]}
        jpg = original if original is not None else _encode(image, "JPEG", quality=self.cfg.jpeg_quality)
        return {"__key__": item.key, "jpg": jpg, "png": _encode(mask.astype(np.uint8) * 255, "PNG"),
                "txt": caption.encode("utf-8"), "json": json.dumps(meta).encode("utf-8")}


_builder: SampleBuilder | None = None


def init_worker(cfg: dict) -> None:
    """Pool initializer: one SampleBuilder (and mask backend) per worker process."""
    global _builder
    cv2.setNumThreads(1)  # the pool's processes are the parallelism
    _builder = SampleBuilder(FilterConfig(**cfg))


def process(item: Item) -> tuple[str, dict | None, str | None]:
    """(key, sample, None) or (key, None, drop reason)."""
    try:
        return item.key, _builder.build(item), None
    except Dropped as d:
        return item.key, None, d.reason

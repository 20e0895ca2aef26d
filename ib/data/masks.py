"""Object masks for images that come without one: a registry of mask backends, and provided masks.

A mask backend is a callable `backend(image, box=None, prompt=None) -> mask`:
    image  (H, W, 3) uint8 RGB;  box  optional [x0, y0, x1, y1] hint where the object is;
    prompt optional class noun ("dog") for text-prompted models;  mask  (H, W) bool, True = object.

Built in: `grabcut` (OpenCV, no weights) and `clipseg` (transformers CLIPSeg, needs a checkpoint folder or
hub id as `model=`; nothing is imported until it is asked for). Add your own with `@register_mask_backend`,
or name a factory by import path: `get_mask_backend("my_pkg.sam:make_backend", checkpoint=...)`.
Used by data_tools.build_shards and by anything that needs a mask for a reference photo.
"""
import importlib
import zlib
from typing import Callable, Protocol

import cv2
import numpy as np

from ib.data.images import ImageError, read_image


class MaskError(ValueError):
    """A mask that cannot be read, does not fit its image, or could not be computed."""


class MaskBackend(Protocol):
    def __call__(self, image: np.ndarray, box: list[int] | None = None,
                 prompt: str | None = None) -> np.ndarray: ...


_BACKENDS: dict[str, Callable[..., MaskBackend]] = {}


def register_mask_backend(name: str):
    """Decorator: make a backend factory `factory(**options) -> MaskBackend` available under `name`."""
    def add(factory):
        _BACKENDS[name] = factory
        return factory
    return add


def mask_backend_names() -> list[str]:
    return sorted(_BACKENDS)


def get_mask_backend(name: str, **options) -> MaskBackend:
    """A backend by registered name or by `module:factory` path; options go to its factory."""
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise MaskError(f"mask backend '{name}': cannot import: {e}") from e
    elif name in _BACKENDS:
        factory = _BACKENDS[name]
    else:
        raise MaskError(f"unknown mask backend '{name}' (known: {', '.join(mask_backend_names())}, "
                        f"or module:factory)")
    return factory(**options)


def load_mask(data: bytes, shape: tuple[int, int]) -> np.ndarray:
    """A provided mask (any image format PIL reads; at least half the full range = object: >127 of 8 bits,
    >=32768 of 16) -> (H, W) bool of the image's size."""
    try:
        mask = read_image(data, mode="L") > 127
    except ImageError as e:
        raise MaskError(f"cannot decode mask: {e}") from e
    if mask.shape != tuple(shape):
        raise MaskError(f"mask {mask.shape} does not match image {tuple(shape)}")
    return mask


def split_objects(mask: np.ndarray, min_fraction: float) -> tuple[np.ndarray, int]:
    """Drop connected specks smaller than min_fraction of the frame; return (cleaned mask, objects left)."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= min_fraction * mask.size]
    return np.isin(labels, keep), len(keep)


def mask_bbox(mask: np.ndarray) -> list[int]:
    """[x0, y0, x1, y1] (x1, y1 exclusive) of the True pixels."""
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


class GrabCut:
    """OpenCV GrabCut seeded from a box (default: the frame inset by `margin` on each side).

    Runs at `work_size` px on the long side (GrabCut's cost grows with pixels; masks are upscaled back).
    Reproducible: its k-means start draws from OpenCV's per-thread random state, which is seeded before each
    image from `seed` and the image's pixels, so a mask does not depend on which images the thread (or worker
    process) segmented before.
    """

    def __init__(self, margin: float = 0.05, iterations: int = 5, work_size: int = 256, seed: int = 0):
        if not 0 <= margin < 0.5:
            raise MaskError(f"grabcut margin must be in [0, 0.5), got {margin}")
        self.margin, self.iterations, self.work_size, self.seed = margin, iterations, work_size, seed

    def __call__(self, image: np.ndarray, box: list[int] | None = None, prompt: str | None = None) -> np.ndarray:
        h, w = image.shape[:2]
        scale = min(1.0, self.work_size / max(h, w))
        small = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))),
                           interpolation=cv2.INTER_AREA) if scale < 1 else image
        sh, sw = small.shape[:2]
        if box is None:
            x0, y0, x1, y1 = self.margin * sw, self.margin * sh, (1 - self.margin) * sw, (1 - self.margin) * sh
        else:
            x0, y0, x1, y1 = (v * scale for v in box)
        rect = (int(x0), int(y0), max(1, int(x1 - x0)), max(1, int(y1 - y0)))
        labels = np.zeros((sh, sw), np.uint8)
        models = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        pixels = np.ascontiguousarray(small).tobytes()
        cv2.setRNGSeed(zlib.crc32(pixels, self.seed & 0xFFFFFFFF) & 0x7FFFFFFF)  # it takes a C int
        try:
            cv2.grabCut(cv2.cvtColor(small, cv2.COLOR_RGB2BGR), labels, rect, *models, self.iterations,
                        cv2.GC_INIT_WITH_RECT)
        except cv2.error as e:
            raise MaskError(f"grabcut failed: {str(e).strip().splitlines()[-1]}") from e
        fg = np.isin(labels, (cv2.GC_FGD, cv2.GC_PR_FGD)).astype(np.uint8) * 255
        if scale < 1:
            fg = cv2.resize(fg, (w, h), interpolation=cv2.INTER_LINEAR)
        return fg > 127


class CLIPSeg:
    """Text-prompted masks from a CLIPSeg checkpoint (e.g. CIDAS/clipseg-rd64-refined, or a local copy).

    The prompt is the class noun; pixels whose probability exceeds `threshold` are the object.
    """

    def __init__(self, model: str | None = None, threshold: float = 0.4, device: str = "cpu"):
        if not model:
            raise MaskError("mask backend 'clipseg' needs a model: a CLIPSeg folder or hub id (--mask-model)")
        import torch
        from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor
        try:
            self.processor = CLIPSegProcessor.from_pretrained(model)
            self.model = CLIPSegForImageSegmentation.from_pretrained(model).to(device).eval()
        except (OSError, ValueError) as e:
            raise MaskError(f"mask backend 'clipseg': cannot load {model}: {str(e).splitlines()[0]}") from e
        self.torch, self.threshold, self.device = torch, threshold, device

    def __call__(self, image: np.ndarray, box: list[int] | None = None, prompt: str | None = None) -> np.ndarray:
        if not prompt:
            raise MaskError("clipseg needs a prompt (the class noun)")
        inputs = self.processor(text=[prompt], images=[image], return_tensors="pt", padding=True).to(self.device)
        with self.torch.no_grad():
            logits = self.model(**inputs).logits
        prob = self.torch.sigmoid(logits.reshape(-1, *logits.shape[-2:])[0]).float().cpu().numpy()
        prob = cv2.resize(prob, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
        return prob > self.threshold


register_mask_backend("grabcut")(GrabCut)
register_mask_backend("clipseg")(CLIPSeg)

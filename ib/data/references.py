"""The one reference builder: photos of a subject (+ masks) -> the image encoder's input, as validation makes it.

Used by training's validation data, the pipeline (`ib generate`, `ib evaluate`, the bench), IdentityEval and
the toy experiment: each reference is cropped to its mask's bounding box, the background filled, squared by
padding and resized to the encoder's size. Without a mask the whole photo is used.
"""
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ib.data.images import ImageError, read_image, to_uint8
from ib.data.masks import MaskError, get_mask_backend
from ib.data.transforms import ReferenceAugment, mask_crop, reference_transform
from ib.errors import ConfigError

ImageLike = str | Path | Image.Image | np.ndarray | torch.Tensor
MaskFn = Callable[[np.ndarray], np.ndarray]  # image (H, W, 3) uint8 -> object mask (H, W) bool


def to_pixels(item: ImageLike, mode: str, field: str) -> np.ndarray:
    """A path, PIL image, array ((H, W[, 3]) uint8 or float in [0, 1]) or tensor ((3, H, W) / (H, W), uint8 or
    float in [0, 1]) -> uint8 pixels, (H, W, 3) for mode "RGB" or (H, W) for "L"."""
    if isinstance(item, (str, Path)):
        try:
            return read_image(Path(item), mode)
        except ImageError as e:
            raise ConfigError(f"{field}: cannot read image {item}: {e}") from e
    if isinstance(item, Image.Image):
        try:
            return to_uint8(item, mode)
        except ImageError as e:
            raise ConfigError(f"{field}: {e}") from e
    if isinstance(item, torch.Tensor):
        item = item.detach().cpu()
        item = (item.permute(1, 2, 0) if item.ndim == 3 else item).numpy()
    if not isinstance(item, np.ndarray):
        raise ConfigError(f"{field}: expected a path, PIL image, array or tensor, got {type(item).__name__}")
    if item.dtype == bool:
        item = item.astype(np.uint8) * 255
    elif item.dtype != np.uint8:
        if not np.issubdtype(item.dtype, np.floating) or not np.isfinite(item).all() or item.min() < 0 or item.max() > 1:
            raise ConfigError(f"{field}: pixels must be uint8, or float in [0, 1]; got {item.dtype}")
        item = np.rint(item * 255).astype(np.uint8)
    channels = item.shape[2] if item.ndim == 3 else 1
    if item.ndim not in (2, 3) or channels not in (1, 3) or min(item.shape[:2]) < 1:
        raise ConfigError(f"{field}: expected (H, W), (H, W, 3) or (3, H, W) pixels, got shape {item.shape}")
    item = item[..., 0] if item.ndim == 3 and channels == 1 else item
    if mode == "L":
        return item if item.ndim == 2 else np.asarray(Image.fromarray(item).convert("L"))
    return item if item.ndim == 3 else np.repeat(item[..., None], 3, axis=2)


def reference_crop(image: np.ndarray, mask: np.ndarray | None, size: int, fill: int = ReferenceAugment.fill) -> np.ndarray:
    """One reference: (H, W, 3) uint8 + object mask (or None: the whole image) -> (size, size, 3) uint8."""
    if mask is not None:
        image = mask_crop(image, mask, fill, 0.0, None)
    return reference_transform(size, ReferenceAugment(fill=fill), train=False)(image=image)["image"]


class NoSubjectError(ConfigError):
    """A reference whose mask is empty, or that the mask backend could not mask."""


def prepare_references(images: Sequence[ImageLike], masks: Sequence[ImageLike] | str | MaskFn | None = None, *,
                       size: int, fill: int = ReferenceAugment.fill, field: str = "reference_images",
                       mask_field: str = "reference_masks") -> torch.Tensor:
    """-> (N, 3, size, size) float in [0, 1]. masks: one per image (white = subject), a mask backend name
    (ib.data.masks, e.g. "grabcut") or function, or None for whole images. Errors name `field` / `mask_field`."""
    if isinstance(images, (str, Path, Image.Image)) or (hasattr(images, "ndim") and images.ndim < 4):
        images = [images]  # one image given on its own
    if len(images) == 0:
        raise ConfigError(f"{field}: no reference images")
    mask_fn = None
    if isinstance(masks, str):
        try:
            mask_fn = get_mask_backend(masks)
        except MaskError as e:
            raise ConfigError(f"{mask_field}: {e}") from e
        masks = None
    elif callable(masks):
        mask_fn, masks = masks, None
    if masks is not None and len(masks) != len(images):
        raise ConfigError(f"{mask_field}: {len(masks)} masks for {len(images)} reference images")
    refs = []
    for i, item in enumerate(images):
        name = item if isinstance(item, (str, Path)) else f"image {i}"
        image = to_pixels(item, "RGB", field)
        mask = None
        if masks is not None:
            mask = to_pixels(masks[i], "L", mask_field) > 127
            if mask.shape != image.shape[:2]:
                raise ConfigError(f"{mask_field}: mask {i} is {mask.shape[1]}x{mask.shape[0]}, its image "
                                  f"{name} is {image.shape[1]}x{image.shape[0]}")
        elif mask_fn is not None:
            try:
                mask = np.asarray(mask_fn(image), dtype=bool)
            except (MaskError, ValueError) as e:
                raise NoSubjectError(f"{mask_field}: no mask for {name}: {e}") from e
        if mask is not None and not mask.any():
            raise NoSubjectError(f"{mask_field}: the mask of {name} is empty (no subject)")
        refs.append(torch.from_numpy(np.ascontiguousarray(reference_crop(image, mask, size, fill))).permute(2, 0, 1))
    return torch.stack(refs).float() / 255

"""Reference photos for inference: read, optionally mask, crop and resize as training's validation does."""
from pathlib import Path

import numpy as np
import torch

from ib.data.images import ImageError, read_image as read_pixels
from ib.data.transforms import ReferenceAugment, mask_crop, reference_transform
from ib.errors import ConfigError


def read_image(path: str | Path, field_name: str, mode: str = "RGB") -> np.ndarray:
    try:
        return read_pixels(Path(path), mode)
    except ImageError as e:
        raise ConfigError(f"{field_name}: cannot read image {path}: {e}") from e


def load_references(images: list[str], masks: list[str] | None, size: int,
                    augment: ReferenceAugment | None = None, mask_fn=None) -> torch.Tensor:
    """-> refs (1, N, 3, size, size) in [0, 1]. Without a mask (file or mask_fn), the whole image is used."""
    if masks and len(masks) != len(images):
        raise ConfigError(f"--mask: {len(masks)} masks for {len(images)} reference images")
    augment = augment or ReferenceAugment()
    transform = reference_transform(size, augment, train=False)
    out = []
    for i, path in enumerate(images):
        image = read_image(path, "--ref")
        if masks:
            mask = read_image(masks[i], "--mask", mode="L") > 127
            if mask.shape != image.shape[:2] or not mask.any():
                raise ConfigError(f"--mask: {masks[i]} is empty or not the size of {path}")
        elif mask_fn is not None:
            try:
                mask = np.asarray(mask_fn(image), dtype=bool)
            except ValueError as e:  # the mask backends' MaskError
                raise ConfigError(f"--ref: no mask for {path}: {e}") from e
            if not mask.any():
                raise ConfigError(f"--ref: the mask backend found no subject in {path}")
        else:
            mask = np.ones(image.shape[:2], dtype=bool)
        crop = mask_crop(image, mask, augment.fill, 0.0, None)
        ref = transform(image=crop)["image"]
        out.append(torch.from_numpy(np.array(ref)).permute(2, 0, 1).float() / 255)
    return torch.stack(out)[None]

"""Reading any image file or encoded bytes into uint8 pixels: the one reader of training shards, provided
masks, reference photos, DreamBench and data_tools.build_shards.

PIL's own `convert("RGB")` / `convert("L")` clips high-bit-depth pixels to 255 (a 16-bit photo turns white,
a 16-bit mask becomes all object). Here the full range maps to 0..255 instead:
    I;16, I;16B, I;16L, I;16N   0..65535 -> 0..255 (16-bit grey PNG, TIFF)
    I                           0..65535 -> 0..255 (16-bit PGM); 32-bit values outside that range are refused
    F                           0.0..1.0 -> 0..255; values outside that range (or not finite) are refused
16-bit RGB(A) PNG and TIFF: PIL already reduces them to 8 bits per channel, correctly. Transparent pixels
(RGBA, LA, PA, P with a transparent colour) are flattened onto white, the background that reference crops
are filled with (ib.data.transforms.ReferenceAugment.fill); masks (mode "L") are their grey values, alpha
ignored. The EXIF orientation tag is applied, so the pixels are the photo as it is shown. Images over PIL's
decompression bomb limit are refused, not decoded.
"""
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

BACKGROUND = 255  # what transparent pixels become: ReferenceAugment.fill's white
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
ORIENTATION = 0x0112  # the EXIF tag


class ImageError(ValueError):
    """An image that cannot be read, or whose pixels cannot be mapped to 8 bits. The message is the reason."""


def read_image(source: str | Path | bytes, mode: str = "RGB") -> np.ndarray:
    """A path or encoded bytes -> (H, W, 3) uint8 for mode "RGB", (H, W) uint8 for mode "L". Raises ImageError."""
    assert mode in ("RGB", "L"), mode
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            if im.getexif().get(ORIENTATION, 1) != 1:  # phones store rotation as a tag
                im = ImageOps.exif_transpose(im)
            return to_uint8(im, mode)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # PIL refuses before decoding; the message has the sizes
        raise ImageError(f"too many pixels to decode safely: {str(e).split(', could be')[0]}") from e
    except UnidentifiedImageError as e:
        raise ImageError("not an image format PIL can read") from e
    except Exception as e:  # noqa: BLE001 — missing files, undecodable or truncated bytes of any kind
        reason = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [""])[0]
        raise ImageError(f"{type(e).__name__}: {reason}" if reason else type(e).__name__) from e


def to_uint8(im: Image.Image, mode: str) -> np.ndarray:
    """An opened PIL image of any mode -> uint8 pixels in `mode` ("RGB" or "L")."""
    if im.mode in SIXTEEN_BIT_MODES or im.mode == "F":
        grey = _scaled(np.asarray(im), im.mode)
        return grey if mode == "L" else np.repeat(grey[..., None], 3, axis=2)
    if mode == "RGB" and (im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (BACKGROUND,) * 3 + (255,)), rgba)
    return np.asarray(im if im.mode == mode else im.convert(mode))  # no copy when already in mode


def _scaled(pixels: np.ndarray, mode: str) -> np.ndarray:
    """16-bit integer or 0..1 float grey pixels -> uint8, the full range onto 0..255 (rounded)."""
    if mode == "F":
        if not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 1:
            raise ImageError(f"float pixels outside 0..1 (from {pixels.min()} to {pixels.max()})")
        return np.rint(pixels * 255).astype(np.uint8)
    if pixels.min() < 0 or pixels.max() > 65535:
        raise ImageError(f"32-bit integer pixels outside the 16-bit range (from {pixels.min()} to {pixels.max()})")
    return ((pixels.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)

"""An identity similarity that means something in the synthetic world: colour statistics of the object.

A concept's identity is its colours and texture; the background colour is set by the prompt's context.
So the generated object is the set of pixels far from the context's background colour, and identity is the
histogram intersection of their colours with the reference object's colours (1 = same colour mix).
"""
import numpy as np

from data_tools.synthetic_world import CONTEXTS


def colour_histogram(pixels: np.ndarray, bins: int) -> np.ndarray:
    """pixels (N, 3) uint8 -> normalized joint RGB histogram (bins**3,)."""
    idx = (pixels.astype(np.int64) * bins) // 256
    flat = (idx[:, 0] * bins + idx[:, 1]) * bins + idx[:, 2]
    hist = np.bincount(flat, minlength=bins ** 3).astype(np.float64)
    return hist / max(hist.sum(), 1.0)


def object_pixels(image: np.ndarray, context: str, threshold: float) -> np.ndarray:
    """Pixels of `image` (H, W, 3) uint8 whose colour is far from the context's background colour."""
    bg = np.array(CONTEXTS[context], dtype=np.float32)
    far = np.linalg.norm(image.astype(np.float32) - bg, axis=-1) > threshold
    return image[far]


def identity_similarity(generated: np.ndarray, context: str, reference_pixels: np.ndarray, bins: int = 4,
                        threshold: float = 60.0) -> float:
    """Histogram intersection in [0, 1]; 0 when the generated image shows no object at all."""
    obj = object_pixels(generated, context, threshold)
    if len(obj) == 0:
        return 0.0
    return float(np.minimum(colour_histogram(obj, bins), colour_histogram(reference_pixels, bins)).sum())

"""Colour identity: does the generated object wear the subject's colours?

A metric that needs no pretrained backbone, for worlds where identity is colour and texture (the synthetic
world of the embedded default): the generated object is the set of pixels far from the image's background
colour (the median of its border pixels), and the score is the intersection of their joint RGB histogram
with the histogram of the subject's real object pixels (1 = the same colour mix, 0 = no object or no shared
colour). Real photographs need CLIP-I and DINO instead.
"""
import torch
from torchmetrics import Metric


def colour_histogram(pixels: torch.Tensor, bins: int) -> torch.Tensor:
    """pixels (N, 3) uint8 -> normalised joint RGB histogram (bins**3,), float64."""
    idx = pixels.long() * bins // 256
    flat = (idx[:, 0] * bins + idx[:, 1]) * bins + idx[:, 2]
    hist = torch.bincount(flat, minlength=bins ** 3).double()
    return hist / hist.sum().clamp(min=1.0)


def foreground_pixels(image: torch.Tensor, threshold: float) -> torch.Tensor:
    """image (3, H, W) uint8 -> (N, 3) uint8: pixels farther than `threshold` from the border's median colour."""
    border = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], dim=1).float()
    background = border.median(dim=1).values
    far = (image.float() - background[:, None, None]).norm(dim=0) > threshold
    return image.permute(1, 2, 0)[far]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) floats in [0, 1] or uint8 -> uint8 on the CPU."""
    if images.dtype == torch.uint8:
        return images.cpu()
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def colour_identity(image: torch.Tensor, object_pixels: torch.Tensor, bins: int = 4,
                    threshold: float = 60.0) -> float:
    """One image (3, H, W) against a subject's object pixels (N, 3) uint8 -> histogram intersection in [0, 1]."""
    fg = foreground_pixels(to_uint8(image[None])[0], threshold)
    if len(fg) == 0:
        return 0.0
    return float(torch.minimum(colour_histogram(fg, bins), colour_histogram(object_pixels.cpu(), bins)).sum())


class ColourIdentity(Metric):
    """Mean colour identity over images; each `update` scores images of one subject against its object pixels.
    Sum and count are summed across DDP processes."""
    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, bins: int = 4, threshold: float = 60.0, **kwargs):
        super().__init__(**kwargs)
        self.bins, self.threshold = bins, threshold
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: torch.Tensor, object_pixels: torch.Tensor) -> None:
        for image in to_uint8(images):
            self.total += colour_identity(image, object_pixels, self.bins, self.threshold)
            self.count += 1

    def compute(self) -> torch.Tensor:
        """NaN before anything was scored."""
        return (self.total / self.count).float() if self.count > 0 else torch.tensor(float("nan"))

"""CLIP-I: mean cosine between CLIP image embeddings of generated and real images (all pairs)."""
from ib.metrics.backbones import ClipBackbone, ClipBackboneConfig
from ib.metrics.mean_cosine import ReferenceSimilarity


class CLIPImageSimilarity(ReferenceSimilarity):
    """update(generated, real): generated (B, 3, H, W) or a list, real likewise; [0, 1] floats or uint8.
    backbone: a ClipBackboneConfig, or a built backbone (anything with encode_images) shared with CLIP-T."""

    def __init__(self, backbone: ClipBackbone | ClipBackboneConfig | None = None, **kwargs):
        if backbone is None or isinstance(backbone, ClipBackboneConfig):
            backbone = ClipBackbone(backbone)
        super().__init__(backbone, **kwargs)

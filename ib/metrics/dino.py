"""DINO: mean cosine between DINO ViT CLS embeddings of generated and real images (all pairs).

More sensitive to a subject's identity than CLIP-I: DINO's self-supervised features separate instances of
the same class that CLIP, trained on captions, maps close together.
"""
from ib.metrics.backbones import DinoBackbone, DinoBackboneConfig
from ib.metrics.mean_cosine import ReferenceSimilarity


class DINOSimilarity(ReferenceSimilarity):
    """update(generated, real): as CLIP-I, with DINO's preprocessing (ImageNet mean/std, resize + centre crop).
    backbone: a DinoBackboneConfig, or a built backbone (anything with encode_images)."""

    def __init__(self, backbone: DinoBackbone | DinoBackboneConfig | None = None, **kwargs):
        if backbone is None or isinstance(backbone, DinoBackboneConfig):
            backbone = DinoBackbone(backbone)
        super().__init__(backbone, **kwargs)

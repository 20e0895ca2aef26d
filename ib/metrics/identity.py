"""The three identity metrics built together; CLIP-I and CLIP-T share one CLIP backbone."""
from ib.metrics.backbones import ClipBackbone, ClipBackboneConfig, DinoBackbone, DinoBackboneConfig
from ib.metrics.clip_i import CLIPImageSimilarity
from ib.metrics.clip_t import CLIPTextSimilarity
from ib.metrics.dino import DINOSimilarity
from ib.metrics.mean_cosine import MeanCosine


def identity_metrics(clip: ClipBackboneConfig, dino: DinoBackboneConfig, identifier: str,
                     field_name: str = "") -> dict[str, MeanCosine]:
    """-> {"clip_i", "clip_t", "dino"}; field_name prefixes the config fields named in errors."""
    prefix = f"{field_name}." if field_name else ""
    clip_backbone = ClipBackbone(clip, f"{prefix}clip")
    return {"clip_i": CLIPImageSimilarity(clip_backbone),
            "clip_t": CLIPTextSimilarity(clip_backbone, identifier),
            "dino": DINOSimilarity(DinoBackbone(dino, f"{prefix}dino"))}

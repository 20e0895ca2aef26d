"""CLIP-T: mean cosine between the CLIP embedding of a generated image and that of its prompt, with the
identifier removed ("a sks dog on the beach" is scored as "a dog on the beach"): the identifier is a
made-up word whose text embedding says nothing about the prompt the image should follow."""
import torch.nn.functional as F

from ib.metrics.backbones import ClipBackbone, ClipBackboneConfig, Images
from ib.metrics.mean_cosine import MeanCosine
from ib.identifier import strip_identifier


class CLIPTextSimilarity(MeanCosine):
    """update(generated, prompts): one prompt per generated image, as given to the sampler.
    backbone: a ClipBackboneConfig, or a built backbone (encode_images, encode_text) shared with CLIP-I."""

    def __init__(self, backbone: ClipBackbone | ClipBackboneConfig | None = None, identifier: str = "sks",
                 **kwargs):
        super().__init__(**kwargs)
        self.backbone = ClipBackbone(backbone) if backbone is None or isinstance(backbone, ClipBackboneConfig) else backbone
        self.identifier = identifier

    def update(self, images: Images, prompts: list[str]) -> None:
        if len(images) != len(prompts):
            raise ValueError(f"CLIP-T: {len(images)} images but {len(prompts)} prompts")
        emb = F.normalize(self.backbone.encode_images(images), dim=-1)
        text = F.normalize(self.backbone.encode_text([strip_identifier(p, self.identifier) for p in prompts]), dim=-1)
        self._add((emb * text).sum(-1))

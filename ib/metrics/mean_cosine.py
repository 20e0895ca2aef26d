"""The shared shape of the identity metrics: a mean of raw cosine similarities between embeddings.

The state is a sum and a count, both reduced by summation across DDP processes, so the value over N
processes equals the value one process gets over the union of their data.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

from ib.metrics.backbones import Images


class MeanCosine(Metric):
    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # float64: sums over thousands of images stay exact to well below the reported digits.
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _add(self, values: torch.Tensor) -> None:
        self.total += values.detach().double().sum()
        self.count += values.numel()

    def compute(self) -> torch.Tensor:
        """Raw cosine (not ×100, not clipped); NaN before anything was scored."""
        return (self.total / self.count).float() if self.count > 0 else torch.tensor(float("nan"))


class ReferenceSimilarity(MeanCosine):
    """Each image scores its mean cosine to all reference images; the metric is the mean over images.

    Within one `update` this is the mean over all (image, reference) pairs; across updates (subjects,
    batches) every scored image counts once.
    """

    def __init__(self, backbone: nn.Module, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone

    def update(self, images: Images, references: Images | None = None) -> None:
        """references=None scores `images` against each other, self-pairs skipped (real vs real)."""
        emb = F.normalize(self.backbone.encode_images(images), dim=-1)
        if references is None:
            n = len(emb)
            if n < 2:
                return
            cos = emb @ emb.T
            self._add((cos.sum(1) - cos.diagonal()) / (n - 1))
            return
        ref = F.normalize(self.backbone.encode_images(references), dim=-1)
        self._add((emb @ ref.T).mean(1))

"""The trainable heads on the frozen image backbone."""
import torch
from torch import nn

from ib.models.adapter import AdapterContext


class ConceptHead(nn.Module):
    """Global CLIP feature of each reference -> one text-width vector; averaged over references."""

    def __init__(self, in_dim: int, text_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, text_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, N, in_dim) -> f_c (B, text_dim)."""
        return self.proj(features).mean(dim=1)


class PatchHead(nn.Module):
    """CLS + patch tokens of each reference -> visual tokens f_p; concatenated over references.

    It sits in the UNet's GLIGEN slot `position_net` (diffusers' grounding-token encoder), so its weights are
    named by that module path. `encode` runs once per sampling run; the UNet calls `forward` at every step
    with the encoded tokens, which it hands to every adapter.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, out_dim)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, T, in_dim) -> f_p (B, N*T, out_dim)."""
        return self.proj(self.norm(tokens)).flatten(1, 2)

    def forward(self, tokens: torch.Tensor, beta, visual_kv: tuple | None = None,
                skip_rows: int = 0) -> AdapterContext:
        return AdapterContext(tokens, beta, visual_kv, skip_rows)

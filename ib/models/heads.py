"""The trainable heads on the frozen image backbone."""
import torch
from torch import nn


class ConceptHead(nn.Module):
    """Global CLIP feature of each reference -> one text-width vector; averaged over references."""

    def __init__(self, in_dim: int, text_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, text_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, N, in_dim) -> f_c (B, text_dim)."""
        return self.proj(features).mean(dim=1)


class PatchHead(nn.Module):
    """CLS + patch tokens of each reference -> visual tokens; concatenated over references."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, T, in_dim) -> f_p (B, N*T, out_dim)."""
        return self.proj(self.norm(tokens)).flatten(1, 2)

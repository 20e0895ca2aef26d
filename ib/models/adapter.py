"""Gated self-attention adapters (GLIGEN-style), one per UNet transformer block.

    y := y + β · tanh(γ) · SelfAttn(LayerNorm([y ; f_p]))[:, :len(y)]

They plug into diffusers' documented GLIGEN extension point: `BasicTransformerBlock` calls
`self.fuser(hidden, objs)` between self- and cross-attention when `cross_attention_kwargs` carries
"gligen", and `UNet2DConditionModel.forward` first maps that entry through `self.position_net`.
Without the "gligen" entry the UNet is exactly the frozen model.
"""
from dataclasses import dataclass

import torch
from diffusers.models.attention import Attention, BasicTransformerBlock
from torch import nn


@dataclass
class AdapterContext:
    """What every adapter of one UNet call sees: visual tokens f_p (B, T, D) and the balance β."""
    tokens: torch.Tensor
    beta: float | torch.Tensor


def _is_zero(beta) -> bool:
    """β is a float, or a per-sample tensor (B, 1, 1) when some samples must skip the adapters."""
    return not torch.is_tensor(beta) and beta == 0


class AdapterContextRouter(nn.Module):
    """Stands in the UNet's `position_net` slot: packs the "gligen" kwargs for the blocks."""

    def forward(self, tokens: torch.Tensor, beta: float) -> AdapterContext:
        return AdapterContext(tokens, beta)


class GatedSelfAttentionAdapter(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int):
        super().__init__()
        self.proj = nn.Linear(context_dim, dim)  # visual tokens to this block's width
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(query_dim=dim, heads=heads, dim_head=head_dim)  # SDPA processor
        self.gate = nn.Parameter(torch.zeros(()))  # γ = 0: the frozen model at step 0

    def forward(self, hidden: torch.Tensor, ctx: AdapterContext) -> torch.Tensor:
        if _is_zero(ctx.beta):
            return hidden
        x = self.norm(torch.cat([hidden, self.proj(ctx.tokens.to(hidden.dtype))], dim=1))
        # Only the rows of y are kept, so only they need queries: same result as slicing afterwards.
        out = self.attn(x[:, : hidden.shape[1]], encoder_hidden_states=x)
        return hidden + ctx.beta * torch.tanh(self.gate) * out


def install_adapters(unet: nn.Module, context_dim: int) -> nn.ModuleList:
    """Put one adapter in every transformer block of `unet`; returns them (the trainable part)."""
    adapters = []
    for block in unet.modules():
        if isinstance(block, BasicTransformerBlock):
            heads = block.attn1.heads
            block.fuser = GatedSelfAttentionAdapter(block.dim, context_dim, heads, block.attn1.inner_dim // heads)
            adapters.append(block.fuser)
    if not adapters:
        raise ValueError("the UNet has no transformer blocks to hold adapters")
    unet.position_net = AdapterContextRouter()
    return nn.ModuleList(adapters)


def adapter_kwargs(tokens: torch.Tensor | None, beta: float) -> dict | None:
    """cross_attention_kwargs for a UNet call: None (plain frozen UNet) when adapters are off."""
    if tokens is None or _is_zero(beta):
        return None
    return {"gligen": {"tokens": tokens, "beta": beta}}

"""Gated self-attention adapters (GLIGEN-style), one per UNet transformer block.

    y := y + β · tanh(γ) · SelfAttn(LayerNorm([y ; f_p]))[:, :len(y)]

They plug into diffusers' documented GLIGEN extension point: `BasicTransformerBlock` calls
`self.fuser(hidden, objs)` between self- and cross-attention when `cross_attention_kwargs` carries
"gligen", and `UNet2DConditionModel.forward` first maps that entry through `self.position_net`.
Without the "gligen" entry the UNet is exactly the frozen model.
"""
import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention import Attention, BasicTransformerBlock
from torch import nn

from ib.errors import ConfigError


@dataclass
class AdapterContext:
    """What every adapter of one UNet call sees: visual tokens f_p (B, T, D) and the balance β.
    visual_kv: optional per-adapter (keys, values) of the visual tokens, precomputed once per sampling run.
    skip_rows: the batch's first rows bypass the adapters, i.e. are the plain frozen model (guidance's
        unconditional half when `uncond_adapters` is False); tokens and visual_kv hold only the other rows."""
    tokens: torch.Tensor
    beta: float | torch.Tensor
    visual_kv: tuple | None = None
    skip_rows: int = 0


def _is_zero(beta) -> bool:
    """β is a float, or a per-sample tensor (B, 1, 1) when some samples must skip the adapters."""
    return not torch.is_tensor(beta) and beta == 0


class GatedSelfAttentionAdapter(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int, gate_init: float = 0.0):
        super().__init__()
        self.proj = nn.Linear(context_dim, dim)  # visual tokens to this block's width
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(query_dim=dim, heads=heads, dim_head=head_dim)  # SDPA processor
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))  # γ = 0 (the paper): the frozen model at step 0

    def forward(self, hidden: torch.Tensor, ctx: AdapterContext) -> torch.Tensor:
        if _is_zero(ctx.beta):
            return hidden
        if ctx.skip_rows:  # not computed at all, rather than computed and multiplied by β = 0
            return torch.cat([hidden[: ctx.skip_rows], self._adapted(hidden[ctx.skip_rows:], ctx)])
        return self._adapted(hidden, ctx)

    def _adapted(self, hidden: torch.Tensor, ctx: AdapterContext) -> torch.Tensor:
        if hidden.dtype == self.proj.weight.dtype or torch.is_autocast_enabled(hidden.device.type):
            # Under autocast (or all one dtype): the fp32 master dtype for the elementwise parts.
            out = self._attend(hidden.to(self.proj.weight.dtype), ctx, native=False)
        else:
            # The frozen UNet runs natively in bf16 with autocast off (speed.native_frozen_compute): compute in
            # its dtype too, casting the fp32 master weights per call (autocast without its cache: CUDA graphs).
            with torch.autocast(hidden.device.type, dtype=hidden.dtype, cache_enabled=False):
                out = self._attend(hidden, ctx, native=True)
        return hidden + (ctx.beta * torch.tanh(self.gate) * out).to(hidden.dtype)

    def _attend(self, y: torch.Tensor, ctx: AdapterContext, native: bool) -> torch.Tensor:
        if ctx.visual_kv is not None:
            return self._attend_cached(self._norm(y, native), *ctx.visual_kv[self.index])
        x = self._norm(torch.cat([y, self.proj(ctx.tokens.to(y.dtype)).to(y.dtype)], dim=1), native)
        # Only the rows of y are kept, so only they need queries: same result as slicing afterwards.
        return self.attn(x[:, : y.shape[1]], encoder_hidden_states=x)

    def _norm(self, x: torch.Tensor, native: bool) -> torch.Tensor:
        if not native:
            return self.norm(x)
        # Autocast would run LayerNorm in fp32; natively it runs in x's dtype (fp32 statistics inside the kernel).
        n = self.norm
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x, n.normalized_shape, n.weight.to(x.dtype), n.bias.to(x.dtype), n.eps)

    def visual_kv(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of LN(proj(f_p)): LayerNorm is per token, so they do not depend on y."""
        v = self.norm(self.proj(tokens.to(self.proj.weight.dtype)))
        return self.attn.to_k(v), self.attn.to_v(v)

    def _attend_cached(self, y: torch.Tensor, k_visual: torch.Tensor, v_visual: torch.Tensor) -> torch.Tensor:
        """What `self.attn` (AttnProcessor2_0) computes for queries y over [y; f_p], with f_p's keys/values given."""
        a, b = self.attn, y.shape[0]
        q = a.to_q(y)
        k = torch.cat([a.to_k(y), k_visual.to(q.dtype)], dim=1)
        v = torch.cat([a.to_v(y), v_visual.to(q.dtype)], dim=1)
        q, k, v = (t.view(b, -1, a.heads, t.shape[-1] // a.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return a.to_out[1](a.to_out[0](out))


class NoAdapter(nn.Module):
    """The GLIGEN slot of a transformer block left without an adapter (`blocks` of install_adapters): the block
    calls its fuser whenever the "gligen" entry is there, so this one passes the hidden states through."""

    def forward(self, hidden_states: torch.Tensor, objs) -> torch.Tensor:
        return hidden_states


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def install_adapters(unet: nn.Module, context_dim: int, position_net: nn.Module,
                     blocks: list[str] | None = None, gate_init: float = 0.0) -> nn.ModuleList:
    """Put an adapter in the transformer blocks of `unet` and `position_net` (which packs the "gligen" kwargs
    into an AdapterContext) in its slot; returns the adapters (trainable). blocks: module-path prefixes of the
    blocks that get one (e.g. "down_blocks.2", "mid_block", "up_blocks.1.attentions.0"); None: every block.
    gate_init: every adapter's γ before training."""
    paths = [path for path, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)]
    if not paths:
        raise ValueError("the UNet has no transformer blocks to hold adapters")
    for prefix in blocks or ():
        if not any(_under(path, prefix) for path in paths):
            roots = sorted({".".join(p.split(".")[:2]) if p.startswith(("down", "up")) else p.split(".")[0]
                            for p in paths})
            raise ConfigError(f"model.adapter_blocks: '{prefix}' holds no transformer block of this UNet "
                              f"(those that do: {', '.join(roots)})")
    adapters = []
    for path in paths:
        block = unet.get_submodule(path)
        if blocks is not None and not any(_under(path, prefix) for prefix in blocks):
            block.fuser = NoAdapter()
            continue
        heads = block.attn1.heads
        block.fuser = GatedSelfAttentionAdapter(block.dim, context_dim, heads, block.attn1.inner_dim // heads, gate_init)
        block.fuser.index = len(adapters)  # its entry in AdapterContext.visual_kv
        adapters.append(block.fuser)
    if not adapters:
        raise ConfigError("model.adapter_blocks: empty; null puts an adapter in every transformer block")
    unet.position_net = position_net
    return nn.ModuleList(adapters)


@contextlib.contextmanager
def adapters_removed(unet: nn.Module):
    """The plain UNet for the duration (e.g. to save it as the frozen base), adapters back afterwards."""
    fusers = {name: m for name, m in unet.named_modules() if isinstance(m, (GatedSelfAttentionAdapter, NoAdapter))}
    position_net = unet._modules.pop("position_net", None)
    for name in fusers:
        del unet.get_submodule(name.rpartition(".")[0]).fuser
    try:
        yield unet
    finally:
        for name, fuser in fusers.items():
            unet.get_submodule(name.rpartition(".")[0]).fuser = fuser
        if position_net is not None:
            unet.position_net = position_net


def adapter_kwargs(tokens: torch.Tensor | None, beta: float, visual_kv: tuple | None = None,
                   skip_rows: int = 0) -> dict | None:
    """cross_attention_kwargs for a UNet call: None (plain frozen UNet) when adapters are off."""
    if tokens is None or _is_zero(beta):
        return None
    return {"gligen": {"tokens": tokens, "beta": beta, "visual_kv": visual_kv, "skip_rows": skip_rows}}

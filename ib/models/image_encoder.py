"""The frozen open_clip image backbone shared by the concept and the patch encoders.

One forward yields both the pooled, projected global feature (concept encoder input) and the CLS + patch
tokens of the last block (patch encoder input): the maths of two identical frozen encoders at half the cost.
"""
import logging
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from ib.errors import ConfigError


@dataclass
class ImageEncoderConfig:
    """model_name: an open_clip architecture; pretrained: an open_clip tag ('openai') or a checkpoint
    file; null builds random weights. overrides: create_model kwargs (tiny towers: embed_dim, vision_cfg...)."""
    model_name: str = "ViT-L-14"
    pretrained: str | None = None
    overrides: dict = field(default_factory=dict)
    init_seed: int = 0  # random weights are a function of this seed (reproducible across processes)


def missing_checkpoint_file(pretrained: str | None) -> bool:
    """A file path (not an open_clip tag like 'openai') that is not there."""
    return bool(pretrained) and bool(Path(pretrained).suffix or "/" in pretrained) and not Path(pretrained).is_file()


def create_open_clip(cfg: ImageEncoderConfig, field_name: str = "model.image_encoder"):
    """open_clip model from a tag or a local file, with a one-line error naming the field."""
    if missing_checkpoint_file(cfg.pretrained):
        raise ConfigError(f"{field_name}.pretrained: file not found: {cfg.pretrained}")
    # open_clip warns on every random init; for the embedded default that is expected, not news.
    root, level = logging.getLogger(), logging.getLogger().level
    if not cfg.pretrained:
        root.setLevel(logging.ERROR)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed)
            return open_clip.create_model(cfg.model_name, pretrained=cfg.pretrained, **cfg.overrides)
    except RuntimeError as e:
        raise ConfigError(f"{field_name}: cannot build '{cfg.model_name}' from '{cfg.pretrained}': "
                          f"{str(e).splitlines()[0]}") from e
    finally:
        root.setLevel(level)


class FrozenImageEncoder(nn.Module):
    """open_clip vision tower, frozen. Input: images in [0, 1]; it applies its own preprocessing."""

    def __init__(self, cfg: ImageEncoderConfig):
        super().__init__()
        model = create_open_clip(cfg)
        pre = open_clip.get_model_preprocess_cfg(model)
        self.visual = model.visual  # the text tower is dropped
        self.image_size = tuple(pre["size"]) if isinstance(pre["size"], (tuple, list)) else (pre["size"],) * 2
        self.register_buffer("mean", torch.tensor(pre["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(pre["std"]).view(1, 3, 1, 1), persistent=False)
        self.global_dim = self.visual.output_dim
        self.token_dim = self.visual.transformer.width
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) in [0, 1] -> global (B, global_dim), tokens (B, 1 + patches, token_dim)."""
        if tuple(images.shape[-2:]) != self.image_size:
            images = F.interpolate(images, size=self.image_size, mode="bicubic", align_corners=False).clamp(0, 1)
        x = ((images - self.mean) / self.std).to(next(self.visual.parameters()).dtype)  # bf16 when held in bf16
        out = self.visual.forward_intermediates(x, indices=1, output_extra_tokens=True, output_fmt="NLC")
        tokens = torch.cat([out["image_intermediates_prefix"][-1], out["image_intermediates"][-1]], dim=1)
        return out["image_features"], tokens

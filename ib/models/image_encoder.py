"""The frozen open_clip image backbone shared by the concept and the patch encoders.

One forward yields both the pooled, projected global feature (concept encoder input) and the CLS + patch
tokens of the last block (patch encoder input): the maths of two identical frozen encoders at half the cost.
"""
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from ib.allow_list import check_fields, fields
from ib.errors import ConfigError

# open_clip tower fields (CLIPVisionCfg / CLIPTextCfg) that only shape the architecture. Left out on purpose:
# timm_* and hf_* (a timm / transformers tower that fetches its own weights), tokenizer settings, act/norm kwargs.
_TOWER = ("layers", "width", "mlp_ratio", "ls_init_value", "pool_type", "final_ln_after_pool", "output_tokens",
          "block_type", "qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")
# create_model overrides: the architecture only. Not weights_only, jit, pretrained_*_path, cache_dir...: those
# make open_clip read files its own way (torch.load(weights_only=False) runs a planted pickle).
OPEN_CLIP_OVERRIDES = {
    **fields("embed_dim", "quick_gelu", "init_logit_scale", "init_logit_bias", "nonscalar_logit_scale",
             "force_quick_gelu", "force_image_size", "force_context_length", "force_patch_dropout"),
    "vision_cfg": fields(*_TOWER, "head_width", "patch_size", "image_size", "patch_dropout", "attentional_pool",
                         "attn_pooler_queries", "attn_pooler_heads", "no_ln_pre", "pos_embed_type"),
    "text_cfg": fields(*_TOWER, "context_length", "vocab_size", "heads", "embed_cls", "pad_id", "eos_id",
                       "no_causal_mask", "proj_bias", "proj_type"),
}


@dataclass
class ImageEncoderConfig:
    """model_name: an open_clip architecture; pretrained: an open_clip tag ('openai') or a checkpoint
    file; null builds random weights. overrides: create_model kwargs (tiny towers: embed_dim, vision_cfg...),
    within OPEN_CLIP_OVERRIDES."""
    model_name: str = "ViT-L-14"
    pretrained: str | None = None
    overrides: dict = field(default_factory=dict)
    init_seed: int = 0  # random weights are a function of this seed (reproducible across processes)

    def check(self, field_name: str = "model.image_encoder") -> None:
        """A built-in architecture ('hf-hub:' / 'local-dir:' would take it, and weights, from elsewhere) and
        allowed overrides only: this config may come from a file someone else wrote."""
        if not isinstance(self.model_name, str) or self.model_name not in open_clip.list_models():
            raise ConfigError(f"{field_name}.model_name: '{self.model_name}' is not a built-in open_clip architecture")
        if self.pretrained is not None and not isinstance(self.pretrained, str):
            raise ConfigError(f"{field_name}.pretrained: must be a tag or a file path, got {self.pretrained!r}")
        check_fields(self.overrides, OPEN_CLIP_OVERRIDES, f"{field_name}.overrides")


def missing_checkpoint_file(pretrained: str | None) -> bool:
    """A file path (not an open_clip tag like 'openai') that is not there."""
    return bool(pretrained) and bool(Path(pretrained).suffix or "/" in pretrained) and not Path(pretrained).is_file()


def create_open_clip(cfg: ImageEncoderConfig, field_name: str = "model.image_encoder"):
    """open_clip model from a tag or a local file, with a one-line error naming the field."""
    cfg.check(field_name)
    if missing_checkpoint_file(cfg.pretrained):
        raise ConfigError(f"{field_name}.pretrained: file not found: {cfg.pretrained}")
    # open_clip warns on every random init; for the embedded default that is expected, not news.
    root, level = logging.getLogger(), logging.getLogger().level
    if not cfg.pretrained:
        root.setLevel(logging.ERROR)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed)
            return open_clip.create_model(cfg.model_name, pretrained=cfg.pretrained, weights_only=True,
                                          **cfg.overrides)
    except pickle.UnpicklingError as e:  # torch.load(weights_only=True) met something that is not a tensor
        raise ConfigError(f"{field_name}.pretrained: {cfg.pretrained} is not a weights-only checkpoint (it holds more "
                          f"than tensors; loading it could run code): refused") from e
    except RuntimeError as e:
        raise ConfigError(f"{field_name}: cannot build '{cfg.model_name}' from '{cfg.pretrained}': "
                          f"{str(e).splitlines()[0]}") from e
    finally:
        root.setLevel(level)


class FrozenImageEncoder(ModelMixin, ConfigMixin):
    """open_clip vision tower, frozen. Input: images in [0, 1]; it applies its own preprocessing.

    A diffusers model (config.json + safetensors via save_pretrained / from_pretrained), so a pipeline folder
    holds it like its other parts. Built from ImageEncoderConfig's fields: `FrozenImageEncoder.build(cfg)`.
    """

    @register_to_config
    def __init__(self, model_name: str = "ViT-L-14", pretrained: str | None = None, overrides: dict | None = None,
                 init_seed: int = 0):
        super().__init__()
        model = create_open_clip(ImageEncoderConfig(model_name, pretrained, dict(overrides or {}), init_seed))
        pre = open_clip.get_model_preprocess_cfg(model)
        self.visual = model.visual  # the text tower is dropped
        self.image_size = tuple(pre["size"]) if isinstance(pre["size"], (tuple, list)) else (pre["size"],) * 2
        self.register_buffer("mean", torch.tensor(pre["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(pre["std"]).view(1, 3, 1, 1), persistent=False)
        self.global_dim = self.visual.output_dim
        self.tokens_per_image = 1 + self.visual.grid_size[0] * self.visual.grid_size[1]  # CLS + patches
        self.token_dim = self.visual.transformer.width
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def build(cls, cfg: ImageEncoderConfig) -> "FrozenImageEncoder":
        return cls(cfg.model_name, cfg.pretrained, cfg.overrides, cfg.init_seed)

    @classmethod
    def from_pretrained(cls, folder, **kwargs) -> "FrozenImageEncoder":
        """The weights come from `folder`: the architecture is built without loading the recorded `pretrained`
        tag (which would read open_clip's own files). The recorded config passes the allow-lists first."""
        config = cls.load_config(folder, **{k: v for k, v in kwargs.items() if k == "subfolder"})
        ImageEncoderConfig(config.get("model_name"), None, config.get("overrides") or {}).check("image_encoder")
        return super().from_pretrained(folder, pretrained=None, low_cpu_mem_usage=False, **kwargs)

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) in [0, 1] -> global (B, global_dim), tokens (B, 1 + patches, token_dim)."""
        if tuple(images.shape[-2:]) != self.image_size:  # one size, set by the encoder: nothing resizes silently
            raise ValueError(f"references are {tuple(images.shape[-2:])}, the image encoder takes {self.image_size} "
                             "(ib.data.references.prepare_references makes them)")
        x = ((images - self.mean) / self.std).to(next(self.visual.parameters()).dtype)  # bf16 when held in bf16
        out = self.visual.forward_intermediates(x, indices=1, output_extra_tokens=True, output_fmt="NLC")
        tokens = torch.cat([out["image_intermediates_prefix"][-1], out["image_intermediates"][-1]], dim=1)
        return out["image_features"], tokens

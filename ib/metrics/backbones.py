"""The frozen backbones the identity metrics embed with, each with its own preprocessing.

CLIP: an open_clip model (image and text towers) from an architecture plus an open_clip tag or a checkpoint
file, built by the same code as the InstantBooth image encoder. DINO: a timm ViT with weights from a local
file in the original DINO layout or timm's. With no weights both are random (the embedded default's tiny
towers): every metric then runs offline, but its numbers mean nothing.
"""
import argparse
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import timm
import torch
import torchvision.transforms.v2.functional as TF
from safetensors.torch import load_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn
from torchvision.transforms import InterpolationMode

from ib.allow_list import check_fields, fields
from ib.errors import ConfigError
from ib.models.image_encoder import ImageEncoderConfig, create_open_clip

# DINO's evaluation transform: shorter side to 256, centre crop 224 (a crop fraction of 0.875).
DINO_CROP_FRACTION = 224 / 256

Images = torch.Tensor | list[torch.Tensor]


# timm ViT create_model overrides: the architecture's numbers only. Not pretrained, checkpoint_path,
# pretrained_cfg(_overlay), cache_dir (timm would read files its own way) nor layer classes given by name.
TIMM_VIT_OVERRIDES = fields("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio",
                            "qkv_bias", "qk_norm", "scale_attn_norm", "scale_mlp_norm", "proj_bias", "init_values",
                            "class_token", "pos_embed", "no_embed_class", "reg_tokens", "pre_norm", "final_norm",
                            "fc_norm", "pool_include_prefix", "dynamic_img_size", "dynamic_img_pad")


@dataclass
class ClipBackboneConfig:
    """model_name: an open_clip architecture (protocol: ViT-B-32). pretrained: an open_clip tag ('openai')
    or a checkpoint file; null builds random weights (from `seed`, so runs compare). overrides: create_model
    kwargs (tiny towers), within image_encoder.OPEN_CLIP_OVERRIDES."""
    model_name: str = "ViT-B-32"
    pretrained: str | None = "openai"
    overrides: dict = field(default_factory=dict)
    seed: int = 0


@dataclass
class DinoBackboneConfig:
    """model_name: a timm ViT (protocol: vit_small_patch16_224, i.e. DINO ViT-S/16). weights: a local file,
    original DINO layout (dino_deitsmall16_pretrain.pth, or a training checkpoint's teacher) or timm's
    (.pth/.safetensors); null builds random weights (from `seed`, so runs compare). overrides: create_model
    kwargs (tiny towers), within TIMM_VIT_OVERRIDES. resize/crop: shorter side, then centre crop; null: crop =
    the model's input size, resize = crop / 0.875."""
    model_name: str = "vit_small_patch16_224"
    weights: str | None = None
    overrides: dict = field(default_factory=dict)
    resize: int | None = None
    crop: int | None = None
    seed: int = 0

    def check(self, field_name: str = "dino") -> None:
        """A timm architecture by name ('hf-hub:' / 'local-dir:' would read its config elsewhere), allowed
        overrides only; `weights` is read weights-only."""
        if not isinstance(self.model_name, str) or not timm.is_model(self.model_name):
            raise ConfigError(f"{field_name}.model_name: '{self.model_name}' is not a timm architecture")
        check_fields(self.overrides, TIMM_VIT_OVERRIDES, f"{field_name}.overrides")


class Preprocess(nn.Module):
    """Images -> the backbone's input: shorter side to `resize`, centre crop, normalise.

    Accepts a batch (B, 3, H, W) or a list of (3, H, W) images of any sizes, float in [0, 1] or uint8.
    """

    def __init__(self, resize: int, crop: int, mean, std, interpolation: str = "bicubic"):
        super().__init__()
        self.resize, self.crop = resize, crop
        self.mean, self.std = list(mean), list(std)
        self.interpolation = InterpolationMode(interpolation)

    def forward(self, images: Images, device) -> torch.Tensor:
        batches = [images] if isinstance(images, torch.Tensor) and images.dim() == 4 else [x[None] for x in images]
        out = []
        for x in batches:
            x = TF.to_dtype(x.to(device), torch.float32, scale=True)
            x = TF.resize(x, [self.resize], interpolation=self.interpolation, antialias=True).clamp(0, 1)
            out.append(TF.center_crop(x, [self.crop, self.crop]))
        return TF.normalize(torch.cat(out), self.mean, self.std)


def _frozen(module: nn.Module) -> nn.Module:
    return module.eval().requires_grad_(False)


@contextmanager
def _seeded(seed: int):
    """Random weights from a fixed seed, without touching the caller's random state (e.g. training's)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class _FrozenBackbone(nn.Module):
    """A metric backbone: always in eval mode; `device` is where its weights are."""

    def train(self, mode: bool = True):
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


class ClipBackbone(_FrozenBackbone):
    """open_clip image + text towers with CLIP's own preprocessing and tokenizer."""

    def __init__(self, cfg: ClipBackboneConfig | None = None, field_name: str = "clip"):
        super().__init__()
        cfg = cfg or ClipBackboneConfig()
        with _seeded(cfg.seed):
            model = create_open_clip(ImageEncoderConfig(cfg.model_name, cfg.pretrained, cfg.overrides), field_name)
        self.model = _frozen(model)
        pre = open_clip.get_model_preprocess_cfg(self.model)
        size = pre["size"] if isinstance(pre["size"], int) else pre["size"][0]
        self.preprocess = Preprocess(size, size, pre["mean"], pre["std"], pre.get("interpolation", "bicubic"))
        self.tokenizer = open_clip.get_tokenizer(cfg.model_name, context_length=self.model.context_length)

    @torch.no_grad()
    def encode_images(self, images: Images) -> torch.Tensor:
        return self.model.encode_image(self.preprocess(images, self.device)).float()

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(prompts).to(self.device)).float()


def dino_state_dict(ckpt: dict) -> dict[str, torch.Tensor]:
    """Original DINO layouts -> timm VisionTransformer keys (the two share names below the prefixes)."""
    for wrapper in ("teacher", "state_dict", "model"):  # a DINO training checkpoint keeps the teacher
        if isinstance(ckpt.get(wrapper), dict):
            ckpt = ckpt[wrapper]
            break
    state = {}
    for key, value in ckpt.items():
        for prefix in ("module.", "backbone."):
            key = key.removeprefix(prefix)
        if not key.startswith("head."):  # DINO's projection head; the metric uses the backbone's CLS
            state[key] = value
    return state


def load_dino_weights(model: nn.Module, path: str, field_name: str) -> None:
    try:
        if Path(path).suffix == ".safetensors":
            ckpt = load_file(path)
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):  # DINO checkpoints store their args
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"{field_name}: cannot read {path}: {str(e).strip().splitlines()[0]}") from e
    if not isinstance(ckpt, dict):
        raise ConfigError(f"{field_name}: {path} holds no state dict")
    state = checkpoint_filter_fn(dino_state_dict(ckpt), model)  # timm's own fixes (e.g. pos-embed size)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        detail = next((l.strip() for l in str(e).splitlines() if "size mismatch" in l), "")
        raise ConfigError(f"{field_name}: {path} does not fit {type(model).__name__}: {detail}") from e
    if missing or unexpected:
        example = sorted(missing or unexpected)[0]
        raise ConfigError(f"{field_name}: {path} does not fit {type(model).__name__} "
                          f"({len(missing)} missing, {len(unexpected)} unexpected, e.g. {example})")


class DinoBackbone(_FrozenBackbone):
    """timm ViT; the embedding is the CLS token after the final norm (num_classes=0), as DINO evaluates."""

    def __init__(self, cfg: DinoBackboneConfig | None = None, field_name: str = "dino"):
        super().__init__()
        cfg = cfg or DinoBackboneConfig()
        cfg.check(field_name)
        if cfg.weights and not Path(cfg.weights).is_file():
            raise ConfigError(f"{field_name}.weights: file not found: {cfg.weights}")
        try:
            with _seeded(cfg.seed):
                model = timm.create_model(cfg.model_name, pretrained=False, num_classes=0, global_pool="token",
                                          **cfg.overrides)
        except (RuntimeError, TypeError, ValueError) as e:
            raise ConfigError(f"{field_name}.model_name: cannot build '{cfg.model_name}': "
                              f"{str(e).strip().splitlines()[0]}") from e
        if cfg.weights:
            load_dino_weights(model, cfg.weights, f"{field_name}.weights")
        self.model = _frozen(model)
        crop = cfg.crop or model.patch_embed.img_size[0]
        resize = cfg.resize or round(crop / DINO_CROP_FRACTION)
        self.preprocess = Preprocess(resize, crop, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)

    @torch.no_grad()
    def encode_images(self, images: Images) -> torch.Tensor:
        return self.model(self.preprocess(images, self.device)).float()

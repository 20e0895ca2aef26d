"""The frozen latent diffusion model: VAE, text encoder(s), tokenizer(s), UNet, noise scheduler.

One code path loads a diffusers-layout model from a hub id or a local folder; without one, the parts are
built with random weights from architecture configs (the tiny embedded default, or full SD 1.5 shapes for
benchmarks). The text side is the one thing that differs between the families: one CLIP text encoder (SD 1.x,
SD 2.x), or two whose penultimate layers are concatenated plus a pooled embedding and the image's size and crop
as added conditioning (SDXL, a UNet with `addition_embed_type: text_time`).
"""
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, UNet2DConditionModel,
                       UniPCMultistepScheduler)
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ib.allow_list import check_fields, fields, init_fields
from ib.errors import ConfigError
from ib.models.tokenizer import offline_clip_tokenizer

# The architecture dicts may come from a file someone else wrote (checkpoint, export): architecture fields only.
# The diffusers constructors take nothing else, so their own parameters are the allow-list; transformers'
# config base class also takes loading switches (attn_implementation can fetch kernels from the hub).
_TEXT_ENCODER_FIELDS = fields("vocab_size", "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
                              "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps",
                              "attention_dropout", "initializer_range", "initializer_factor", "pad_token_id",
                              "bos_token_id", "eos_token_id")
ARCHITECTURE_FIELDS = {
    "unet": init_fields(UNet2DConditionModel),
    "vae": init_fields(AutoencoderKL),
    "scheduler": init_fields(DDPMScheduler),
    "text_encoder": _TEXT_ENCODER_FIELDS,
    "text_encoder_2": _TEXT_ENCODER_FIELDS,
}
# SDXL's second tokenizer pads with "!" where the first pads with its end token (the released tokenizers).
TOKENIZER_2_PAD = "!"


# Sampling schedulers by name; each is built from the training noise schedule (`FrozenLDM.sampling_scheduler`).
# dpm++: DPM-Solver++ (2M), the usual choice at 20-25 steps.
SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpm++": DPMSolverMultistepScheduler,
              "euler": EulerDiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler,
              "unipc": UniPCMultistepScheduler}


@dataclass
class LDMConfig:
    """Where the frozen model comes from.

    pretrained: a hub id or a local folder in diffusers layout (unet/, vae/, text_encoder/, tokenizer/,
    scheduler/; SDXL also text_encoder_2/, tokenizer_2/). When null, the parts are built with random weights
    from the architecture dicts below.
    text_encoder_2: SDXL's second text encoder (CLIPTextModelWithProjection); empty: one text encoder.
    """
    pretrained: str | None = None
    unet: dict = field(default_factory=dict)
    vae: dict = field(default_factory=dict)
    text_encoder: dict = field(default_factory=dict)
    scheduler: dict = field(default_factory=dict)
    text_encoder_2: dict = field(default_factory=dict)
    init_seed: int = 0  # random weights are a function of this seed: a checkpoint rebuilds the same frozen parts

    def check(self, field_name: str = "model.ldm") -> None:
        """Architecture fields within ARCHITECTURE_FIELDS; `pretrained` a name, loaded weights-only."""
        if self.pretrained is not None and not isinstance(self.pretrained, str):
            raise ConfigError(f"{field_name}.pretrained: must be a hub id or a folder, got {self.pretrained!r}")
        for name, allowed in ARCHITECTURE_FIELDS.items():
            check_fields(getattr(self, name), allowed, f"{field_name}.{name}")


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or Path(name).exists() or name.count("/") > 1


def missing_pretrained_folder(name: str | None) -> bool:
    """A local folder that is not there (a hub id like "org/model" cannot be checked offline)."""
    return bool(name) and _looks_like_path(name) and not Path(name).expanduser().is_dir()


class FrozenLDM(nn.Module):
    """Holds the frozen parts; none of them is ever trained."""

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                 tokenizer: CLIPTokenizer, noise_scheduler: DDPMScheduler, source: LDMConfig | None = None,
                 text_encoder_2: CLIPTextModelWithProjection | None = None, tokenizer_2: CLIPTokenizer | None = None):
        """source: where the parts came from (recorded in exported weights as their base).
        text_encoder_2, tokenizer_2: SDXL's second text encoder; required exactly when the UNet takes added
        conditioning."""
        super().__init__()
        self.source = source or LDMConfig()
        self.unet, self.vae, self.text_encoder, self.text_encoder_2 = unet, vae, text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.noise_scheduler = noise_scheduler
        self._check_text_side()
        self.requires_grad_(False)
        self.eval()

    def _check_text_side(self) -> None:
        """The text encoders and the UNet agree (a mismatch would surface as a shape error at the first step)."""
        unet = self.unet.config
        if self.added_conditioning != (self.text_encoder_2 is not None):
            raise ConfigError("model.ldm.text_encoder_2: " + (
                "the UNet takes SDXL's added conditioning (addition_embed_type: text_time), which needs the second "
                "text encoder" if self.added_conditioning else
                "a second text encoder needs a UNet with addition_embed_type: text_time (SDXL)"))
        widths = " + ".join(str(e.config.hidden_size) for e in self.text_encoders)
        if self.text_width != unet.cross_attention_dim:
            raise ConfigError(f"model.ldm.unet.cross_attention_dim: {unet.cross_attention_dim}, but the text states "
                              f"are {widths} = {self.text_width} wide")
        if self.added_conditioning:
            pooled = self.text_encoder_2.config.projection_dim
            want = pooled + 6 * unet.addition_time_embed_dim  # the pooled embedding and six size/crop ids
            if unet.projection_class_embeddings_input_dim != want:
                raise ConfigError(f"model.ldm.unet.projection_class_embeddings_input_dim: "
                                  f"{unet.projection_class_embeddings_input_dim}, but the pooled embedding "
                                  f"({pooled}) and 6 ids x addition_time_embed_dim ({unet.addition_time_embed_dim}) "
                                  f"make {want}")

    def train(self, mode: bool = True):  # frozen parts stay in eval mode (no dropout, fixed norms)
        return super().train(False)

    @property
    def added_conditioning(self) -> bool:
        """SDXL: the UNet also takes a pooled text embedding and the image's size and crop (`time_ids`)."""
        return self.unet.config.addition_embed_type == "text_time"

    @property
    def text_encoders(self) -> list[CLIPTextModel]:
        return [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]

    @property
    def tokenizers(self) -> list[CLIPTokenizer]:
        return [t for t in (self.tokenizer, self.tokenizer_2) if t is not None]

    @property
    def text_width(self) -> int:
        """Width of the text states the UNet attends to (SDXL: both encoders' widths together)."""
        return sum(e.config.hidden_size for e in self.text_encoders)

    def encode_text(self, ids: list[torch.Tensor]) -> torch.Tensor:
        """Token ids, one tensor (B, L) per tokenizer -> the UNet's text states (B, L, text_width): the last
        layer of the one encoder (SD 1.x / 2.x), or each encoder's penultimate layer, concatenated (SDXL)."""
        if self.text_encoder_2 is None:
            return self.text_encoder(ids[0])[0]
        return torch.cat([encoder(i, output_hidden_states=True).hidden_states[-2]
                          for encoder, i in zip(self.text_encoders, ids)], dim=-1)

    def encode_pooled(self, ids: torch.Tensor) -> torch.Tensor:
        """The second tokenizer's ids (B, L) -> SDXL's pooled text embedding (B, projection_dim)."""
        return self.text_encoder_2(ids).text_embeds

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent cell along a side (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        """The UNet's native image size in pixels."""
        return self.unet.config.sample_size * self.vae_scale_factor

    @classmethod
    def from_config(cls, cfg: LDMConfig) -> "FrozenLDM":
        cfg.check()
        if cfg.pretrained:
            return cls._load(cfg.pretrained)
        for name in ("unet", "vae", "text_encoder"):
            if not getattr(cfg, name):
                raise ConfigError(f"model.ldm.{name}: architecture config is empty and model.ldm.pretrained is not set")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed)
            unet = UNet2DConditionModel(**cfg.unet)
            vae = AutoencoderKL(**cfg.vae)
            text_encoder = CLIPTextModel(CLIPTextConfig(**cfg.text_encoder))
            text_encoder_2 = (CLIPTextModelWithProjection(CLIPTextConfig(**cfg.text_encoder_2))
                              if cfg.text_encoder_2 else None)
        tokenizer = offline_clip_tokenizer(cfg.text_encoder.get("max_position_embeddings", 77))
        tokenizer_2 = None
        if text_encoder_2 is not None:
            tokenizer_2 = offline_clip_tokenizer(cfg.text_encoder_2.get("max_position_embeddings", 77), TOKENIZER_2_PAD)
        for name, encoder, tok in (("text_encoder", text_encoder, tokenizer), ("text_encoder_2", text_encoder_2, tokenizer_2)):
            if encoder is not None and len(tok) > encoder.config.vocab_size:
                raise ConfigError(f"model.ldm.{name}.vocab_size: {encoder.config.vocab_size} is smaller "
                                  f"than the CLIP tokenizer's {len(tok)}")
        return cls(unet, vae, text_encoder, tokenizer, DDPMScheduler(**cfg.scheduler), source=cfg,
                   text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)

    @classmethod
    def _load(cls, name: str) -> "FrozenLDM":
        path = Path(name).expanduser()
        if missing_pretrained_folder(name):
            raise ConfigError(f"model.ldm.pretrained: folder not found: {name}")
        src = str(path) if path.is_dir() else name
        # Weights: safetensors, else a .bin read with torch.load(weights_only=True) (diffusers always does;
        # transformers is told so), so a pickle that needs code to load is refused, never run.
        try:
            # float32 whatever the files hold (transformers would keep a bf16 text encoder in bf16, diffusers
            # would not): model.speed.frozen_dtype alone decides what the frozen parts compute in.
            f32 = {"torch_dtype": torch.float32}
            # No per-file progress bars: a load takes seconds, and its bars would clutter logs and one-line errors.
            diffusers.utils.logging.disable_progress_bar()
            transformers.utils.logging.disable_progress_bar()
            unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", **f32)
            vae = AutoencoderKL.from_pretrained(src, subfolder="vae", **f32)
            text_encoder = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", weights_only=True, **f32)
            tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer")
            scheduler = DDPMScheduler.from_pretrained(src, subfolder="scheduler")
            text_encoder_2 = tokenizer_2 = None
            if unet.config.addition_embed_type == "text_time":  # SDXL: the UNet says a second encoder is there
                text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                    src, subfolder="text_encoder_2", weights_only=True, **f32)
                tokenizer_2 = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer_2")
        except pickle.UnpicklingError as e:
            raise ConfigError(f"model.ldm.pretrained: cannot load '{name}': a weights file is not weights-only "
                              f"(it holds more than tensors; loading it could run code): refused") from e
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if not path.is_dir():  # read as a hub id; a relative folder name run from elsewhere lands here too
                first = f"no folder {path.absolute()}, and not a hub model in the local cache ({first})"
            raise ConfigError(f"model.ldm.pretrained: cannot load '{name}': {first}") from e
        return cls(unet, vae, text_encoder, tokenizer, scheduler, source=LDMConfig(pretrained=name),
                   text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)

    def save_pretrained(self, folder: str | Path, scheduler=None) -> None:
        """Diffusers layout, loadable by `pretrained: folder` (and by diffusers itself). scheduler: what goes
        in scheduler/ (a pipeline's sampling scheduler; default: the training noise schedule)."""
        folder = Path(folder)
        self.unet.save_pretrained(folder / "unet")
        self.vae.save_pretrained(folder / "vae")
        self.text_encoder.save_pretrained(folder / "text_encoder")
        self.tokenizer.save_pretrained(folder / "tokenizer")
        if self.text_encoder_2 is not None:
            self.text_encoder_2.save_pretrained(folder / "text_encoder_2")
            self.tokenizer_2.save_pretrained(folder / "tokenizer_2")
        (scheduler or self.noise_scheduler).save_pretrained(folder / "scheduler")

    def sampling_scheduler(self, kind: str = "ddim"):
        """A fresh inference scheduler (a name in SCHEDULERS) sharing the training noise schedule."""
        if kind not in SCHEDULERS:
            raise ConfigError(f"sampling.scheduler: unknown '{kind}' (one of {', '.join(SCHEDULERS)})")
        return SCHEDULERS[kind].from_config(self.noise_scheduler.config)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [0, 1] -> scaled latents (a sample of the posterior; drawn from `generator` when given,
        else from the global generator)."""
        return self.latents_from_moments(self.latent_moments(images), generator)

    def latent_moments(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> the VAE posterior's (mean, logvar), (B, 2C, h, w): what
        `data_tools.encode_latents` stores in shards, so training can skip the VAE encoder."""
        return self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist.parameters

    def latents_from_moments(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A fresh posterior sample per call, as `encode_images` draws one per step."""
        dist = DiagonalGaussianDistribution(moments.to(self.vae.dtype))
        return dist.sample(generator=generator) * self.latent_scale

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [0, 1]."""
        return (self.vae.decode(latents / self.latent_scale).sample / 2 + 0.5).clamp(0, 1)

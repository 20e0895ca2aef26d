"""Sampler settings (the config's `model.sampling`, `ib generate` / `ib evaluate` flags) and their one check.
The sampling itself is ib.pipeline.InstantBoothPipeline."""
from dataclasses import dataclass

from ib.errors import ConfigError
from ib.models.frozen_ldm import SCHEDULERS
from ib.ranges import Fraction, NonNegativeFloat, PositiveInt, check_ranges


@dataclass
class SamplingConfig:
    """beta: adapter strength at inference (paper: 0.3; training uses 1.0). alpha: f_c := α·f_c (paper: 0.4).
    use_concept: inject f_c at the identifier (False leaves the prompt's own token)."""
    scheduler: str = "ddim"
    steps: PositiveInt = 50
    guidance_scale: NonNegativeFloat = 7.5
    beta: Fraction = 0.3
    alpha: Fraction = 0.4
    use_concept: bool = True
    height: PositiveInt | None = None  # null: the UNet's native size
    width: PositiveInt | None = None


def check_sampling(cfg: SamplingConfig, vae_factor: int | None, name=lambda field: f"model.sampling.{field}") -> None:
    """The one check of sampler settings (the config, `ib generate`, `ib evaluate`): a ConfigError naming
    `name(field)`. vae_factor: pixels per latent cell, which height and width must be multiples of (None:
    not known here, not checked)."""
    def refuse(field, must):
        raise ConfigError(f"{name(field)}: {must}, got {getattr(cfg, field)}")
    if cfg.scheduler not in SCHEDULERS:
        raise ConfigError(f"{name('scheduler')}: unknown '{cfg.scheduler}' (one of {', '.join(SCHEDULERS)})")
    check_ranges(SamplingConfig, cfg, name)
    for field in ("height", "width"):
        size = getattr(cfg, field)
        if size is not None and vae_factor and size % vae_factor:
            refuse(field, f"must be a multiple of {vae_factor} (the VAE's downsampling factor)")


def output_size(model, cfg: SamplingConfig) -> tuple[int, int]:
    """(height, width) of the images `sample` makes."""
    return cfg.height or model.ldm.image_size, cfg.width or model.ldm.image_size

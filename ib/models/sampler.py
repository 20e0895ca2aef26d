"""The one sampling path (validation, `ib generate`, `ib evaluate`): balanced sampling (β), concept
renormalization (α) and classifier-free guidance over any number of reference images."""
import inspect
from dataclasses import dataclass

import torch

from ib.errors import ConfigError
from ib.models.frozen_ldm import SCHEDULERS
from ib.models.instantbooth import InstantBooth
from ib.models.speed import frozen_autocast, noise_predictor, visual_kv_cache



@dataclass
class SamplingConfig:
    """beta: adapter strength at inference (paper: 0.3; training uses 1.0). alpha: f_c := α·f_c (paper: 0.4).
    use_concept: inject f_c at the identifier (False leaves the prompt's own token)."""
    scheduler: str = "ddim"
    steps: int = 50
    guidance_scale: float = 7.5
    beta: float = 0.3
    alpha: float = 0.4
    use_concept: bool = True
    height: int | None = None  # null: the UNet's native size
    width: int | None = None


def check_sampling(cfg: SamplingConfig, vae_factor: int | None, name=lambda field: f"model.sampling.{field}") -> None:
    """The one check of sampler settings (the config, `ib generate`, `ib evaluate`): a ConfigError naming
    `name(field)`. vae_factor: pixels per latent cell, which height and width must be multiples of (None:
    not known here, not checked)."""
    def refuse(field, must):
        raise ConfigError(f"{name(field)}: {must}, got {getattr(cfg, field)}")
    if cfg.scheduler not in SCHEDULERS:
        raise ConfigError(f"{name('scheduler')}: unknown '{cfg.scheduler}' (one of {', '.join(SCHEDULERS)})")
    if cfg.steps < 1:
        refuse("steps", "must be >= 1")
    if cfg.guidance_scale < 0:
        refuse("guidance_scale", "must be >= 0")
    for field in ("beta", "alpha"):  # adapter strength; concept renormalization
        if not 0 <= getattr(cfg, field) <= 1:
            refuse(field, "must be in [0, 1]")
    for field in ("height", "width"):
        size = getattr(cfg, field)
        if size is not None and (size < 1 or (vae_factor and size % vae_factor)):
            refuse(field, f"must be a positive multiple of {vae_factor or 1} (the VAE's downsampling factor)")


def output_size(model: InstantBooth, cfg: SamplingConfig) -> tuple[int, int]:
    """(height, width) of the images `sample` makes."""
    return cfg.height or model.ldm.image_size, cfg.width or model.ldm.image_size


def initial_noise(shape: tuple, seeds: list[int], device, dtype,
                  generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """One generator per image, so image i depends on its seed only, not on the batch it is in. `generators`
    (one per seed, made here if not given) go on to draw the noise that ancestral schedulers add per step."""
    generators = generators or [torch.Generator().manual_seed(s) for s in seeds]
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device, dtype)


@torch.no_grad()
def sample(model: InstantBooth, refs: torch.Tensor | None, prompts: list[str], cfg: SamplingConfig,
           seeds: list[int]) -> torch.Tensor:
    """refs (B, N, 3, H, W) in [0, 1] or None (plain frozen model) -> images (B, 3, H, W) in [0, 1]."""
    with frozen_autocast(model):  # frozen parts held in bf16 (ib.models.speed); a no-op in fp32
        return _sample(model, refs, prompts, cfg, seeds).float()


def _sample(model: InstantBooth, refs: torch.Tensor | None, prompts: list[str], cfg: SamplingConfig,
            seeds: list[int]) -> torch.Tensor:
    unet, device = model.ldm.unet, model.concept_head.proj.weight.device
    dtype = unet.dtype
    concept = visual = None
    if refs is not None:
        concept, visual = model.encode_references(refs.to(device))
    cond = model.encode_prompts(prompts, concept if cfg.use_concept else None, cfg.alpha)
    beta = cfg.beta if visual is not None else 0.0

    guided = cfg.guidance_scale > 1.0
    skip_rows = 0
    if guided:
        uncond = model.encode_prompts([""] * len(prompts))
        text = torch.cat([uncond, cond])
        if visual is not None:
            if model.uncond_adapters:
                visual = torch.cat([visual, visual])
            else:  # unconditional half: the plain frozen model, so the adapters run on the other half only
                skip_rows = len(prompts)
    else:
        text = cond

    scale = model.ldm.vae_scale_factor
    height, width = output_size(model, cfg)
    sched = model.ldm.sampling_scheduler(cfg.scheduler)
    # Timesteps stay on the CPU for the scheduler: its arithmetic (indexing alphas_cumprod, `prev_t >= 0`)
    # with device tensors would make the CPU wait for the GPU at every step. The UNet gets device copies.
    sched.set_timesteps(cfg.steps)
    unet_timesteps = sched.timesteps.to(device)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    latents = initial_noise((unet.config.in_channels, height // scale, width // scale), seeds, device, dtype,
                            generators)
    latents = latents * sched.init_noise_sigma
    # Ancestral schedulers (ddpm, euler_a) draw noise at every step: from the images' own generators.
    step_kwargs = {"generator": generators} if "generator" in inspect.signature(sched.step).parameters else {}
    visual_kv = visual_kv_cache(model, visual)  # None unless speed.cache_visual_kv
    predict_noise = noise_predictor(model)  # CUDA-graph replay if speed.cuda_graphs_sampling
    for i, t in enumerate(sched.timesteps):
        x = torch.cat([latents, latents]) if guided else latents
        x = sched.scale_model_input(x, t)
        eps = predict_noise(x, unet_timesteps[i], text.to(dtype), None if visual is None else visual.to(dtype),
                            beta, visual_kv, skip_rows)
        if guided:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + cfg.guidance_scale * (eps_c - eps_u)
        latents = sched.step(eps, t, latents, **step_kwargs).prev_sample
    return model.decode_latents(latents).float()

"""InstantBoothPipeline: text-to-image personalized by reference photos, no fine-tuning, as a diffusers pipeline.

    pipe = InstantBoothPipeline.from_weights("instantbooth.safetensors")           # an `ib export` file
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)  # any diffusers scheduler
    image = pipe("a photo of a sks dog on the beach", ["dog1.jpg", "dog2.jpg"], num_inference_steps=20).images[0]

The one sampling path: training's validation images, IdentityEval, `ib generate`, `ib evaluate`, the toy
experiment and the bench all call it. Balanced sampling (β: adapter strength), concept renormalization
(α: f_c := α·f_c) and classifier-free guidance over any number of references.
"""
import inspect
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import diffusers
import numpy as np
import PIL.Image
import torch
from diffusers import DDPMScheduler, DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ib.data.references import prepare_references
from ib.atomic_write import atomic_folder
from ib.errors import ConfigError
from ib.models.adapter import adapters_removed
from ib.models.frozen_ldm import SCHEDULERS, FrozenLDM, LDMConfig
from ib.models.image_encoder import FrozenImageEncoder
from ib.models.instantbooth import InstantBooth
from ib.models.sampler import SamplingConfig, check_sampling
from ib.models.speed import DTYPE_NAMES, DTYPES, as_speed_config
from ib.weights import check_hparams, check_unet_shape, export_weights, load_model, load_trainable, read_weights

WEIGHTS_FILE = "instantbooth.safetensors"  # the trained part in a pipeline folder (the `ib export` format)
IMAGE_ENCODER_CLASS = [FrozenImageEncoder.__module__, FrozenImageEncoder.__name__]
# The call's names for SamplingConfig's fields (errors name the argument the user passed).
ARGUMENT = {"steps": "num_inference_steps"}


@dataclass
class InstantBoothPipelineOutput(BaseOutput):
    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


def seeded(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image: image i depends on its seed only, not on the batch it is in."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


class InstantBoothPipeline(DiffusionPipeline):
    """
    model: an InstantBooth (frozen VAE, text encoder, UNet with the adapters, image encoder, trained heads);
    scheduler: any diffusers scheduler; defaults: the sampler settings a call uses for arguments it leaves
    out (those the weights were exported with).
    """

    def __init__(self, model: InstantBooth, scheduler: SchedulerMixin, defaults: SamplingConfig | None = None):
        super().__init__()
        self.register_modules(model=model, scheduler=scheduler)
        self.defaults = defaults or SamplingConfig()

    # diffusers' names for the parts
    unet = property(lambda self: self.model.ldm.unet)
    vae = property(lambda self: self.model.ldm.vae)
    text_encoder = property(lambda self: self.model.ldm.text_encoder)
    tokenizer = property(lambda self: self.model.ldm.tokenizer)
    text_encoder_2 = property(lambda self: self.model.ldm.text_encoder_2)  # SDXL; None otherwise
    tokenizer_2 = property(lambda self: self.model.ldm.tokenizer_2)
    image_encoder = property(lambda self: self.model.image_encoder)
    identifier = property(lambda self: self.model.identifier)

    # --- building ---------------------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: InstantBooth, scheduler: str | SchedulerMixin = "ddim",
                   defaults: SamplingConfig | None = None) -> "InstantBoothPipeline":
        """A pipeline around a model in memory (training's validation); scheduler: a name in SCHEDULERS,
        built on the model's training noise schedule, or a scheduler."""
        if isinstance(scheduler, str):
            scheduler = model.ldm.sampling_scheduler(scheduler)
        return cls(model, scheduler, defaults)

    @classmethod
    def from_weights(cls, weights: str | Path, base: str | Path | None = None, torch_dtype: torch.dtype | None = None,
                     speed=None, _image_encoder_folder: Path | None = None) -> "InstantBoothPipeline":
        """An `ib export` file (or a training checkpoint) on its base: the one recorded in the file (a hub id, a
        folder, or the architecture of random parts), or `base`, another diffusers folder / hub id with the
        same UNet shape (e.g. a fine-tune of the same base). speed: ib.models.speed switches or preset name;
        torch_dtype: the frozen parts' dtype (the trained heads stay float32 unless speed says otherwise)."""
        model, hparams = load_model(weights, None if base is None else str(base), _speed(speed, torch_dtype),
                                    field_name="weights", base_field="base", image_encoder_folder=_image_encoder_folder)
        defaults = SamplingConfig(**hparams.get("sampling", {}))
        return cls.from_model(model, defaults.scheduler, defaults)

    @classmethod
    def from_pretrained(cls, folder_or_file: str | Path, torch_dtype: torch.dtype | None = None, speed=None,
                        base: str | Path | None = None) -> "InstantBoothPipeline":
        """A folder written by save_pretrained, or an `ib export` file (then as from_weights)."""
        path = Path(folder_or_file)
        if path.is_file():
            return cls.from_weights(path, base, torch_dtype, speed)
        index = _read_model_index(path)
        pipe = cls.from_weights(path / WEIGHTS_FILE, base or path, torch_dtype, speed,
                                _image_encoder_folder=path / "image_encoder")
        scheduler_class = getattr(diffusers, index["scheduler"][1])
        pipe.scheduler = scheduler_class.from_pretrained(path, subfolder="scheduler")
        return pipe

    def save_pretrained(self, save_directory: str | Path, **_) -> None:
        """A self-contained diffusers-layout folder: model_index.json, the frozen parts (unet/ without the
        adapters, vae/, text_encoder/, tokenizer/, scheduler/ with this pipeline's scheduler, image_encoder/)
        and the trained part as instantbooth.safetensors. Written beside and renamed into place."""
        out = Path(save_directory)
        if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "model_index.json").is_file())):
            raise ConfigError(f"save_directory: {out} exists and is not a pipeline folder")
        with atomic_folder(out) as tmp:
            with adapters_removed(self.unet):
                self.model.ldm.save_pretrained(tmp, scheduler=self.scheduler)
            self.image_encoder.save_pretrained(tmp / "image_encoder")
            export_weights(self.model, tmp / WEIGHTS_FILE, asdict(self.defaults))
            index = {"_class_name": type(self).__name__, "_diffusers_version": diffusers.__version__,
                     "image_encoder": IMAGE_ENCODER_CLASS, "scheduler": ["diffusers", type(self.scheduler).__name__],
                     "text_encoder": ["transformers", type(self.text_encoder).__name__],
                     "tokenizer": ["transformers", type(self.tokenizer).__name__],
                     "unet": ["diffusers", type(self.unet).__name__], "vae": ["diffusers", type(self.vae).__name__]}
            if self.text_encoder_2 is not None:
                index.update(text_encoder_2=["transformers", type(self.text_encoder_2).__name__],
                             tokenizer_2=["transformers", type(self.tokenizer_2).__name__])
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2))

    # --- sampling ---------------------------------------------------------------------------------------
    def prepare_references(self, reference_images, reference_masks=None, batch: int = 1) -> torch.Tensor | None:
        """-> (batch, N, 3, S, S) in [0, 1] at the image encoder's size S, or None (no references: the plain
        frozen model). reference_images: one subject's photos for every prompt (paths, PIL images, arrays,
        tensors), a list of such lists (one per prompt), or prepared references (B, N, 3, S, S)."""
        if reference_images is None:
            return None
        size = self.image_encoder.image_size[0]
        if torch.is_tensor(reference_images) and reference_images.ndim == 5:
            refs = reference_images
            if tuple(refs.shape[-3:]) != (3, size, size):
                raise ConfigError(f"reference_images: prepared references must be (B, N, 3, {size}, {size}), "
                                  f"got {tuple(refs.shape)}")
        elif isinstance(reference_images, (list, tuple)) and reference_images and isinstance(reference_images[0], (list, tuple)):
            if len(reference_images) != batch:
                raise ConfigError(f"reference_images: {len(reference_images)} lists for {batch} prompts")
            masks = reference_masks if isinstance(reference_masks, (list, tuple)) else [reference_masks] * batch
            refs = [prepare_references(images, m, size=size) for images, m in zip(reference_images, masks)]
            if len({r.shape[0] for r in refs}) > 1:
                raise ConfigError("reference_images: every prompt needs the same number of references")
            refs = torch.stack(refs)
        else:
            refs = prepare_references(reference_images, reference_masks, size=size)[None]
        if refs.shape[0] not in (1, batch):
            raise ConfigError(f"reference_images: {refs.shape[0]} reference sets for {batch} prompts")
        return refs.expand(batch, *refs.shape[1:])

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], reference_images=None, reference_masks=None,
                 num_images_per_prompt: int = 1, generator: torch.Generator | list[torch.Generator] | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 beta: float | None = None, alpha: float | None = None, height: int | None = None,
                 width: int | None = None, latents: torch.Tensor | None = None, use_concept: bool = True,
                 output_type: str = "pil", return_dict: bool = True):
        """prompt: containing the identifier (e.g. "a photo of a sks dog") where the concept is injected.
        reference_masks: one mask per reference (white = subject), a mask backend name (e.g. "grabcut"), or
        None (whole photos). beta: adapter strength (β = 0: no adapters); alpha: concept renormalization;
        use_concept: False leaves the identifier's own token. Left out: the pipeline's `defaults`.
        latents: initial noise (B, C, h, w) instead of drawing it from `generator`.
        output_type: "pil", "np" ((B, H, W, 3) in [0, 1]) or "pt" ((B, 3, H, W) in [0, 1])."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ConfigError("prompt: expected a string or a non-empty list of strings")
        if num_images_per_prompt < 1:
            raise ConfigError(f"num_images_per_prompt: must be >= 1, got {num_images_per_prompt}")
        if output_type not in ("pil", "np", "pt"):
            raise ConfigError(f"output_type: one of pil, np, pt; got {output_type!r}")
        given = {"steps": num_inference_steps, "guidance_scale": guidance_scale, "beta": beta, "alpha": alpha,
                 "height": height, "width": width}
        cfg = replace(self.defaults, use_concept=use_concept, **{k: v for k, v in given.items() if v is not None})
        check_sampling(cfg, self.model.ldm.vae_scale_factor, lambda f: ARGUMENT.get(f, f))
        refs = self.prepare_references(reference_images, reference_masks, len(prompts))
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        if refs is not None:
            refs = refs.repeat_interleave(num_images_per_prompt, dim=0)
        if isinstance(generator, list) and len(generator) != len(prompts):
            raise ConfigError(f"generator: {len(generator)} generators for {len(prompts)} images")

        with self.model.frozen_autocast():  # frozen parts held in bf16 (speed switches); a no-op in fp32
            latents = self._denoise(prompts, refs, cfg, generator, latents)
            images = self.model.decode_latents(latents).float()
        if output_type != "pt":
            images = images.permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        return InstantBoothPipelineOutput(images=images) if return_dict else (images,)

    def _denoise(self, prompts: list[str], refs: torch.Tensor | None, cfg: SamplingConfig, generator,
                 latents: torch.Tensor | None) -> torch.Tensor:
        model, unet = self.model, self.unet
        device, dtype = model.concept_head.proj.weight.device, unet.dtype
        concept = visual = None
        if refs is not None:
            concept, visual = model.encode_references(refs.to(device))
        cond = model.encode_prompts(prompts, concept if cfg.use_concept else None, cfg.alpha)
        beta = cfg.beta if visual is not None else 0.0
        scale = model.ldm.vae_scale_factor
        height, width = cfg.height or model.ldm.image_size, cfg.width or model.ldm.image_size
        added = model.encode_added(prompts, (height, width))  # SDXL; None otherwise

        guided = cfg.guidance_scale > 1.0
        skip_rows = 0
        if guided:
            text = torch.cat([model.encode_prompts([""] * len(prompts)), cond])
            if added is not None:
                uncond = model.encode_added([""] * len(prompts), (height, width))
                added = {k: torch.cat([uncond[k], added[k]]) for k in added}
            if visual is not None:
                if model.uncond_adapters:
                    visual = torch.cat([visual, visual])
                else:  # unconditional half: the plain frozen model, so the adapters run on the other half only
                    skip_rows = len(prompts)
        else:
            text = cond

        shape = (len(prompts), unet.config.in_channels, height // scale, width // scale)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ConfigError(f"latents: expected shape {shape}, got {tuple(latents.shape)}")
        sched = self.scheduler
        # Timesteps stay on the CPU for the scheduler: its arithmetic (indexing alphas_cumprod, `prev_t >= 0`)
        # with device tensors would make the CPU wait for the GPU at every step. The UNet gets device copies.
        sched.set_timesteps(cfg.steps)
        unet_timesteps = sched.timesteps.to(device)
        latents = latents.to(device, dtype) * sched.init_noise_sigma
        # Ancestral schedulers (ddpm, euler_a) draw noise at every step: from the images' own generators.
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(sched.step).parameters else {}
        visual_kv = model.visual_kv_cache(visual)  # None unless speed.cache_visual_kv
        predict_noise = model.noise_predictor()  # CUDA-graph replay if speed.cuda_graphs_sampling
        for i, t in enumerate(self.progress_bar(sched.timesteps)):
            x = torch.cat([latents, latents]) if guided else latents
            x = sched.scale_model_input(x, t)
            eps = predict_noise(x, unet_timesteps[i], text.to(dtype), None if visual is None else visual.to(dtype),
                                beta, visual_kv, skip_rows, added)
            if guided:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + cfg.guidance_scale * (eps_c - eps_u)
            latents = sched.step(eps, t, latents, **step_kwargs).prev_sample
        return latents


def generate(pipe: InstantBoothPipeline, refs: torch.Tensor | None, prompts: list[str], cfg: SamplingConfig,
             seeds: list[int]) -> torch.Tensor:
    """The callers inside ib (validation, IdentityEval, `ib generate` / `ib evaluate`, the toy experiment, the
    bench): prepared refs (B, N, 3, S, S) or None, settings `cfg`, one seed per image -> (B, 3, H, W) in [0, 1]."""
    if type(pipe.scheduler) is not SCHEDULERS[cfg.scheduler]:
        pipe.scheduler = pipe.model.ldm.sampling_scheduler(cfg.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompts, refs, generator=seeded(seeds), num_inference_steps=cfg.steps,
                guidance_scale=cfg.guidance_scale, beta=cfg.beta, alpha=cfg.alpha, height=cfg.height,
                width=cfg.width, use_concept=cfg.use_concept, output_type="pt").images


def load_instantbooth(pipe: DiffusionPipeline, weights: str | Path, speed=None) -> InstantBoothPipeline:
    """An InstantBooth pipeline that shares `pipe`'s UNet, VAE, text encoder and tokenizer (no copies), with
    the trained weights from `weights` (an `ib export` file). The adapters are installed into the shared UNet
    but run only when the InstantBooth pipeline passes them its references: `pipe` keeps sampling as before."""
    hparams, state = read_weights(weights, "weights")
    dtype_name = DTYPE_NAMES.get(pipe.unet.dtype, "float32")
    source = LDMConfig(pretrained=getattr(pipe, "name_or_path", None) or None)
    ldm = FrozenLDM(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                    DDPMScheduler.from_config(pipe.scheduler.config), source=source,
                    text_encoder_2=getattr(pipe, "text_encoder_2", None), tokenizer_2=getattr(pipe, "tokenizer_2", None))
    model = InstantBooth(ldm, FrozenImageEncoder.build(check_hparams(hparams)[1]), identifier=hparams.get("identifier", "sks"),
                         uncond_adapters=hparams.get("uncond_adapters", True),
                         adapter_blocks=hparams.get("adapter_blocks"),
                         speed=speed if speed is not None else {"frozen_dtype": dtype_name}, inference=True)
    check_unet_shape(model, hparams, f"weights {weights}")
    load_trainable(model, state, f"weights {weights}")
    device = pipe.unet.device
    model.image_encoder.to(device)
    model.concept_head.to(device)
    defaults = SamplingConfig(**hparams.get("sampling", {}))
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    return InstantBoothPipeline(model.eval(), scheduler, defaults)


def _speed(speed, torch_dtype: torch.dtype | None):
    cfg = as_speed_config(speed)
    if torch_dtype is not None:
        if torch_dtype not in DTYPE_NAMES:
            raise ConfigError(f"torch_dtype: one of {', '.join(DTYPES)}, got {torch_dtype}")
        cfg = replace(cfg, frozen_dtype=DTYPE_NAMES[torch_dtype])
    return cfg


def _read_model_index(folder: Path) -> dict:
    """model_index.json of a folder save_pretrained wrote; its classes are checked (never imported by name)."""
    path = folder / "model_index.json"
    if not folder.is_dir():
        raise ConfigError(f"pretrained: not a file or folder: {folder}")
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"pretrained: {path}: cannot read it ({type(e).__name__}); not a pipeline folder") from e
    if not isinstance(index, dict) or index.get("_class_name") != InstantBoothPipeline.__name__:
        raise ConfigError(f"pretrained: {path}: not an {InstantBoothPipeline.__name__} folder")
    scheduler = index.get("scheduler")
    if (not isinstance(scheduler, list) or len(scheduler) != 2 or scheduler[0] != "diffusers"
            or not isinstance(getattr(diffusers, str(scheduler[1]), None), type)
            or not issubclass(getattr(diffusers, scheduler[1]), SchedulerMixin)):
        raise ConfigError(f"pretrained: {path}: 'scheduler' must name a diffusers scheduler, got {scheduler!r}")
    if index.get("image_encoder") != IMAGE_ENCODER_CLASS:
        raise ConfigError(f"pretrained: {path}: 'image_encoder' must be {IMAGE_ENCODER_CLASS}")
    return index

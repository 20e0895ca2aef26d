"""Speed switches for training and sampling, in one place. Every switch is off by default, so the
default model computes exactly what it did before; `bench/bench_speed.py --sweep` measures each one.

    frozen_dtype            frozen parts (UNet, VAE, text encoder, CLIP) held in this dtype; the trained
                            heads and adapters stay fp32 master weights. Anything but float32 needs autocast
                            to that dtype around the step (Lightning `precision: bf16-mixed` does it in
                            training; the sampler turns it on itself).
    native_frozen_compute   the frozen parts compute natively in frozen_dtype with autocast switched off inside
                            them, as diffusers' half-precision pipelines run; the adapters compute in that dtype
                            too, from their fp32 master weights cast per call, and the heads stay under autocast.
                            Without it, autocast keeps every norm/softmax output and the residual stream's
                            elementwise work in fp32 between the bf16 matmuls: more memory traffic and
                            activation memory. Inference (`apply_speed(..., inference=True)`) also holds heads
                            and adapters in frozen_dtype. Needs frozen_dtype bfloat16 or float16.
    sdpa                    diffusers attention through `AttnProcessor2_0` (torch SDPA: flash / memory-
                            efficient kernels). False selects the classic processor, only to measure it.
    channels_last           UNet and VAE weights in channels-last memory format (measured slower on an H200:
                            training 0.87x; docs/benchmarks.md).
    compile_blocks          regional `torch.compile` with static shapes: each repeated block (BasicTransformerBlock
                            with its adapter, ResnetBlock2D) compiled on its own, avoiding the Inductor failure
                            of the whole-UNet training compile. Sampling 1.43x on an H200, but each new shape
                            compiles for about a minute; the training compile took over 3 minutes there.
                            compile_scope "transformer" compiles only the transformer blocks (with their
                            adapters): far fewer distinct shapes, so far fewer compiles.
    cuda_graphs_sampling    the sampler's UNet call replayed from CUDA graphs, one per input shape
                            (ib/models/cuda_graph.py): no compiler, so no compile time, and it composes with
                            compile_blocks. Sampling only (training never uses it). CUDA only; refused on CPU.
    fused_optimizer         AdamW(fused=True) for the trainable parameters.
    gradient_checkpointing  diffusers' activation checkpointing in the UNet blocks (memory for compute).
    cache_visual_kv         the adapters' keys/values of the visual tokens computed once per sampling run
                            (they depend on neither timestep nor latents), reused at every step.
"""
from dataclasses import dataclass

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import AttnProcessor
from diffusers.models.resnet import ResnetBlock2D

from ib.errors import ConfigError

COMPILE_SCOPES = {  # compile_scope -> the UNet's repeated regions compiled one by one
    "all": (BasicTransformerBlock, ResnetBlock2D),
    # SD 1.5 has 4 distinct transformer-block shapes but ~20 resnet in/out/resolution combinations: the
    # transformer blocks (attention, GEGLU, norms and the adapter, where fusion pays) compile in a fraction
    # of the time; the resnets are dominated by cuDNN convolutions.
    "transformer": (BasicTransformerBlock,),
}
COMPILED_BLOCKS = COMPILE_SCOPES["all"]
# One compiled block class meets many weight shapes (SD 1.5: ~15 resnet in/out pairs) in training and in
# sampling; parameters' shapes are guarded, and torch's default limit of 8 would silently fall back to eager.
RECOMPILE_LIMIT = 64
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass
class SpeedConfig:
    frozen_dtype: str = "float32"
    native_frozen_compute: bool = False
    sdpa: bool = True
    channels_last: bool = False
    compile_blocks: bool = False
    compile_scope: str = "all"  # "all" | "transformer" (COMPILE_SCOPES)
    compile_backend: str = "inductor"  # "aot_eager": traces the same regions without code generation (tests)
    cuda_graphs_sampling: bool = False
    fused_optimizer: bool = False
    gradient_checkpointing: bool = False
    cache_visual_kv: bool = False


def as_speed_config(cfg) -> SpeedConfig:
    """A SpeedConfig, a dict of its fields, a preset name (SPEED_PRESETS) or None (all off)."""
    if isinstance(cfg, str):
        if cfg not in SPEED_PRESETS:
            raise ConfigError(f"speed: unknown preset '{cfg}' (one of {', '.join(SPEED_PRESETS)})")
        return SPEED_PRESETS[cfg]
    return cfg if isinstance(cfg, SpeedConfig) else SpeedConfig(**(cfg or {}))


def check_speed(cfg: SpeedConfig | dict | None, device_type: str | None = None, precision: str | None = None) -> None:
    """The one check of the switches, before anything is built (ib.config_checks) and when they are applied:
    a ConfigError naming the field. device_type ("cuda", "cpu", ...) and precision (Lightning's
    trainer.precision; None where the caller handles autocast itself, as the sampler does): not checked when
    None."""
    cfg = as_speed_config(cfg)
    if cfg.frozen_dtype not in DTYPES:
        raise ConfigError(f"model.speed.frozen_dtype: unknown '{cfg.frozen_dtype}' (one of {sorted(DTYPES)})")
    if cfg.compile_scope not in COMPILE_SCOPES:
        raise ConfigError(f"model.speed.compile_scope: unknown '{cfg.compile_scope}' (one of {sorted(COMPILE_SCOPES)})")
    if cfg.native_frozen_compute and cfg.frozen_dtype == "float32":
        raise ConfigError("model.speed.native_frozen_compute: needs frozen_dtype bfloat16 or float16 "
                          "(float32 parts already compute natively)")
    # Training steps run under Lightning's autocast only with a mixed precision (legacy "16"/"bf16": mixed too).
    mixed = "mixed" in str(precision) or str(precision) in ("16", "bf16")
    if precision is not None and cfg.frozen_dtype != "float32" and not mixed:
        raise ConfigError(f"model.speed.frozen_dtype: {cfg.frozen_dtype} needs trainer.precision "
                          f"bf16-mixed (autocast), got {precision}")
    if cfg.cuda_graphs_sampling and device_type is not None and device_type != "cuda":
        raise ConfigError("model.speed.cuda_graphs_sampling: CUDA graphs need a CUDA device; "
                          f"the model runs on {device_type}")


def apply_speed(model, cfg: SpeedConfig, inference: bool = False) -> None:
    """What InstantBooth's constructor does with its `speed`: dtypes, attention processors, memory format,
    checkpointing and compilation of its parts. inference: nothing will be trained (generation, evaluation),
    so with native_frozen_compute the heads and adapters are held in frozen_dtype too: no master weights, no
    casts per call. Only switches that are on touch the model: a UNet shared with another pipeline keeps its
    attention processors unless `sdpa` is off."""
    check_speed(cfg)
    ldm, unet = model.ldm, model.ldm.unet
    dtype = DTYPES[cfg.frozen_dtype]
    if dtype != torch.float32:
        ldm.to(dtype)
        model.image_encoder.to(dtype)
        model.adapters.float()  # they live inside the UNet; keep them fp32 master weights
        model.patch_head.float()  # so does the patch head (the UNet's position_net)
        if cfg.native_frozen_compute and inference:
            for part in (model.adapters, model.concept_head, model.patch_head):
                part.to(dtype)
    if not cfg.sdpa:  # the classic processor, only to measure it (diffusers' default is SDPA)
        unet.set_attn_processor(AttnProcessor())  # includes the adapters' attention (they are UNet submodules)
        ldm.vae.set_attn_processor(AttnProcessor())
    if cfg.channels_last:
        unet.to(memory_format=torch.channels_last)
        ldm.vae.to(memory_format=torch.channels_last)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()  # active whenever grad is enabled, even in eval mode
    if cfg.compile_blocks:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        for m in unet.modules():
            if isinstance(m, COMPILE_SCOPES[cfg.compile_scope]):
                # Static shapes: with automatic dynamic shapes, the training step's recompile for the second
                # resolution level failed in Inductor on an H200 (torch 2.11: "shape '[1281, 640]' is
                # invalid for input of size 257"); one static compile per block shape avoids it.
                m.compile(backend=cfg.compile_backend, dynamic=False)


# `--speed` of `ib generate` / `ib evaluate`. Measured on an H200 at SD 1.5 scale, 1 image, 5 references
# (bench/results/bench-sd15-h200-2026-11-28-*): off 3.12 s, graphs 0.96 s, compiled 0.66 s (+37..77 s
# compile per new shape), both before native_frozen_compute (all-bf16 compute, added after that run).
SPEED_PRESETS = {
    "off": SpeedConfig(),
    "graphs": SpeedConfig(frozen_dtype="bfloat16", native_frozen_compute=True, cache_visual_kv=True,
                          cuda_graphs_sampling=True),
    "compiled": SpeedConfig(frozen_dtype="bfloat16", native_frozen_compute=True, cache_visual_kv=True,
                            cuda_graphs_sampling=True, compile_blocks=True),
}
SPEED_HELP = ("off: as trained; graphs (default on CUDA): the model in bf16 + visual-KV cache + CUDA graphs; "
              "compiled: graphs + regional torch.compile (faster per image, but each new batch size / "
              "reference count compiles for about a minute)")


def default_preset(device: str) -> str:
    return "graphs" if str(device).startswith("cuda") else "off"


def check_speed_preset(preset: str, device) -> None:
    """`preset` of SPEED_PRESETS on `device`, checked before the model loads; errors name `--speed`."""
    try:
        check_speed(SPEED_PRESETS[preset], torch.device(device).type)
    except ConfigError as e:
        raise ConfigError(f"--speed {preset}: {e}") from e


def attention_backends(model) -> dict:
    """Which attention implementation each part uses (the bench records it)."""
    def procs(m):
        return sorted({type(p).__name__ for p in m.attn_processors.values()})
    te = model.ldm.text_encoder.config
    return {"unet_and_adapters": procs(model.ldm.unet), "vae": procs(model.ldm.vae),
            "text_encoder": getattr(te, "_attn_implementation", None),
            "image_encoder": "nn.MultiheadAttention(need_weights=False) -> SDPA fast path",
            "adapters_cached_kv": "F.scaled_dot_product_attention"}

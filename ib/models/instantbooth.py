"""InstantBooth as a plain nn.Module: frozen LDM + frozen image backbone + the trained heads and adapters."""
import contextlib

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr
from torch import nn

from ib.models.adapter import GatedSelfAttentionAdapter, adapter_kwargs, install_adapters
from ib.models.cuda_graph import CUDAGraphCache
from ib.models.frozen_ldm import FrozenLDM, LDMConfig
from ib.models.heads import ConceptHead, PatchHead
from ib.identifier import strip_identifier, tokenize_with_identifier
from ib.models.image_encoder import FrozenImageEncoder, ImageEncoderConfig
from ib.models.speed import DTYPES, SpeedConfig, apply_speed, as_speed_config

TRAINABLE_PREFIXES = ("concept_head.", "patch_head.", "adapters.")


def _renamed(state: dict, prefixes: dict[str, str]) -> dict:
    out = {}
    for key, value in state.items():
        old = next((p for p in prefixes if key.startswith(p)), None)
        out[prefixes[old] + key[len(old):] if old else key] = value
    return out


class InstantBooth(nn.Module):
    """
    identifier: the word V̂ in prompts whose text-encoder outputs are replaced by the concept embedding.
    uncond_adapters: what classifier-free guidance's unconditional branch sees. It always gets the empty
        prompt (so no concept token); with True it keeps the adapters and visual tokens, so guidance
        pushes towards the prompt only; with False it is the plain frozen model, so guidance pushes
        towards prompt and identity together. Training's condition dropout teaches the same choice.

    adapter_blocks: module-path prefixes of the UNet transformer blocks that get an adapter ("down_blocks.2",
        "mid_block", ...); None: every block (the paper). Fewer blocks cost less memory and time.
    gate_init: the adapters' gate γ before training; 0 (the paper) starts from the frozen model exactly.
    speed: the speed switches (ib.models.speed: a SpeedConfig, its fields as a dict, or a preset name);
        all off by default. inference: nothing will be trained (see SpeedConfig.native_frozen_compute).
    """
    # Trainable parameter prefixes -> where diffusers would name them (the names in an `ib export` file);
    # the adapters' are their transformer blocks' paths ("unet.<block path>.fuser.").
    DIFFUSERS_PREFIXES = ("concept_encoder.", "unet.")

    def __init__(self, ldm: FrozenLDM, image_encoder: FrozenImageEncoder, identifier: str = "sks",
                 uncond_adapters: bool = True, speed: SpeedConfig | dict | str | None = None,
                 inference: bool = False, adapter_blocks: list[str] | None = None, gate_init: float = 0.0):
        super().__init__()
        self.ldm = ldm
        self.image_encoder = image_encoder
        self.identifier = identifier
        self.uncond_adapters = uncond_adapters
        context_dim = ldm.unet.config.cross_attention_dim
        self.concept_head = ConceptHead(image_encoder.global_dim, ldm.text_width)
        self.patch_head = PatchHead(image_encoder.token_dim, context_dim)
        self.adapter_blocks = None if adapter_blocks is None else list(adapter_blocks)
        self.adapters = install_adapters(ldm.unet, context_dim, self.patch_head, self.adapter_blocks, gate_init)
        self.speed = as_speed_config(speed)
        apply_speed(self, self.speed, inference)
        # The sampler's UNet call replayed from CUDA graphs (speed.cuda_graphs_sampling).
        self._graphed_predict_noise = CUDAGraphCache(self.predict_noise) if self.speed.cuda_graphs_sampling else None

    @classmethod
    def from_config(cls, ldm: LDMConfig, image_encoder: ImageEncoderConfig, **kwargs) -> "InstantBooth":
        return cls(FrozenLDM.from_config(ldm), FrozenImageEncoder.build(image_encoder), **kwargs)

    @property
    def device(self) -> torch.device:
        return self.concept_head.proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The frozen parts' dtype (what a diffusers pipeline reports as its own)."""
        return self.ldm.unet.dtype

    # --- the trainable part -------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith(TRAINABLE_PREFIXES)}

    def _diffusers_prefixes(self) -> dict[str, str]:
        prefixes = {"concept_head.": "concept_encoder.", "patch_head.": "unet.position_net."}
        for path, block in self.ldm.unet.named_modules():
            if isinstance(getattr(block, "fuser", None), GatedSelfAttentionAdapter):
                prefixes[f"adapters.{block.fuser.index}."] = f"unet.{path}.fuser."
        return prefixes

    def to_diffusers_names(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Trainable state keys -> diffusers module paths (unet.down_blocks.0.attentions.0.transformer_blocks.0
        .fuser.…, unet.position_net.…, concept_encoder.…)."""
        return _renamed(state, self._diffusers_prefixes())

    def from_diffusers_names(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return _renamed(state, {v: k for k, v in self._diffusers_prefixes().items()})

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        heads = list(self.concept_head.parameters()) + list(self.patch_head.parameters())
        return {"heads": heads, "adapters": list(self.adapters.parameters())}

    # --- speed switches (ib.models.speed) ----------------------------------------------------------------
    def frozen_compute(self):
        """Around every call into a frozen part: autocast off when they compute natively in their own dtype
        (native_frozen_compute), so nothing is upcast to fp32 inside them; a no-op context otherwise."""
        if not self.speed.native_frozen_compute:
            return contextlib.nullcontext()
        return torch.autocast(self.concept_head.proj.weight.device.type, enabled=False)

    def frozen_autocast(self):
        """Autocast to the frozen parts' dtype when they are not fp32 (a no-op context otherwise)."""
        dtype = DTYPES[self.speed.frozen_dtype]
        return torch.autocast(self.concept_head.proj.weight.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def visual_kv_cache(self, visual: torch.Tensor | None):
        """Per-adapter (keys, values) of the visual tokens for one sampling run, or None when the switch is
        off. Computed eagerly, outside any compiled/graphed region, so CUDA graphs never own these tensors."""
        if visual is None or not self.speed.cache_visual_kv:
            return None
        return tuple(a.visual_kv(visual) for a in self.adapters)

    def noise_predictor(self):
        """What the sampler calls for eps: predict_noise, or its CUDA-graph replay when switched on."""
        return self._graphed_predict_noise or self.predict_noise

    # --- conditioning ---------------------------------------------------------------------------------
    def encode_references(self, refs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """refs (B, N, 3, H, W) in [0, 1] -> concept f_c (B, text_dim), visual tokens f_p (B, N*T, ctx_dim)."""
        b, n = refs.shape[:2]
        with self.frozen_compute():
            global_feat, tokens = self.image_encoder(refs.flatten(0, 1))
        concept = self.concept_head(global_feat.view(b, n, -1))
        visual = self.patch_head.encode(tokens.view(b, n, *tokens.shape[1:]))
        return concept, visual

    def encode_prompts(self, prompts: list[str], concept: torch.Tensor | None = None,
                       alpha: float = 1.0) -> torch.Tensor:
        """Frozen text encoder(s), then the identifier's output embeddings := α·f_c (at every V̂ position; with
        two encoders f_c spans both: it replaces V̂'s states in each)."""
        tokenized = [tokenize_with_identifier(tok, prompts, self.identifier) for tok in self.ldm.tokenizers]
        where = tokenized[0][1]  # SDXL's two tokenizers split a prompt alike (one BPE vocabulary); only padding differs
        device = self.device
        with torch.no_grad(), self.frozen_compute():
            text = self._zeroed_if_empty(prompts, self.ldm.encode_text([ids.to(device) for ids, _ in tokenized]))
        if concept is None:
            return text
        injected = (alpha * concept).to(text.dtype)[:, None, :].expand_as(text)
        return torch.where(where.to(device)[..., None], injected, text)

    def encode_added(self, prompts: list[str], size: tuple[int, int],
                     crops: torch.Tensor | None = None) -> dict[str, torch.Tensor] | None:
        """SDXL's added conditioning, None for one-encoder families.
        text_embeds: the pooled embedding of each prompt with V̂ taken out. The pooled output reads every
            token, and V̂'s input embedding is an untrained word: taken out, the pooled vector says what the
            prompt says about the class and scene, and only f_c and the adapters carry the subject.
        time_ids (B, 6): original height and width, crop top and left, target height and width. crops (B, 4):
            each image's original size and crop top-left as the data pipeline applied them (training); None:
            an uncropped image at the target `size` (sampling)."""
        if not self.ldm.added_conditioning:
            return None
        tok, device = self.ldm.tokenizer_2, self.device
        ids = tok([strip_identifier(p, self.identifier) for p in prompts], padding="max_length",
                  max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad(), self.frozen_compute():
            pooled = self._zeroed_if_empty(prompts, self.ldm.encode_pooled(ids.to(device)))
        h, w = size
        if crops is None:
            crops = torch.tensor([[h, w, 0, 0]]).expand(len(prompts), 4)
        time_ids = torch.cat([crops.to(device, torch.float32), torch.tensor([[h, w]], device=device).expand(len(prompts), 2)], 1)
        return {"text_embeds": pooled, "time_ids": time_ids}

    def _zeroed_if_empty(self, prompts: list[str], x: torch.Tensor) -> torch.Tensor:
        """SDXL's unconditional input is zeros, not the encoded empty prompt (its released base's setting,
        diffusers' force_zeros_for_empty_prompt): condition dropout in training and guidance's unconditional
        branch both get it. One-encoder families keep the encoded empty prompt."""
        if not self.ldm.added_conditioning:
            return x
        empty = torch.tensor([p == "" for p in prompts], device=x.device).view(-1, *[1] * (x.ndim - 1))
        return torch.where(empty, torch.zeros_like(x), x)

    def predict_noise(self, noisy: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                      visual: torch.Tensor | None, beta, visual_kv: tuple | None = None,
                      skip_rows: int = 0, added: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """skip_rows: the first rows of the batch are the plain frozen model (visual has the others only).
        added: SDXL's added conditioning (encode_added)."""
        unet = self.ldm.unet
        if added is not None:
            added = {k: v.to(unet.dtype) for k, v in added.items()}
        with self.frozen_compute():
            return unet(noisy.to(unet.dtype), t, encoder_hidden_states=text.to(unet.dtype),
                        cross_attention_kwargs=adapter_kwargs(visual, beta, visual_kv, skip_rows),
                        added_cond_kwargs=added).sample

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        with self.frozen_compute():
            return self.ldm.decode_latents(latents)

    # --- training objective ---------------------------------------------------------------------------
    def training_loss(self, images: torch.Tensor, refs: torch.Tensor, captions: list[str],
                      beta: float = 1.0, cond_dropout: float = 0.0, latents: torch.Tensor | None = None,
                      crops: torch.Tensor | None = None, snr_gamma: float | None = None) -> torch.Tensor:
        """Denoising loss on the full, unmasked target; refs are the augmented, masked object crops.
        latents: the images' VAE latents when precomputed into the shards (the VAE encode is then skipped).
        crops (B, 4): original height, width, crop top, left of each target (SDXL's size conditioning).
        snr_gamma: Min-SNR-γ weighting (Hang et al. 2023), each sample's loss times min(SNR, γ) / SNR (/ (SNR + 1)
        for v-prediction); None: the plain mean, the paper's. A small γ trains mostly where noise hides the
        object, which is where the references decide what is drawn."""
        sched = self.ldm.noise_scheduler
        if latents is None:
            with self.frozen_compute():
                latents = self.ldm.encode_images(images)
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy = sched.add_noise(latents, noise, t)
        concept, visual = self.encode_references(refs)

        # Condition dropout trains the unconditional branch that guidance uses at sampling time.
        drop = torch.rand(len(captions)) < cond_dropout
        prompts = ["" if d else c for d, c in zip(drop.tolist(), captions)]
        text = self.encode_prompts(prompts, concept)
        beta_per_sample = torch.full((len(captions), 1, 1), float(beta), device=latents.device)
        if not self.uncond_adapters:
            beta_per_sample[drop.to(latents.device)] = 0.0
        added = self.encode_added(prompts, tuple(images.shape[-2:]), crops)
        pred = self.predict_noise(noisy, t, text, visual, beta_per_sample if drop.any() else beta, added=added)

        if sched.config.prediction_type == "v_prediction":
            target = sched.get_velocity(latents, noise, t)
        else:
            target = noise
        if snr_gamma is None:
            return F.mse_loss(pred.float(), target.float())
        weight = min_snr_weights(sched, t, snr_gamma)
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
        return (per_sample * weight).mean()


def min_snr_weights(scheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ (Hang et al. 2023): each sample's loss weight, min(SNR, γ) / SNR (/ (SNR + 1) for v-prediction)."""
    snr = compute_snr(scheduler, t)
    return snr.clamp(max=gamma) / (snr + 1 if scheduler.config.prediction_type == "v_prediction" else snr)

"""InstantBooth as a plain nn.Module: frozen LDM + frozen image backbone + the trained heads and adapters."""
import torch
import torch.nn.functional as F
from torch import nn

from ib.models.adapter import adapter_kwargs, install_adapters
from ib.models.frozen_ldm import FrozenLDM, LDMConfig
from ib.models.heads import ConceptHead, PatchHead
from ib.models.identifier import tokenize_with_identifier
from ib.models.image_encoder import FrozenImageEncoder, ImageEncoderConfig
from ib.models.speed import frozen_compute

TRAINABLE_PREFIXES = ("concept_head.", "patch_head.", "adapters.")


class InstantBooth(nn.Module):
    """
    identifier: the word V̂ in prompts whose text-encoder outputs are replaced by the concept embedding.
    uncond_adapters: what classifier-free guidance's unconditional branch sees. It always gets the empty
        prompt (so no concept token); with True it keeps the adapters and visual tokens, so guidance
        pushes towards the prompt only; with False it is the plain frozen model, so guidance pushes
        towards prompt and identity together. Training's condition dropout teaches the same choice.
    """

    def __init__(self, ldm: FrozenLDM, image_encoder: FrozenImageEncoder, identifier: str = "sks",
                 uncond_adapters: bool = True):
        super().__init__()
        self.ldm = ldm
        self.image_encoder = image_encoder
        self.identifier = identifier
        self.uncond_adapters = uncond_adapters
        context_dim = ldm.unet.config.cross_attention_dim
        self.concept_head = ConceptHead(image_encoder.global_dim, ldm.text_width)
        self.patch_head = PatchHead(image_encoder.token_dim, context_dim)
        self.adapters = install_adapters(ldm.unet, context_dim)

    @classmethod
    def from_config(cls, ldm: LDMConfig, image_encoder: ImageEncoderConfig, **kwargs) -> "InstantBooth":
        return cls(FrozenLDM.from_config(ldm), FrozenImageEncoder(image_encoder), **kwargs)

    # --- the trainable part -------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith(TRAINABLE_PREFIXES)}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        heads = list(self.concept_head.parameters()) + list(self.patch_head.parameters())
        return {"heads": heads, "adapters": list(self.adapters.parameters())}

    # --- conditioning ---------------------------------------------------------------------------------
    def encode_references(self, refs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """refs (B, N, 3, H, W) in [0, 1] -> concept f_c (B, text_dim), visual tokens f_p (B, N*T, ctx_dim)."""
        b, n = refs.shape[:2]
        with frozen_compute(self):
            global_feat, tokens = self.image_encoder(refs.flatten(0, 1))
        concept = self.concept_head(global_feat.view(b, n, -1))
        visual = self.patch_head(tokens.view(b, n, *tokens.shape[1:]))
        return concept, visual

    def encode_prompts(self, prompts: list[str], concept: torch.Tensor | None = None,
                       alpha: float = 1.0) -> torch.Tensor:
        """Frozen text encoder, then the identifier's output embeddings := α·f_c (at every V̂ position)."""
        ids, where = tokenize_with_identifier(self.ldm.tokenizer, prompts, self.identifier)
        device = self.concept_head.proj.weight.device
        with torch.no_grad(), frozen_compute(self):
            text = self.ldm.text_encoder(ids.to(device))[0]
        if concept is None:
            return text
        injected = (alpha * concept).to(text.dtype)[:, None, :].expand_as(text)
        return torch.where(where.to(device)[..., None], injected, text)

    def predict_noise(self, noisy: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                      visual: torch.Tensor | None, beta, visual_kv: tuple | None = None,
                      skip_rows: int = 0) -> torch.Tensor:
        """skip_rows: the first rows of the batch are the plain frozen model (visual has the others only)."""
        unet = self.ldm.unet
        with frozen_compute(self):
            return unet(noisy.to(unet.dtype), t, encoder_hidden_states=text.to(unet.dtype),
                        cross_attention_kwargs=adapter_kwargs(visual, beta, visual_kv, skip_rows)).sample

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        with frozen_compute(self):
            return self.ldm.decode_latents(latents)

    # --- training objective ---------------------------------------------------------------------------
    def training_loss(self, images: torch.Tensor, refs: torch.Tensor, captions: list[str],
                      beta: float = 1.0, cond_dropout: float = 0.0, latents: torch.Tensor | None = None) -> torch.Tensor:
        """Denoising loss on the full, unmasked target; refs are the augmented, masked object crops.
        latents: the images' VAE latents when precomputed into the shards (the VAE encode is then skipped)."""
        sched = self.ldm.noise_scheduler
        if latents is None:
            with frozen_compute(self):
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
        pred = self.predict_noise(noisy, t, text, visual, beta_per_sample if drop.any() else beta)

        if sched.config.prediction_type == "v_prediction":
            target = sched.get_velocity(latents, noise, t)
        else:
            target = noise
        return F.mse_loss(pred.float(), target.float())

"""Trains the tiny text-to-image latent diffusion model itself on the synthetic world (issue: a base model
worth freezing). Phase 1 trains the VAE (reconstruction + a small KL), phase 2 the UNet on its latents
(ε-prediction, optionally Min-SNR-γ weighted; caption dropout for CFG; shares of the captions with the
identifier, identifier_prob, or with the concept's look in words, description_prob). The text encoder stays
random and frozen. At the end the whole model is saved in diffusers layout (its vocabulary
cut to the world's words: experiments/toy/vocabulary.py), ready for `model.ldm.pretrained`, in `save_dtype`
(bf16 halves the stored size; the loader computes in float32 again), with record.json beside it: how it was
made (command, seed, commit) and its final validation losses.
"""
import copy
import json
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from ib.allow_list import dataclass_from
from ib.atomic_write import atomic_folder
from ib.models.frozen_ldm import FrozenLDM, LDMConfig
from ib.identifier import replace_identifier, strip_identifier
from ib.models.instantbooth import min_snr_weights
from data_tools.synthetic_world import describe
from experiments.toy.vocabulary import WORLD_TEXTS, prune_vocabulary, world_texts


class ToyBaseModule(L.LightningModule):
    def __init__(self, ldm: LDMConfig, output_dir: str, identifier: str = "sks", vae_steps: int = 1000,
                 lr_vae: float = 1e-3, lr_unet: float = 5e-4, kl_weight: float = 1e-6, caption_dropout: float = 0.1,
                 identifier_prob: float = 0.0, description_prob: float = 0.0, concepts_file: str | None = None,
                 snr_gamma: float | None = None, save_dtype: str = "bfloat16"):
        super().__init__()
        ldm = ldm if isinstance(ldm, LDMConfig) else dataclass_from(LDMConfig, ldm, "model.ldm")  # from a checkpoint
        self.save_hyperparameters({"ldm": asdict(ldm), "output_dir": output_dir, "identifier": identifier,
                                   "vae_steps": vae_steps, "lr_vae": lr_vae, "lr_unet": lr_unet,
                                   "kl_weight": kl_weight, "caption_dropout": caption_dropout,
                                   "identifier_prob": identifier_prob, "description_prob": description_prob,
                                   "concepts_file": concepts_file, "snr_gamma": snr_gamma, "save_dtype": save_dtype})
        if save_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"model.save_dtype: float32, bfloat16 or float16, got {save_dtype}")
        self.automatic_optimization = False  # two phases, two optimizers
        self.ldm = FrozenLDM.from_config(ldm)
        self.ldm.vae.requires_grad_(True)
        self.ldm.unet.requires_grad_(True)
        self.output_dir, self.identifier = Path(output_dir), identifier
        self.vae_steps, self.kl_weight, self.caption_dropout = vae_steps, kl_weight, caption_dropout
        self.identifier_prob, self.description_prob = identifier_prob, description_prob
        self.descriptions = _descriptions(concepts_file) if description_prob > 0 else {}
        # Latent std measured when phase 2 starts; a buffer so that it survives checkpoints.
        self.register_buffer("latent_scale", torch.tensor(0.0))

    def configure_optimizers(self):
        h = self.hparams
        return [torch.optim.AdamW(self.ldm.vae.parameters(), lr=h.lr_vae),
                torch.optim.AdamW(self.ldm.unet.parameters(), lr=h.lr_unet)]

    def _vae_loss(self, images):
        dist = self.ldm.vae.encode(images * 2 - 1).latent_dist
        recon = self.ldm.vae.decode(dist.sample()).sample
        return F.l1_loss(recon, images * 2 - 1) + F.mse_loss(recon, images * 2 - 1) + self.kl_weight * dist.kl().mean()

    def _unet_loss(self, images, captions, concepts):
        with torch.no_grad():
            latents = self.ldm.vae.encode(images * 2 - 1).latent_dist.sample()
            if self.latent_scale == 0:
                self.latent_scale.fill_(1.0 / latents.std())
            latents = latents * self.latent_scale
        prompts = [self._prompt(c, k) for c, k in zip(captions, concepts)]
        ids = self.ldm.tokenizer(prompts, padding="max_length", max_length=self.ldm.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(self.device)
        with torch.no_grad():
            text = self.ldm.text_encoder(ids)[0]
        sched = self.ldm.noise_scheduler
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(latents),), device=self.device)
        pred = self.ldm.unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=text).sample
        if self.hparams.snr_gamma is None:
            return F.mse_loss(pred, noise)
        weight = min_snr_weights(sched, t, self.hparams.snr_gamma)  # the noisy steps, where the caption decides, weigh more
        return ((pred - noise) ** 2).mean(dim=(1, 2, 3)).mul(weight).mean()

    def _prompt(self, caption: str, concept: str) -> str:
        """The empty prompt (caption dropout); with probability description_prob the concept's look in words where
        the identifier stands ('a photo of a pink and black striped ball'); else the caption as InstantBooth writes
        it (identifier before the noun; with probability identifier_prob) or without the identifier.
        InstantBooth's prompts always hold the identifier: a base that never read it draws the wrong class after
        it, because the random text encoder's later states all read that word. A base that never read a look in
        words has nothing the concept token could say: the token is one text state, and the base must have learnt
        to draw what such a state describes (a real base has, from its captions)."""
        if torch.rand(()) < self.caption_dropout:
            return ""
        if torch.rand(()) < self.description_prob:
            return replace_identifier(caption, self.identifier, self.descriptions[concept])
        return caption if torch.rand(()) < self.identifier_prob else strip_identifier(caption, self.identifier)

    def training_step(self, batch, batch_idx):
        vae_opt, unet_opt = self.optimizers()
        phase_vae = self.global_step < self.vae_steps
        opt = vae_opt if phase_vae else unet_opt
        loss = self._vae_loss(batch["image"]) if phase_vae else self._unet_loss(batch["image"], batch["caption"], batch["concept"])
        opt.zero_grad()
        self.manual_backward(loss)
        self.clip_gradients(opt, gradient_clip_val=1.0)
        opt.step()
        self.log("train/vae_loss" if phase_vae else "train/unet_loss", loss, prog_bar=True, batch_size=len(batch["image"]))

    def validation_step(self, batch, batch_idx):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(batch_idx)
            self.log("val/vae_loss", self._vae_loss(batch["image"]), batch_size=len(batch["image"]))
            if self.latent_scale > 0:
                self.log("val/unet_loss", self._unet_loss(batch["image"], batch["caption"], batch["concept"]), batch_size=len(batch["image"]))

    def save_base(self, record: dict) -> None:
        """The trained model in diffusers layout, plus record.json (`record` and what this run measured); called
        after fit, also when a resumed run had nothing left. The folder is replaced whole."""
        if self.latent_scale == 0:
            raise RuntimeError("the UNet phase never started: raise trainer.max_steps above model.vae_steps")
        ldm = copy.deepcopy(self.ldm).to(getattr(torch, self.hparams.save_dtype))
        ldm.vae.register_to_config(scaling_factor=float(self.latent_scale))
        tokens = prune_vocabulary(ldm, world_texts(self.identifier))  # the words it was trained on: a smaller base
        metrics = {k: round(float(v), 5) for k, v in self.trainer.callback_metrics.items() if k.startswith("val/")}
        with atomic_folder(self.output_dir) as tmp:
            ldm.save_pretrained(tmp)
            (tmp / "record.json").write_text(json.dumps(
                {**record, "steps": self.global_step, "dtype": self.hparams.save_dtype, "validation": metrics,
                 "hparams": {k: v for k, v in self.hparams.items() if k != "ldm"},
                 "vocabulary": {"tokens": tokens, "texts": WORLD_TEXTS}}, indent=1) + "\n")
        print(f"toy base model saved to {self.output_dir}")


def _descriptions(concepts_file: str | None) -> dict[str, str]:
    """Concept name -> its look in words, from the synthetic world's concepts.json."""
    if not concepts_file or not Path(concepts_file).is_file():
        raise ValueError(f"model.concepts_file: the synthetic world's concepts.json is needed with "
                         f"model.description_prob > 0, got {concepts_file}")
    return {spec["concept"]: describe(spec) for spec in json.loads(Path(concepts_file).read_text())}

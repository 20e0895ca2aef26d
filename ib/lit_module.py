"""The LightningModule: wiring only. The maths lives in ib.models."""
from dataclasses import asdict, dataclass
from typing import Annotated

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torchvision.utils import make_grid

from ib.errors import ConfigError
from ib.models.frozen_ldm import LDMConfig
from ib.models.image_encoder import ImageEncoderConfig
from ib.models.instantbooth import InstantBooth
from ib.models.sampler import SamplingConfig
from ib.models.speed import SpeedConfig, check_speed
from ib.nonfinite import NonFiniteGuard
from ib.pipeline import InstantBoothPipeline, generate
from ib.ranges import LearningRate, NonNegativeFloat, NonNegativeInt, PositiveInt, Probability, Range, check_arguments
from ib.weights import load_trainable


@dataclass
class OptimConfig:
    """AdamW with one learning rate for the two heads and one for the adapters (paper: 1e-4 / 1e-6)."""
    lr_heads: LearningRate = 1e-4
    lr_adapters: LearningRate = 1e-6
    weight_decay: NonNegativeFloat = 0.0
    warmup_steps: NonNegativeInt = 0


def _as(cls, value):
    """Configs arrive as dataclasses from the CLI and as dicts from a checkpoint's hyper-parameters."""
    return value if isinstance(value, cls) else cls(**(value or {}))


def other_concept(concepts: list[str]) -> torch.Tensor | None:
    """For each sample, the index of the next sample (cyclically) of another concept; None if all are one."""
    n = len(concepts)
    partner = [next((j % n for j in range(i + 1, i + n) if concepts[j % n] != concepts[i]), None) for i in range(n)]
    return None if None in partner else torch.tensor(partner)


class InstantBoothModule(L.LightningModule):
    """
    beta_train: adapter strength in training (1.0 in the paper).
    cond_dropout: probability of training a sample as the guidance's unconditional branch.
    sampling: the sampler settings used for validation images.
    max_nonfinite_steps: this many optimizer steps in a row skipped for a non-finite loss stop training.
    speed: training/sampling speed switches (ib/models/speed.py); all off by default.
    adapter_blocks: the UNet transformer blocks that get an adapter, by module-path prefix; null: all of them.
    adapter_gate_init: the adapters' gate γ when training starts (0 in the paper: the frozen model at step 0).
    snr_gamma: Min-SNR-γ loss weighting in training (InstantBooth.training_loss); null: the plain loss, the paper's.
    """

    def __init__(self, ldm: LDMConfig, image_encoder: ImageEncoderConfig, identifier: str = "sks",
                 uncond_adapters: bool = True, optim: OptimConfig = OptimConfig(),
                 beta_train: Annotated[float, Range(gt=0, le=1)] = 1.0,  # 0 switches the adapters off: nothing to train
                 cond_dropout: Probability = 0.1, sampling: SamplingConfig = SamplingConfig(), val_seed: int = 0,
                 max_nonfinite_steps: PositiveInt = 10, speed: SpeedConfig = SpeedConfig(),
                 adapter_blocks: list[str] | None = None,
                 adapter_gate_init: Annotated[float, Range(ge=0, le=3)] = 0.0,  # tanh(γ) saturates above ~3
                 snr_gamma: Annotated[float, Range(gt=0)] | None = None):
        check_arguments(InstantBoothModule, locals(), "model.")
        super().__init__()
        ldm, image_encoder = _as(LDMConfig, ldm), _as(ImageEncoderConfig, image_encoder)
        self.optim, self.sampling = _as(OptimConfig, optim), _as(SamplingConfig, sampling)
        self.speed = _as(SpeedConfig, speed)
        if not identifier.strip():
            raise ConfigError("model.identifier: must not be empty")
        # Plain dicts only: checkpoints load with weights_only=True and rebuild the frozen parts from these.
        self.save_hyperparameters({
            "ldm": asdict(ldm), "image_encoder": asdict(image_encoder), "identifier": identifier,
            "uncond_adapters": uncond_adapters, "optim": asdict(self.optim), "beta_train": beta_train,
            "cond_dropout": cond_dropout, "sampling": asdict(self.sampling), "val_seed": val_seed,
            "max_nonfinite_steps": max_nonfinite_steps,
            "speed": asdict(self.speed), "adapter_blocks": adapter_blocks, "adapter_gate_init": adapter_gate_init,
            "snr_gamma": snr_gamma,
        })
        self.beta_train, self.cond_dropout, self.val_seed = beta_train, cond_dropout, val_seed
        self.snr_gamma = snr_gamma
        self.nonfinite = NonFiniteGuard(max_nonfinite_steps)
        self.skipped_samples = 0  # this rank's count; rank 0 also carries the total of the resumed checkpoint
        self.model = InstantBooth.from_config(ldm, image_encoder, identifier=identifier,
                                              uncond_adapters=uncond_adapters, speed=self.speed,
                                              adapter_blocks=adapter_blocks, gate_init=adapter_gate_init)

    @property
    def reference_size(self) -> int:
        """The image encoder's input size: what the DataModule crops references to (linked by the CLI)."""
        return self.model.image_encoder.image_size[0]

    def setup(self, stage: str):
        # The switches against the device and precision: the CLI checked them before anything was written
        # (ib.config_checks); checked again here for modules built in code.
        check_speed(self.speed, self.trainer.strategy.root_device.type, self.trainer.precision)

    # --- steps ------------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        loss = self.model.training_loss(batch["image"], batch["refs"], batch["caption"],
                                        beta=self.beta_train, cond_dropout=self.cond_dropout,
                                        latents=self._precomputed_latents(batch), crops=batch.get("crop"),
                                        snr_gamma=self.snr_gamma)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["caption"]))
        if "skipped" in batch:  # bad samples the loader skipped (counted in its workers), summed over ranks
            self.skipped_samples += int(batch["skipped"])
            self.log("data/skipped_samples", float(self.skipped_samples), reduce_fx="sum", sync_dist=True,
                     batch_size=len(batch["caption"]))
        return loss

    def _precomputed_latents(self, batch) -> torch.Tensor | None:
        """A posterior sample from the VAE moments stored in the shards (data_tools.encode_latents), if any."""
        moments = batch.get("latent_moments")
        if moments is None:
            return None
        ldm = self.model.ldm
        factor = ldm.vae_scale_factor
        want = (2 * ldm.vae.config.latent_channels, batch["image"].shape[-2] // factor, batch["image"].shape[-1] // factor)
        if tuple(moments.shape[1:]) != want:
            raise ConfigError(f"data.train_shards: latents.npy moments {tuple(moments.shape[1:])} do not fit this "
                              f"VAE at data.image_size {batch['image'].shape[-1]} (need {want}); re-run "
                              "data_tools.encode_latents with this config")
        return self.model.ldm.latents_from_moments(moments)

    def validation_step(self, batch, batch_idx):
        # The same loss with another concept's references (loss_shuffled) shows how much the model takes from its
        # references; both see the same noise and timesteps.
        n = len(batch["caption"])
        loss = self._fixed_noise_loss(batch, batch["refs"], batch_idx)
        self.log("val/loss_own", loss, prog_bar=True, sync_dist=True, batch_size=n)
        partner = other_concept(batch["concept"])
        if partner is not None:
            shuffled = self._fixed_noise_loss(batch, batch["refs"][partner], batch_idx)
            self.shuffled_loss += torch.stack([shuffled.detach() * n, torch.tensor(float(n), device=self.device)])
        return loss

    def _fixed_noise_loss(self, batch, refs, batch_idx):
        """Fixed noise and timesteps per batch: validation curves compare like with like. Unweighted (whatever
        model.snr_gamma): val/loss_* mean the same across runs."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.val_seed + batch_idx)
            return self.model.training_loss(batch["image"], refs, batch["caption"], beta=self.beta_train,
                                            crops=batch.get("crop"))

    def on_validation_epoch_start(self):
        self.shuffled_loss = torch.zeros(2, device=self.device)  # this rank's (sum, count)

    def on_validation_epoch_end(self):
        # Summed here, not by self.log: a rank whose batches each hold a single concept has nothing to log,
        # and every rank must still meet in the same collective.
        total, count = self.trainer.strategy.reduce(self.shuffled_loss, reduce_op="sum").tolist()
        if count > 0:
            self.log("val/loss_shuffled", total / count)

    @torch.no_grad()
    def log_images(self, batch, max_images: int = 4) -> dict[str, torch.Tensor]:
        """Reference | generated pairs for the first images of `batch`, fixed seeds; a grid per name."""
        n = min(max_images, len(batch["caption"]))
        refs = batch["refs"][:n].to(self.device)
        pipe = InstantBoothPipeline.from_model(self.model, self.sampling.scheduler)
        generated = generate(pipe, refs, batch["caption"][:n], self.sampling, seeds=[self.val_seed + i for i in range(n)])
        ref_view = torch.nn.functional.interpolate(refs[:, 0], size=generated.shape[-2:], mode="bilinear")
        pairs = torch.stack([ref_view.float(), batch["image"][:n].to(generated), generated], dim=1).flatten(0, 1)
        return {"reference_target_generated": make_grid(pairs.cpu(), nrow=3, padding=2)}

    # --- optimisation -------------------------------------------------------------------------------------
    def configure_optimizers(self):
        groups = self.model.param_groups()
        o = self.optim
        optimizer = torch.optim.AdamW([
            {"params": groups["heads"], "lr": o.lr_heads, "name": "heads"},
            {"params": groups["adapters"], "lr": o.lr_adapters, "name": "adapters"},
        ], weight_decay=o.weight_decay, fused=self.speed.fused_optimizer or None)
        warmup = max(1, o.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self):
        # A resumed run gets the optimizer and scheduler of its checkpoint, learning rates included: apply the
        # config's instead, so changing them on resume works, and say so.
        optimizer = self.trainer.optimizers[0]
        scheduler = self.trainer.lr_scheduler_configs[0].scheduler
        configured = {"heads": self.optim.lr_heads, "adapters": self.optim.lr_adapters}
        for i, group in enumerate(optimizer.param_groups):
            lr, was = configured[group["name"]], scheduler.base_lrs[i]
            if lr != was or group["weight_decay"] != self.optim.weight_decay:
                rank_zero_info(f"model.optim: {group['name']} learning rate {was:g} -> {lr:g}, weight decay "
                               f"{group['weight_decay']:g} -> {self.optim.weight_decay:g} from step {self.global_step}")
            scheduler.base_lrs[i] = group["initial_lr"] = lr
            group["lr"] = lr * scheduler.lr_lambdas[i](scheduler.last_epoch)
            group["weight_decay"] = self.optim.weight_decay

    def on_before_optimizer_step(self, optimizer):
        # Gradients are final here (after DDP's all-reduce, before clipping): skip the step if non-finite.
        self.nonfinite.check(optimizer, self.global_step + 1)
        self.log("train/nonfinite_steps", float(self.nonfinite.total))

    # --- checkpoints: trainable weights only; frozen parts are rebuilt from the config ---------------------
    def on_save_checkpoint(self, checkpoint):
        checkpoint["state_dict"] = {f"model.{k}": v for k, v in self.model.trainable_state_dict().items()}
        checkpoint["nonfinite_steps"] = self.nonfinite.total
        # Every rank's count summed (in a Trainer this hook runs on all ranks); a resumed rank 0 carries it on.
        total = float(self.skipped_samples)
        if self._trainer is not None:
            total = self.trainer.strategy.reduce(torch.tensor(total, device=self.device), reduce_op="sum").item()
        checkpoint["skipped_samples"] = int(total)

    def on_load_checkpoint(self, checkpoint):
        self.nonfinite.total = checkpoint.get("nonfinite_steps", 0)
        rank_zero = self._trainer is None or self.trainer.is_global_zero
        self.skipped_samples = checkpoint.get("skipped_samples", 0) if rank_zero else 0

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        state = {k.removeprefix("model."): v for k, v in state_dict.items()}
        load_trainable(self.model, state, "checkpoint")

"""Full Stable Diffusion 1.5 + ViT-L/14 architecture with random weights, on CPU."""
import signal

import pytest
import torch
import yaml

from ib.models.frozen_ldm import LDMConfig
from ib.models.image_encoder import ImageEncoderConfig
from ib.models.instantbooth import InstantBooth
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def adapter_params(width: int, context: int) -> int:
    # proj (context->width, bias) + LayerNorm + q, k, v (no bias) + out (bias) + gate
    return context * width + width + 2 * width + 4 * width * width + width + 1


@torch.no_grad()
def test_sd15_architecture_with_adapters():
    m = yaml.safe_load((ROOT / "conf" / "sd15.yaml").read_text())["model"]
    ldm = LDMConfig(**dict(m["ldm"], pretrained=None))
    enc = ImageEncoderConfig(**dict(m["image_encoder"], pretrained=None))
    model = InstantBooth.from_config(ldm, enc)

    assert len(model.adapters) == 16  # one per UNet transformer block of SD 1.5
    widths = [a.norm.normalized_shape[0] for a in model.adapters]
    assert sorted(widths) == sorted([320] * 5 + [640] * 5 + [1280] * 6)
    expected = sum(adapter_params(w, 768) for w in widths)
    expected += 768 * 768 + 768                      # concept head: ViT-L/14 global (768) -> text width 768
    expected += 2 * 1024 + 1024 * 768 + 768          # patch head: LayerNorm + ViT-L/14 tokens (1024) -> 768
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected == 60_576_016

    refs = torch.rand(1, 2, 3, 224, 224)
    concept, visual = model.encode_references(refs)
    assert concept.shape == (1, 768) and visual.shape == (1, 2 * 257, 768)  # 257 tokens per ViT-L/14 reference
    with torch.no_grad():
        for a in model.adapters:
            a.gate.fill_(0.1)
    text = model.encode_prompts(["a photo of a sks dog"], concept)
    latents = torch.randn(1, 4, 16, 16)  # 128 px: enough to pass every block, cheap on CPU
    eps = model.predict_noise(latents, torch.tensor([500]), text, visual, 1.0)
    plain = model.predict_noise(latents, torch.tensor([500]), text, None, 0.0)
    assert eps.shape == latents.shape and torch.isfinite(eps).all() and not torch.allclose(eps, plain)


def test_sd15_configs_parse_into_a_trainer_with_the_reliability_parts_and_metrics(synthetic_shards, monkeypatch):
    """conf/sd15.yaml alone and with conf/random_weights.yaml go through the real CLI into a Trainer: atomic
    checkpoints, RNG state, the SLURM requeue signal (from the shared conf/trainer/default.yaml) and, with real
    weights, the identity metrics; the overlay keeps every callback but the metrics (its towers would need
    weights). The 1.43 B-parameter model itself is test_sd15_architecture_with_adapters' (built once per suite):
    here the tiny one stands in for it."""
    from tests.conftest import default_config
    tiny, build = default_config()["model"], InstantBooth.from_config
    monkeypatch.setattr(InstantBooth, "from_config", lambda ldm, image_encoder, **kwargs: build(
        LDMConfig(**tiny["ldm"]), ImageEncoderConfig(**tiny["image_encoder"]), **kwargs))
    from lightning.pytorch.callbacks import LearningRateMonitor

    from ib.callbacks.checkpoint import RunCheckpoint
    from ib.callbacks.identity_eval import IdentityEval
    from ib.callbacks.image_logger import ImageLogger
    from ib.callbacks.rng_state import RNGState
    from ib.checkpoint_io import SafeCheckpointIO
    from ib.fit_cli import InstantBoothCLI
    from ib.data.datamodule import InstantBoothDataModule
    from ib.lit_module import InstantBoothModule

    sd15 = yaml.safe_load((ROOT / "conf" / "sd15.yaml").read_text())
    metrics = sd15["identity_eval"]["init_args"]
    assert metrics["clip"]["pretrained"] == "openai" and metrics["dino"]["weights"].endswith("dino_deitsmall16_pretrain.pth")
    assert yaml.safe_load((ROOT / "conf" / "random_weights.yaml").read_text())["identity_eval"] is None

    cli = InstantBoothCLI(InstantBoothModule, InstantBoothDataModule, run=False, save_config_callback=None,
                          args=["--config", str(ROOT / "conf" / "sd15.yaml"), "--config", str(ROOT / "conf" / "random_weights.yaml"),
                                "--trainer.accelerator", "cpu", "--data.train_shards", str(synthetic_shards / "train"),
                                "--data.val_shards", str(synthetic_shards / "val")])
    kinds = {type(c) for c in cli.trainer.callbacks}
    assert {RNGState, LearningRateMonitor, ImageLogger, RunCheckpoint} <= kinds and IdentityEval not in kinds
    checkpoint = cli.trainer.checkpoint_callback
    assert checkpoint.signals.requeue_signum == signal.SIGUSR1 and cli.config.checkpoint.every_n_train_steps == 5000
    assert isinstance(cli.trainer.strategy.checkpoint_io, SafeCheckpointIO)
    assert cli.model.speed.native_frozen_compute is True

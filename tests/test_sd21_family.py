"""The SD 2.x family (v-prediction, a wider GELU text encoder, linear transformer projections) through the same
code as SD 1.x: the tiny overlay conf/tiny_sd21.yaml end to end, and conf/sd21.yaml's shapes."""
import pytest
import torch

from ib.cli import main
from ib.fit_cli import InstantBoothCLI
from ib.data.datamodule import InstantBoothDataModule
from ib.lit_module import InstantBoothModule
from ib.models.instantbooth import InstantBooth
from ib.models.sampler import SamplingConfig
from ib.pipeline import InstantBoothPipeline, seeded
from ib.weights import load_model
from tests.conftest import ROOT, build_family_model, run_config
from tests.test_adapters import assert_zero_init_is_the_frozen_unet
from tests.test_pipeline import PROMPT, assert_beta_zero_without_identifier_equals_stable_diffusion, trained_like

TINY_SD21 = ROOT / "conf" / "tiny_sd21.yaml"


def build(seed: int = 0) -> InstantBooth:
    return build_family_model(TINY_SD21, seed)


@pytest.fixture(scope="module")
def model():
    return trained_like(build())


def test_the_tiny_model_has_the_family_traits(model):
    ldm = model.ldm
    assert ldm.noise_scheduler.config.prediction_type == "v_prediction"
    assert ldm.unet.config.use_linear_projection and ldm.text_encoder.config.hidden_act == "gelu"
    assert model.concept_head.proj.out_features == ldm.text_width == 48  # f_c replaces a 48-wide text state
    assert {a.norm.normalized_shape[0] for a in model.adapters} == {32, 64} and len(model.adapters) == 7  # 2 down, 1 mid, 4 up blocks
    assert InstantBoothPipeline.from_model(model).scheduler.config.prediction_type == "v_prediction"


def test_zero_init_adapters_are_bitwise_the_frozen_unet():
    assert_zero_init_is_the_frozen_unet(build())


@torch.no_grad()
def test_the_concept_replaces_the_identifier_at_every_position(model):
    concept = torch.randn(1, 48)
    text = model.encode_prompts(["a sks dog next to another sks dog"], concept, alpha=0.4)
    plain = model.encode_prompts(["a sks dog next to another sks dog"])
    replaced = (text != plain).any(-1)[0]
    assert replaced.sum() == 2
    assert torch.allclose(text[0, replaced], (0.4 * concept).expand(2, -1))


def assert_steps_change_the_trained_part_only(m: InstantBooth, **loss_kwargs) -> set[str]:
    """Two optimizer steps leave every frozen parameter bitwise as it was and move the trained ones.
    -> the frozen parameters' names."""
    # (the adapters and the patch head also sit inside the UNet, under its names: told apart by requires_grad)
    frozen = {k: p.detach().clone() for k, p in m.named_parameters() if not p.requires_grad}
    trainable = {k: p.detach().clone() for k, p in m.named_parameters() if p.requires_grad}
    assert len(frozen) > 100 and sum(v.numel() for v in trainable.values()) == sum(
        v.numel() for v in m.trainable_state_dict().values())
    optim = torch.optim.AdamW([p for group in m.param_groups().values() for p in group], lr=1e-2)
    torch.manual_seed(0)
    for _ in range(2):
        loss = m.training_loss(torch.rand(2, 3, 32, 32), torch.rand(2, 2, 3, 32, 32), ["a sks ball", "a sks box"],
                               **loss_kwargs)
        optim.zero_grad()
        loss.backward()
        optim.step()
    after = dict(m.named_parameters())
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert any(not torch.equal(after[k], v) for k, v in trainable.items())
    return set(frozen)


def test_training_steps_change_the_trained_part_only():
    assert_steps_change_the_trained_part_only(build())


def _velocity_oracle(model, clean: torch.Tensor, noise: torch.Tensor):
    """A UNet stand-in for the ideal model on one trajectory, x_t = √ᾱ_t·clean + √(1-ᾱ_t)·noise: it returns that
    trajectory's velocity at t, whatever its input (so a sampler that misreads it is not pulled back)."""
    alphas = model.ldm.noise_scheduler.alphas_cumprod

    def predict(noisy, t, *args, **kwargs):
        a = alphas[t.long()].view(-1, 1, 1, 1).to(noisy)
        return (a.sqrt() * noise - (1 - a).sqrt() * clean).expand_as(noisy)
    return predict


@torch.no_grad()
@pytest.mark.parametrize("scheduler", ["ddim", "dpm++"])
def test_the_sampler_reads_the_unet_output_as_velocity(model, photo_refs, scheduler, monkeypatch):
    """Started on the trajectory, with the ideal model's velocity, sampling lands on the clean latents; read as
    ε (the SD 1.x reading) the same outputs land elsewhere."""
    g = torch.Generator().manual_seed(5)
    clean, noise = torch.randn(1, 4, 8, 8, generator=g) * 0.5, torch.randn(1, 4, 8, 8, generator=g)
    monkeypatch.setattr(model, "predict_noise", _velocity_oracle(model, clean, noise))
    decoded = []
    monkeypatch.setattr(model, "decode_latents", lambda latents: decoded.append(latents) or torch.zeros(1, 3, 32, 32))

    def sample(prediction_type):
        pipe = InstantBoothPipeline.from_model(model, scheduler)
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction_type)
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler.set_timesteps(20)
        a = model.ldm.noise_scheduler.alphas_cumprod[pipe.scheduler.timesteps[0]]
        start = (a.sqrt() * clean + (1 - a).sqrt() * noise) / pipe.scheduler.init_noise_sigma
        pipe(PROMPT, photo_refs, num_inference_steps=20, guidance_scale=1.0, latents=start, output_type="pt")
        return (decoded.pop() - clean).abs().mean()
    as_velocity, as_noise = sample("v_prediction"), sample("epsilon")
    assert as_velocity < 0.02 and as_noise > 0.1, (float(as_velocity), float(as_noise))


@torch.no_grad()
def test_beta_zero_without_identifier_equals_diffusers_stable_diffusion(model, photo_refs):
    assert_beta_zero_without_identifier_equals_stable_diffusion(model, photo_refs)  # a v-prediction scheduler here


def assert_fit_resume_export_round_trip(tmp_path, shards, overlay) -> tuple[InstantBooth, InstantBoothPipeline]:
    """`ib fit` of the default config with a family's overlay, resumed, exported; the exported file's pipeline,
    saved and reloaded, samples exactly what the checkpoint's model does. -> (model, reloaded pipeline)."""
    config = run_config(tmp_path, shards, max_steps=2)
    fit = ["fit", "--config", str(config), "--config", str(overlay)]
    assert main(fit) == 0
    assert main([*fit, "--trainer.max_steps", "3", "--ckpt_path", "last"]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 3
    exported = tmp_path / "ib.safetensors"
    assert main(["export", "--ckpt", str(ckpt), "--out", str(exported)]) == 0

    model, hparams = load_model(str(ckpt))
    pipe = InstantBoothPipeline.from_weights(exported)
    trained_with = SamplingConfig(**hparams["sampling"])  # what the exported file carries as its defaults
    direct = InstantBoothPipeline.from_model(model, trained_with.scheduler, trained_with)
    refs = [torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    images = [p(PROMPT, refs, num_inference_steps=3, generator=seeded([1]), output_type="pt").images
              for p in (pipe, direct)]
    assert torch.equal(*images) and images[0].shape == (1, 3, 32, 32)
    pipe.save_pretrained(tmp_path / "pipe")
    reloaded = InstantBoothPipeline.from_pretrained(tmp_path / "pipe")
    assert torch.equal(reloaded(PROMPT, refs, num_inference_steps=3, generator=seeded([1]), output_type="pt").images,
                       images[0])
    return model, reloaded


@pytest.mark.slow
def test_fit_resume_export_and_pipeline_round_trip(tmp_path, synthetic_shards):
    model, reloaded = assert_fit_resume_export_round_trip(tmp_path, synthetic_shards, TINY_SD21)
    assert model.ldm.noise_scheduler.config.prediction_type == "v_prediction" and model.ldm.text_width == 48
    assert reloaded.scheduler.config.prediction_type == "v_prediction"


class _ParseOnly(InstantBoothCLI):
    def instantiate_classes(self):  # the configs as the CLI reads them, without building 1.3 B parameters
        pass


def parsed_overlay(overlay: str, random_weights: bool, shards):
    """The config `ib fit --config conf/sd15.yaml --config conf/OVERLAY [--config conf/random_weights.yaml]` reads."""
    overlays = [ROOT / "conf" / overlay, *([ROOT / "conf" / "random_weights.yaml"] if random_weights else [])]
    args = ["--config", str(ROOT / "conf" / "sd15.yaml"), *[a for o in overlays for a in ("--config", str(o))],
            "--trainer.accelerator", "cpu", "--data.train_shards", str(shards / "train"),
            "--data.val_shards", str(shards / "val")]
    return _ParseOnly(InstantBoothModule, InstantBoothDataModule, run=False, save_config_callback=None, args=args).config


@pytest.mark.parametrize("random_weights", [False, True])
def test_sd21_overlay_on_the_sd15_recipe(random_weights, synthetic_shards):
    cfg = parsed_overlay("sd21.yaml", random_weights, synthetic_shards)
    ldm = cfg.model.ldm
    assert ldm.pretrained == (None if random_weights else "stabilityai/stable-diffusion-2-1")
    assert (ldm.unet["cross_attention_dim"], ldm.unet["sample_size"], ldm.unet["use_linear_projection"]) == (1024, 96, True)
    assert (ldm.text_encoder["hidden_size"], ldm.text_encoder["num_hidden_layers"]) == (1024, 23)
    assert ldm.scheduler["prediction_type"] == "v_prediction"
    assert ldm.vae["block_out_channels"] == [128, 256, 512, 512]  # SD 1.5's VAE, which SD 2.x shares
    assert cfg.data.image_size == 768 and cfg.trainer.default_root_dir == "runs/sd21"
    assert cfg.model.optim.lr_heads == 1e-4  # the recipe is SD 1.5's


def test_the_family_sizes_bench_at_tiny_scale(tmp_path):
    """bench/family_sizes.py (the README's family table) through its CLI on the three tiny scales."""
    import json
    from bench.family_sizes import main as sizes_main
    assert sizes_main(["--scale", "tiny", "tiny_sd21", "tiny_sdxl", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("family_sizes-cpu-*.json")
    rows = json.loads(path.read_text())["scales"]
    assert rows["tiny_sd21"]["prediction_type"] == "v_prediction" and rows["tiny"]["prediction_type"] == "epsilon"
    assert rows["tiny_sd21"]["text_width"] == rows["tiny_sd21"]["context_dim"] == 48
    assert rows["tiny_sdxl"]["text_width"] == rows["tiny_sdxl"]["context_dim"] == 64  # two encoders, 32 + 32
    for scale, adapters in (("tiny", 7), ("tiny_sd21", 7), ("tiny_sdxl", 11)):
        r = rows[scale]
        assert 0 < r["trainable"] < r["total"] and r["export_bf16_MiB"] < r["export_fp32_MiB"] < r["checkpoint_MiB"]
        assert sum(r["adapter_widths"].values()) == r["adapters"] == adapters and r["step_ms"] > 0

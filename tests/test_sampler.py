"""The one sampling path: β / α / CFG semantics, any number of references, export round trip."""
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor

from ib.models.frozen_ldm import SCHEDULERS
from ib.models.sampler import SamplingConfig
from ib.pipeline import InstantBoothPipeline, generate, seeded
from ib.weights import export_weights, load_model
from tests.conftest import build_tiny_model, default_config


def sample(model, refs, prompts, cfg, seeds):
    """The callers' path (validation, `ib generate`, `ib evaluate`): a pipeline around the model in memory."""
    return generate(InstantBoothPipeline.from_model(model, cfg.scheduler), refs, prompts, cfg, seeds)


def _open_gates(model, value=0.5):
    with torch.no_grad():
        for a in model.adapters:
            a.gate.fill_(value)


@torch.no_grad()
def test_beta_zero_without_concept_is_plain_stable_diffusion_sampling():
    model = build_tiny_model()
    _open_gates(model)  # trained-looking adapters: β = 0 must still switch them off exactly
    prompts = ["a photo of a sks ball on the beach", "a sks box in the snow"]
    cfg = SamplingConfig(steps=4, guidance_scale=3.0, beta=0.0, use_concept=False)
    ours = sample(model, torch.rand(2, 3, 3, 32, 32), prompts, cfg, seeds=[7, 8])

    ldm = model.ldm
    pipe = StableDiffusionPipeline(vae=ldm.vae, text_encoder=ldm.text_encoder, tokenizer=ldm.tokenizer, unet=ldm.unet,
                                   scheduler=ldm.sampling_scheduler("ddim"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    latents = randn_tensor((2, 4, 8, 8), generator=seeded([7, 8]), device=torch.device("cpu"), dtype=torch.float32)
    plain = pipe(prompt_embeds=model.encode_prompts(prompts), negative_prompt_embeds=model.encode_prompts(["", ""]),
                 latents=latents, num_inference_steps=4, guidance_scale=3.0, output_type="pt", height=32, width=32).images
    assert torch.equal(ours, plain)

    # With β > 0 the open adapters change the result: the comparison above can fail.
    assert not torch.equal(sample(model, torch.rand(2, 3, 3, 32, 32), prompts, SamplingConfig(steps=4, guidance_scale=3.0, beta=0.3, use_concept=False), seeds=[7, 8]), plain)


@pytest.mark.parametrize("n_refs", [1, 2, 5])
@torch.no_grad()
def test_any_number_of_references(n_refs):
    model = build_tiny_model()
    refs = torch.rand(2, n_refs, 3, 32, 32)
    concept, visual = model.encode_references(refs)
    tokens = (32 // 8) ** 2 + 1  # the default ViT: 4x4 patches of 8 px + CLS
    assert concept.shape == (2, model.ldm.text_width)
    assert visual.shape == (2, n_refs * tokens, model.ldm.unet.config.cross_attention_dim)
    # Concept vectors are averaged over references, patch tokens concatenated in order.
    single = [model.encode_references(refs[:, i:i + 1]) for i in range(n_refs)]
    torch.testing.assert_close(concept, torch.stack([c for c, _ in single]).mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(visual, torch.cat([v for _, v in single], dim=1))
    out = sample(model, refs, ["a sks ball"] * 2, SamplingConfig(steps=2), seeds=[0, 1])
    assert out.shape == (2, 3, 32, 32) and 0 <= out.min() and out.max() <= 1


@torch.no_grad()
def test_alpha_scales_the_injected_concept_exactly():
    model = build_tiny_model()
    concept = torch.randn(1, model.ldm.text_width)
    full = model.encode_prompts(["a sks ball"], concept, alpha=1.0)
    renorm = model.encode_prompts(["a sks ball"], concept, alpha=0.4)
    plain = model.encode_prompts(["a sks ball"])
    where = (full != plain).any(-1)
    assert where.sum() == 1
    torch.testing.assert_close(renorm[where], 0.4 * full[where])
    assert torch.equal(renorm[~where], plain[~where])


@torch.no_grad()
def test_seed_fixes_each_image_independently_of_batch():
    model = build_tiny_model()
    _open_gates(model)
    refs = torch.rand(1, 2, 3, 32, 32)
    cfg = SamplingConfig(steps=2)
    both = sample(model, refs.expand(2, -1, -1, -1, -1), ["a sks ball"] * 2, cfg, seeds=[3, 4])
    alone = sample(model, refs, ["a sks ball"], cfg, seeds=[4])
    torch.testing.assert_close(both[1:], alone, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_export_load_gives_the_same_images(tmp_path):
    model = build_tiny_model()
    _open_gates(model, 0.3)
    for p in model.concept_head.parameters():
        p.add_(0.01 * torch.randn_like(p))
    path = export_weights(model, tmp_path / "w.safetensors", sampling=default_config()["model"]["sampling"])
    loaded, hparams = load_model(path)
    assert hparams["identifier"] == "sks"
    refs, cfg = torch.rand(1, 2, 3, 32, 32), SamplingConfig(steps=3)
    assert torch.equal(sample(model.eval(), refs, ["a sks kite"], cfg, [5]), sample(loaded, refs, ["a sks kite"], cfg, [5]))


@torch.no_grad()
def test_without_uncond_adapters_the_unconditional_half_is_the_frozen_model_and_skips_them():
    model = build_tiny_model()
    _open_gates(model)
    model.uncond_adapters = False
    unet, calls, rows = model.ldm.unet, [], []
    hooks = [unet.register_forward_hook(lambda m, args, kwargs, out: calls.append((args, kwargs, out.sample)),
                                        with_kwargs=True),
             model.adapters[0].attn.to_q.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))]
    sample(model, torch.rand(2, 2, 3, 32, 32), ["a sks ball", "a sks box"],
           SamplingConfig(steps=3, guidance_scale=3.0, beta=0.5), seeds=[0, 1])
    for h in hooks:
        h.remove()

    assert len(calls) == 3 and rows == [2, 2, 2]  # CFG batch 4; the adapters ran on the conditional 2 only
    for (x, t), kwargs, eps in calls:
        plain = unet(x, t, encoder_hidden_states=kwargs["encoder_hidden_states"]).sample
        torch.testing.assert_close(eps[:2], plain[:2], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(eps[2:], plain[2:])


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
@torch.no_grad()
def test_every_scheduler_samples_by_seed(scheduler):
    """Each named diffusers scheduler runs the same loop; the image of a seed does not depend on the batch, also
    for the ancestral ones (ddpm, euler_a), whose per-step noise comes from the image's own generator."""
    model = build_tiny_model()
    _open_gates(model)
    refs = torch.rand(2, 1, 3, 32, 32)
    cfg = SamplingConfig(scheduler=scheduler, steps=3, guidance_scale=3.0)
    both = sample(model, refs, ["a sks ball", "a sks box"], cfg, seeds=[3, 4])
    assert both.shape == (2, 3, 32, 32) and torch.isfinite(both).all()
    alone = sample(model, refs[1:], ["a sks box"], cfg, seeds=[4])
    # Up to the float noise of batched matrix products (1e-5 on this model); noise from the wrong generator
    # would move pixels by tenths.
    torch.testing.assert_close(alone[0], both[1], rtol=0, atol=1e-4)
    torch.manual_seed(123)  # the global generator plays no part
    assert torch.equal(sample(model, refs, ["a sks ball", "a sks box"], cfg, seeds=[3, 4]), both)

"""The SDXL family (two text encoders, a pooled embedding and size/crop ids as added conditioning) through the same
code as SD 1.x: the tiny overlay conf/tiny_sdxl.yaml end to end, and conf/sdxl.yaml's shapes."""
import json

import cv2
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline

from data_tools import held_out_bench
from data_tools.encode_latents import main as encode_latents
from ib.cli import main
from ib.data.datamodule import SampleTransform
from ib.data.transforms import ReferenceAugment
from ib.identifier import tokenize_with_identifier
from ib.models.frozen_ldm import FrozenLDM
from ib.models.instantbooth import InstantBooth
from ib.pipeline import InstantBoothPipeline, load_instantbooth, seeded
from ib.weights import export_weights
from tests.conftest import ROOT, build_family_model, edit_config, run_config
from tests.test_adapters import assert_zero_init_is_the_frozen_unet
from tests.test_pipeline import assert_beta_zero_without_identifier_equals_stable_diffusion, trained_like
from tests.test_sd21_family import (assert_fit_resume_export_round_trip, assert_steps_change_the_trained_part_only,
                                     parsed_overlay)

TINY_SDXL = ROOT / "conf" / "tiny_sdxl.yaml"
PROMPT = "a photo of a sks dog next to another sks dog"


def build(seed: int = 0) -> InstantBooth:
    return build_family_model(TINY_SDXL, seed)


@pytest.fixture(scope="module")
def model():
    return trained_like(build())


def test_the_tiny_model_has_the_family_traits(model):
    ldm = model.ldm
    assert ldm.added_conditioning and len(ldm.text_encoders) == 2 and ldm.tokenizer_2.pad_token == "!"
    assert model.concept_head.proj.out_features == ldm.text_width == ldm.unet.config.cross_attention_dim == 64
    widths = sorted(a.norm.normalized_shape[0] for a in model.adapters)
    assert widths == [32] * 3 + [64] * 8  # 1 + 2 down, 2 mid, 4 + 2 up: two transformer layers in the last level


def test_zero_init_adapters_are_bitwise_the_frozen_unet():
    assert_zero_init_is_the_frozen_unet(build())


@torch.no_grad()
def test_the_concept_replaces_the_identifier_in_both_encoders_at_every_position(model):
    wheres = [tokenize_with_identifier(tok, [PROMPT], "sks")[1] for tok in model.ldm.tokenizers]
    assert torch.equal(*wheres) and wheres[0].sum() == 2  # the two tokenizers put V̂ at the same places
    concept = torch.randn(1, 64)
    text = model.encode_prompts([PROMPT], concept, alpha=0.4)
    plain = model.encode_prompts([PROMPT])
    replaced = (text != plain).any(-1)[0]
    assert torch.equal(replaced, wheres[0][0])
    # all 64 features: the first encoder's 32 and the second's 32
    assert torch.equal(text[0, replaced], (0.4 * concept).expand(2, -1))


@torch.no_grad()
def test_the_pooled_embedding_never_reads_the_identifier(model):
    """V̂'s input embedding (an untrained word) does not reach the added conditioning: the pooled embedding is the
    one of the prompt without V̂, whatever V̂'s embedding row holds."""
    pooled = lambda prompts: model.encode_added(prompts, (32, 32))["text_embeds"]
    with_identifier = pooled([PROMPT])
    assert torch.equal(with_identifier, pooled(["a photo of a dog next to another dog"]))
    sks = model.ldm.tokenizer_2("sks", add_special_tokens=False).input_ids
    rows = model.ldm.text_encoder_2.get_input_embeddings().weight
    saved = rows[sks].clone()
    try:
        rows[sks] += 5.0  # another identifier embedding: the pooled vector must not move
        assert torch.equal(pooled([PROMPT]), with_identifier)
        assert not torch.equal(pooled(["a photo of a sks"]), pooled(["a photo of a dog"]))  # the row is read elsewhere
    finally:
        rows[sks] = saved
    # The unconditional input (empty prompt: condition dropout, guidance) is zeros, as the released base's.
    empty = model.encode_added([""], (32, 32))
    assert not empty["text_embeds"].any() and not model.encode_prompts([""]).any()


def test_time_ids_are_the_crop_the_data_pipeline_applied():
    """A 40 x 60 image, resized to 32 x 48 and randomly cropped to 32 x 32 (and flipped half of the time): the crop
    record says where the target came from, so the target equals that crop of the resized image."""
    g = np.random.default_rng(0)
    image = g.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    mask = np.zeros((40, 60), bool)
    mask[10:30, 20:40] = True
    resized = cv2.resize(image, (48, 32), interpolation=cv2.INTER_AREA)
    transform = SampleTransform(32, 16, "sks", ReferenceAugment(), train=True)
    seen = set()
    for seed in range(12):
        transform.reseed(seed)
        out = transform({"image": image, "mask": mask, "caption": "a dog", "meta": {"class": "dog"}, "__key__": "k"})
        h, w, top, left = out["crop"].tolist()
        assert (h, w) == (40, 60) and top == 0
        target = out["image"].permute(1, 2, 0).numpy()
        flipped = not np.array_equal(target, resized[:, left:left + 32])
        if flipped:  # the left edge is the mirrored one: where the crop starts in the flipped image
            assert np.array_equal(target, resized[:, ::-1][:, left:left + 32])
        seen.add((flipped, left))
    assert {f for f, _ in seen} == {False, True} and len({left for _, left in seen}) > 3
    model = build()
    added = model.encode_added(["a sks dog"], (32, 32), out["crop"][None])
    assert added["time_ids"].tolist() == [[40, 60, top, left, 32, 32]]
    assert model.encode_added(["a sks dog"], (32, 32))["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]]  # sampling


def test_precomputed_latents_carry_the_centre_crop(tmp_path, synthetic_shards):
    """Latents fix the crop (the centre one, flipped or not): the crop record says so. And data_tools.encode_latents
    with the family's overlay makes shards an SDXL-family fit trains from."""
    image, mask = np.zeros((40, 60, 3), np.uint8), np.ones((40, 60), bool)
    moments = np.zeros((2, 8, 8, 8), np.float16)
    transform = SampleTransform(32, 16, "sks", ReferenceAugment(), train=True)
    crops = set()
    for seed in range(8):  # both flips: the centre crop (x 8..40 of 48) is its own mirror
        transform.reseed(seed)
        crops.add(tuple(transform({"image": image, "mask": mask, "caption": "a dog", "meta": {"class": "dog"},
                                   "__key__": "k", "latent_moments": moments})["crop"].tolist()))
    assert crops == {(40, 60, 0, 8)}

    out = tmp_path / "latents"
    assert encode_latents(["--config", str(ROOT / "conf" / "default.yaml"), "--config", str(TINY_SDXL),
                           "--input", str(synthetic_shards / "train"), "--output", str(out)]) == 0
    config = edit_config(run_config(tmp_path, synthetic_shards, max_steps=2), {"data.train_shards": str(out)})
    assert main(["fit", "--config", str(config), "--config", str(TINY_SDXL)]) == 0


def test_training_steps_change_the_trained_part_only():
    crops = torch.tensor([[40, 60, 0, 9], [32, 32, 0, 0]])
    frozen = assert_steps_change_the_trained_part_only(build(), cond_dropout=0.5, crops=crops)
    assert any(k.startswith("ldm.text_encoder_2.") for k in frozen)


@torch.no_grad()
def test_beta_zero_without_identifier_equals_diffusers_stable_diffusion_xl(model, photo_refs):
    def sdxl(ldm, scheduler):
        return StableDiffusionXLPipeline(vae=ldm.vae, text_encoder=ldm.text_encoder, text_encoder_2=ldm.text_encoder_2,
                                         tokenizer=ldm.tokenizer, tokenizer_2=ldm.tokenizer_2, unet=ldm.unet,
                                         scheduler=scheduler, add_watermarker=False)
    assert_beta_zero_without_identifier_equals_stable_diffusion(model, photo_refs, sdxl)


@torch.no_grad()
def test_load_instantbooth_into_a_diffusers_sdxl_pipeline(model, photo_refs, tmp_path):
    """An exported file on diffusers' StableDiffusionXLPipeline: both text encoders and tokenizers are shared, and
    it samples what the pipeline rebuilt from the file does."""
    weights = export_weights(model, tmp_path / "w.safetensors")
    ldm = FrozenLDM.from_config(model.ldm.source)  # the same random frozen parts (their init_seed)
    sdxl = StableDiffusionXLPipeline(vae=ldm.vae, text_encoder=ldm.text_encoder, text_encoder_2=ldm.text_encoder_2,
                                     tokenizer=ldm.tokenizer, tokenizer_2=ldm.tokenizer_2, unet=ldm.unet,
                                     scheduler=DDIMScheduler.from_config(ldm.noise_scheduler.config),
                                     add_watermarker=False)
    ib_pipe = load_instantbooth(sdxl, weights)
    assert ib_pipe.text_encoder_2 is sdxl.text_encoder_2 and ib_pipe.tokenizer_2 is sdxl.tokenizer_2
    rebuilt = InstantBoothPipeline.from_weights(weights)
    images = [p(PROMPT, photo_refs, num_inference_steps=3, generator=seeded([2]), output_type="pt").images
              for p in (ib_pipe, rebuilt)]
    assert torch.equal(*images)


@pytest.mark.slow
def test_fit_resume_export_pipeline_generate_and_evaluate(tmp_path, synthetic_shards, capsys):
    model, reloaded = assert_fit_resume_export_round_trip(tmp_path, synthetic_shards, TINY_SDXL)
    assert model.ldm.added_conditioning and model.ldm.text_width == 64
    assert (tmp_path / "pipe" / "text_encoder_2").is_dir() and reloaded.text_encoder_2 is not None
    assert reloaded.tokenizer_2.pad_token == "!"

    # `ib generate` and `ib evaluate` on the exported file, at the native size; a size the VAE cannot take: one line
    exported, bench = str(tmp_path / "ib.safetensors"), tmp_path / "bench"
    assert held_out_bench.main(["--shards", str(synthetic_shards / "val"), "--out", str(bench), "--photos", "2"]) == 0
    refs = [str(p) for p in sorted(bench.glob("ball_006/*.jpg"))]
    assert main(["generate", "--weights", exported, "--ref", *refs, "--prompt", "a sks ball", "--steps", "2",
                 "--out", str(tmp_path / "gen")]) == 0
    assert PIL.Image.open(tmp_path / "gen" / "seed000000.png").size == (32, 32)
    assert main(["evaluate", "--weights", exported, "--data", str(bench), "--out", str(tmp_path / "eval"),
                 "--max-subjects", "1", "--max-prompts", "1", "--num-images", "1", "--steps", "1",
                 "--backbones", str(ROOT / "conf" / "metrics" / "tiny.yaml")]) == 0
    assert set(json.loads((tmp_path / "eval" / "report.json").read_text())["overall"]) >= {"clip_i", "clip_t", "dino"}
    capsys.readouterr()
    assert main(["generate", "--weights", exported, "--ref", *refs, "--prompt", "a sks ball", "--height", "30",
                 "--out", str(tmp_path / "bad")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "ib: error: --height: must be a multiple of 4 (the VAE's downsampling factor), got 30"]
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("random_weights", [False, True])
def test_sdxl_overlay_on_the_sd15_recipe(random_weights, synthetic_shards):
    cfg = parsed_overlay("sdxl.yaml", random_weights, synthetic_shards)
    ldm = cfg.model.ldm
    assert ldm.pretrained == (None if random_weights else "stabilityai/stable-diffusion-xl-base-1.0")
    assert (ldm.unet["cross_attention_dim"], ldm.unet["sample_size"]) == (2048, 128)
    assert ldm.text_encoder["hidden_size"] + ldm.text_encoder_2["hidden_size"] == 2048
    # the added conditioning's input: the pooled embedding and six ids at the time-embedding width
    assert ldm.unet["projection_class_embeddings_input_dim"] == (
        ldm.text_encoder_2["projection_dim"] + 6 * ldm.unet["addition_time_embed_dim"])
    assert cfg.data.image_size == 1024 and cfg.trainer.default_root_dir == "runs/sdxl"
    assert cfg.model.optim.lr_heads == 1e-4  # the recipe is SD 1.5's


@pytest.mark.parametrize("change, message", [
    ({"text_encoder_2": {}}, "model.ldm.text_encoder_2: the UNet takes SDXL's added conditioning "
                             "(addition_embed_type: text_time), which needs the second text encoder"),
    ({"unet.cross_attention_dim": 48}, "model.ldm.unet.cross_attention_dim: 48, but the text states are 32 + 32 = 64 wide"),
    ({"unet.projection_class_embeddings_input_dim": 64}, "model.ldm.unet.projection_class_embeddings_input_dim: 64, "
     "but the pooled embedding (32) and 6 ids x addition_time_embed_dim (8) make 80"),
    ({"unet.addition_embed_type": None, "unet.projection_class_embeddings_input_dim": None},
     "model.ldm.text_encoder_2: a second text encoder needs a UNet with addition_embed_type: text_time (SDXL)"),
])
def test_text_side_mismatches_are_one_line_errors_before_anything_is_written(change, message, tmp_path,
                                                                           synthetic_shards, capsys):
    """Text encoders that do not fit the UNet: one line naming the field, exit 2, no run folder (it was a shape
    error inside the UNet at the first step)."""
    overlay = edit_config(TINY_SDXL, {f"model.ldm.{k}": v for k, v in change.items()}, out=tmp_path / "overlay.yaml")
    config = run_config(tmp_path, synthetic_shards)
    assert main(["fit", "--config", str(config), "--config", str(overlay)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"ib: error: {message}"]
    assert not (tmp_path / "run").exists()

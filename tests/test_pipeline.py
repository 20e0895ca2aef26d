"""InstantBoothPipeline: diffusers-native loading, saving, schedulers, base swap, and its agreement with plain SD."""
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, StableDiffusionPipeline, UniPCMultistepScheduler)
from PIL import Image

from ib.cli import main
from ib.errors import ConfigError
from ib.models.adapter import adapters_removed
from ib.models.frozen_ldm import FrozenLDM, LDMConfig
from ib.pipeline import InstantBoothPipeline, load_instantbooth, seeded
from ib.weights import CONFIG_KEY, export_weights, write_weights
from tests.conftest import build_tiny_model, default_config, random_parts, run_config, wider_parts

PROMPT = "a photo of a sks toy on the grass"


def trained_like(model):
    """Open the gates and move the heads off their initialisation, so the trained part changes images."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for part in (model.concept_head, model.patch_head, model.adapters):
            for p in part.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return trained_like(build_tiny_model())


@pytest.fixture(scope="module")
def weights(model, tmp_path_factory):
    return export_weights(model, tmp_path_factory.mktemp("w") / "ib.safetensors", {"steps": 3, "beta": 0.5})


@pytest.fixture(scope="module")
def refs():
    g = torch.Generator().manual_seed(1)
    return [(torch.rand(3, 40, 30, generator=g) * 255).byte() for _ in range(2)]


def run(pipe, refs, seeds=(1, 2), **kw):
    pipe.set_progress_bar_config(disable=True)
    kw = {"num_inference_steps": 3, "output_type": "pt", **kw}
    return pipe([PROMPT] * len(seeds), refs, generator=seeded(list(seeds)), **kw).images


def test_export_names_weights_by_diffusers_module_paths(model, weights):
    from safetensors import safe_open
    with safe_open(str(weights), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    modules = dict(model.ldm.unet.named_modules())
    fusers = {k.removeprefix("unet.").rpartition(".fuser.")[0] for k in keys if ".fuser." in k}
    assert fusers and all(type(modules[f]).__name__ == "BasicTransformerBlock" for f in fusers)
    assert len(fusers) == len(model.adapters)
    assert {"unet.position_net.proj.weight", "concept_encoder.proj.weight"} <= keys
    assert meta["format"] == "instantbooth" and meta["format_version"] == "2"
    assert int(meta["tokens_per_reference"]) == model.image_encoder.tokens_per_image == 1 + 4 * 4
    assert json.loads(meta["unet_shape"])["block_out_channels"] == list(model.ldm.unet.config.block_out_channels)
    assert json.loads(meta["sampling"]) == {"steps": 3, "beta": 0.5}


def test_save_pretrained_round_trip_is_bitwise(model, refs, tmp_path):
    pipe = InstantBoothPipeline.from_model(model)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    before = run(pipe, refs)
    pipe.save_pretrained(tmp_path / "pipe")
    folder = tmp_path / "pipe"
    assert json.loads((folder / "model_index.json").read_text())["scheduler"] == ["diffusers", "DPMSolverMultistepScheduler"]
    # The frozen UNet is saved once, without the adapters (they are in instantbooth.safetensors).
    from safetensors import safe_open
    with safe_open(str(folder / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert not any(".fuser." in k or k.startswith("position_net.") for k in f.keys())
    loaded = InstantBoothPipeline.from_pretrained(folder)
    assert type(loaded.scheduler) is DPMSolverMultistepScheduler
    assert torch.equal(run(loaded, refs), before)
    # Saving again over it replaces it, nothing left beside it.
    loaded.save_pretrained(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_from_weights_matches_the_model_and_keeps_the_sampler_defaults(model, weights, refs):
    pipe = InstantBoothPipeline.from_weights(weights)
    assert (pipe.defaults.steps, pipe.defaults.beta) == (3, 0.5)
    direct = InstantBoothPipeline.from_model(model)
    assert torch.equal(run(pipe, refs, beta=0.5), run(direct, refs, beta=0.5))


def assert_beta_zero_without_identifier_equals_stable_diffusion(model, refs, diffusers_pipeline=None):
    """diffusers' own pipeline (StableDiffusionPipeline, or `diffusers_pipeline(modules, scheduler)`) on the same
    modules and scheduler gives the same images."""
    pipe = InstantBoothPipeline.from_model(model)
    if diffusers_pipeline is None:
        sd = StableDiffusionPipeline(vae=model.ldm.vae, text_encoder=model.ldm.text_encoder, tokenizer=model.ldm.tokenizer,
                                     unet=model.ldm.unet, scheduler=pipe.scheduler, safety_checker=None,
                                     feature_extractor=None, requires_safety_checker=False)
    else:
        sd = diffusers_pipeline(model.ldm, pipe.scheduler)
    sd.set_progress_bar_config(disable=True)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    prompts = ["a photo of a toy on the grass", "a red ball"]
    plain = sd(prompts, latents=latents, num_inference_steps=4, guidance_scale=7.5, output_type="pt").images
    ours = pipe(prompts, refs, beta=0.0, latents=latents, num_inference_steps=4, guidance_scale=7.5,
                output_type="pt").images
    assert (plain - ours).abs().max() <= 1e-5
    # ...and the adapters do change images when β > 0 (so the equality above is not vacuous).
    adapted = pipe(prompts, refs, beta=1.0, latents=latents, num_inference_steps=4, output_type="pt").images
    assert (plain - adapted).abs().max() > 1e-3


def test_beta_zero_without_identifier_equals_plain_stable_diffusion(model, refs):
    assert_beta_zero_without_identifier_equals_stable_diffusion(model, refs)


@pytest.mark.parametrize("scheduler", [DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                                       EulerAncestralDiscreteScheduler, UniPCMultistepScheduler])
def test_any_diffusers_scheduler_samples(model, refs, scheduler):
    pipe = InstantBoothPipeline.from_model(model)
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    images = run(pipe, refs)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    # Image i depends on its seed only (up to batch-size-dependent rounding in the kernels).
    torch.testing.assert_close(run(pipe, refs, seeds=(2,))[0], images[1], rtol=0, atol=1e-4)


def test_output_types(model, refs):
    pipe = InstantBoothPipeline.from_model(model)
    pipe.set_progress_bar_config(disable=True)
    pil = pipe(PROMPT, refs, num_inference_steps=2, generator=seeded([0])).images
    arr = pipe(PROMPT, refs, num_inference_steps=2, generator=seeded([0]), output_type="np").images
    assert isinstance(pil[0], Image.Image) and pil[0].size == (32, 32)
    assert arr.shape == (1, 32, 32, 3) and np.array_equal(np.asarray(pil[0]), (arr[0] * 255).round().astype(np.uint8))


def test_references_as_paths_pil_arrays_and_masks_agree(model, refs, tmp_path):
    pipe = InstantBoothPipeline.from_model(model)
    arrays = [r.permute(1, 2, 0).numpy() for r in refs]
    paths = []
    for i, a in enumerate(arrays):
        paths.append(tmp_path / f"r{i}.png")
        Image.fromarray(a).save(paths[-1])
    from_tensors = run(pipe, refs)
    assert torch.equal(run(pipe, [str(p) for p in paths]), from_tensors)
    assert torch.equal(run(pipe, [Image.fromarray(a) for a in arrays]), from_tensors)
    assert torch.equal(run(pipe, arrays), from_tensors)
    full = [np.ones(a.shape[:2], bool) for a in arrays]
    assert torch.equal(run(pipe, arrays, reference_masks=full), from_tensors)
    half = [np.pad(np.ones((20, 30), bool), ((0, 20), (0, 0))) for _ in arrays]
    assert not torch.equal(run(pipe, arrays, reference_masks=half), from_tensors)


@pytest.mark.parametrize("call, message", [
    (lambda p, r: p(PROMPT, ["/no/such/photo.jpg"]), "reference_images: cannot read image /no/such/photo.jpg"),
    (lambda p, r: p(PROMPT, [object()]), "reference_images: expected a path, PIL image, array or tensor"),
    (lambda p, r: p(PROMPT, []), "reference_images: no reference images"),
    (lambda p, r: p(PROMPT, r, reference_masks=[np.ones((5, 5), bool)]), "reference_masks: 1 masks for 2 reference images"),
    (lambda p, r: p(PROMPT, r, reference_masks=[np.zeros((40, 30), bool)] * 2), "reference_masks: the mask of image 0 is empty"),
    (lambda p, r: p(PROMPT, r, reference_masks=[np.ones((5, 5), bool)] * 2), "reference_masks: mask 0 is 5x5, its image"),
    (lambda p, r: p(PROMPT, r, reference_masks="no-such-backend"), "reference_masks: unknown mask backend"),
    (lambda p, r: p(PROMPT, [np.full((8, 8, 3), 2.0)]), "reference_images: pixels must be uint8, or float in [0, 1]"),
    (lambda p, r: p(PROMPT, torch.rand(1, 2, 3, 5, 5)), "reference_images: prepared references must be (B, N, 3, 32, 32)"),
    (lambda p, r: p(PROMPT, r, beta=2.0), "beta: must be in [0, 1]"),
    (lambda p, r: p(PROMPT, r, num_inference_steps=0), "num_inference_steps: must be >= 1"),
    (lambda p, r: p(PROMPT, r, height=50), "height: must be a multiple of 4"),
    (lambda p, r: p(PROMPT, r, output_type="jpeg"), "output_type: one of pil, np, pt"),
    (lambda p, r: p([PROMPT] * 2, [r, r, r]), "reference_images: 3 lists for 2 prompts"),
])
def test_bad_inputs_are_one_line_errors(model, refs, call, message):
    with pytest.raises(ConfigError) as e:
        call(InstantBoothPipeline.from_model(model), refs)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def _base_folder(model, path: Path, perturb: float = 0.0) -> Path:
    """The model's frozen parts saved as a diffusers folder (optionally a 'fine-tune': weights moved)."""
    ldm = model.ldm
    with adapters_removed(ldm.unet):
        ldm.save_pretrained(path)
    if perturb:
        fine = FrozenLDM.from_config(LDMConfig(pretrained=str(path)))
        with torch.no_grad():
            for p in fine.unet.parameters():
                p.add_(perturb * torch.randn_like(p))
        fine.unet.save_pretrained(path / "unet")
    return path


def test_base_swap_runs_the_trained_part_on_another_base_of_the_same_shape(model, weights, refs, tmp_path):
    same = InstantBoothPipeline.from_weights(weights, base=_base_folder(model, tmp_path / "same"))
    recorded = InstantBoothPipeline.from_weights(weights)
    assert torch.equal(run(same, refs), run(recorded, refs))
    tuned = InstantBoothPipeline.from_weights(weights, base=_base_folder(model, tmp_path / "tuned", perturb=0.01))
    assert not torch.equal(run(tuned, refs), run(recorded, refs))


def test_a_base_of_another_shape_is_refused_in_one_line(model, weights, tmp_path):
    cfg = random_parts()
    trained = list(model.ldm.unet.config.block_out_channels)
    wider = [2 * c for c in trained]
    other = FrozenLDM.from_config(LDMConfig(**{**cfg, "unet": {**cfg["unet"], "block_out_channels": wider}}))
    other.save_pretrained(tmp_path / "other")
    reason = re.escape(f"block_out_channels {wider} vs {trained}")
    with pytest.raises(ConfigError, match=rf"^base .*other: the base's UNet differs from the one the weights were "
                                          rf"trained on: {reason}$"):
        InstantBoothPipeline.from_weights(weights, base=tmp_path / "other")


def test_old_export_files_load_and_give_the_same_images(model, weights, refs, tmp_path):
    hparams = {"ldm": default_config()["model"]["ldm"], "image_encoder": default_config()["model"]["image_encoder"],
               "identifier": "sks", "sampling": {"steps": 3, "beta": 0.5}}
    old = write_weights(model.trainable_state_dict(), {CONFIG_KEY: json.dumps(hparams)}, tmp_path / "old.safetensors")
    assert torch.equal(run(InstantBoothPipeline.from_weights(old), refs), run(InstantBoothPipeline.from_weights(weights), refs))
    # `ib export` converts one to the current format.
    new = tmp_path / "new.safetensors"
    assert main(["export", "--ckpt", str(old), "--out", str(new)]) == 0
    assert torch.equal(run(InstantBoothPipeline.from_weights(new), refs), run(InstantBoothPipeline.from_weights(weights), refs))


def test_a_file_from_a_model_of_another_shape_is_refused_in_one_line(model, tmp_path):
    hparams = {"ldm": wider_parts(48), "image_encoder": default_config()["model"]["image_encoder"]}
    wrong = write_weights(model.trainable_state_dict(), {CONFIG_KEY: json.dumps(hparams)}, tmp_path / "w.safetensors")
    with pytest.raises(ConfigError, match=r"^weights .*w.safetensors: weights do not fit this model: "):
        InstantBoothPipeline.from_weights(wrong)


def test_load_instantbooth_shares_the_unet_and_leaves_plain_sd_working(model, weights, refs, tmp_path):
    base = InstantBoothPipeline.from_weights(weights).model.ldm  # a fresh copy of the frozen parts
    with adapters_removed(base.unet):
        pass
    sd = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                 unet=FrozenLDM.from_config(LDMConfig(**default_config()["model"]["ldm"])).unet,
                                 scheduler=DDIMScheduler.from_config(base.noise_scheduler.config), safety_checker=None,
                                 feature_extractor=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    before = sd("a red ball", latents=latents, num_inference_steps=3, output_type="pt").images
    params_before = sum(p.numel() for p in sd.unet.parameters())

    ib_pipe = load_instantbooth(sd, weights)
    assert ib_pipe.unet is sd.unet and ib_pipe.vae is sd.vae and ib_pipe.text_encoder is sd.text_encoder
    assert torch.equal(run(ib_pipe, refs), run(InstantBoothPipeline.from_weights(weights), refs))
    assert torch.equal(sd("a red ball", latents=latents, num_inference_steps=3, output_type="pt").images, before)
    del ib_pipe
    assert torch.equal(sd("a red ball", latents=latents, num_inference_steps=3, output_type="pt").images, before)
    assert sum(p.numel() for p in sd.unet.parameters()) > params_before  # the adapters sit in the shared UNet


@pytest.mark.parametrize("edit, message", [
    (lambda i: i.update(scheduler=["os", "system"]), "'scheduler' must name a diffusers scheduler"),
    (lambda i: i.update(image_encoder=["builtins", "eval"]), "'image_encoder' must be"),
    (lambda i: i.update(_class_name="StableDiffusionPipeline"), "not an InstantBoothPipeline folder"),
])
def test_a_tampered_pipeline_folder_is_refused_without_importing_what_it_names(model, tmp_path, edit, message):
    folder = tmp_path / "pipe"
    InstantBoothPipeline.from_model(model).save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    edit(index)
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=message):
        InstantBoothPipeline.from_pretrained(folder)


def test_the_reference_size_has_one_source_the_image_encoder(tmp_path, synthetic_shards):
    """The DataModule crops references to the encoder's input size; the config cannot set another one."""
    from ib.fit_cli import InstantBoothCLI
    from ib.data.datamodule import InstantBoothDataModule
    from ib.lit_module import InstantBoothModule
    vision = {"image_size": 32, "patch_size": 16, "width": 64, "layers": 2, "head_width": 32}
    config = str(run_config(tmp_path, synthetic_shards))
    cli = InstantBoothCLI(InstantBoothModule, InstantBoothDataModule, run=False,
                          args=["--config", config, "--model.image_encoder.overrides.vision_cfg", json.dumps(vision)])
    assert cli.model.model.image_encoder.image_size == (32, 32)
    assert cli.datamodule.reference_size == 32
    with pytest.raises(SystemExit):
        InstantBoothCLI(InstantBoothModule, InstantBoothDataModule, run=False,
                        args=["--config", config, "--data.reference_size", "48"])


def _ib(capsys, *args) -> SimpleNamespace:
    """`ib ARGS` in this process (the entry point's exit codes and one-line errors are tested through real
    processes in test_config_validation / test_cli_errors): exit code and standard error."""
    capsys.readouterr()
    returncode = main([str(a) for a in args])
    return SimpleNamespace(returncode=returncode, stderr=capsys.readouterr().err)


def test_ib_generate_on_another_base_with_any_scheduler(model, weights, refs, tmp_path, capsys):
    ref = tmp_path / "ref.png"
    Image.fromarray(refs[0].permute(1, 2, 0).numpy()).save(ref)
    base = _base_folder(model, tmp_path / "base")
    r = _ib(capsys, "generate", "--weights", weights, "--base", base, "--scheduler", "dpm++", "--steps", "3", "--ref", ref,
            "--prompt", PROMPT, "--out", tmp_path / "out", "--num-images", "2")
    assert r.returncode == 0, r.stderr
    settings = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert settings["base"] == str(base) and settings["sampling"]["scheduler"] == "dpm++"
    assert len(list((tmp_path / "out").glob("seed*.png"))) == 2
    # A saved pipeline folder works as --weights too, and gives the same image for the same seed.
    InstantBoothPipeline.from_weights(weights, base=base).save_pretrained(tmp_path / "pipe")
    r = _ib(capsys, "generate", "--weights", tmp_path / "pipe", "--scheduler", "dpm++", "--steps", "3", "--ref", ref,
            "--prompt", PROMPT, "--out", tmp_path / "out2", "--num-images", "2")
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out2" / "seed000000.png")),
                          np.asarray(Image.open(tmp_path / "out" / "seed000000.png")))


def test_ib_generate_refuses_a_base_of_another_shape_before_writing(weights, tmp_path, capsys):
    FrozenLDM.from_config(LDMConfig(**wider_parts(48))).save_pretrained(tmp_path / "other")
    ref = tmp_path / "ref.png"
    Image.fromarray(np.full((20, 20, 3), 128, np.uint8)).save(ref)
    r = _ib(capsys, "generate", "--weights", weights, "--base", tmp_path / "other", "--ref", ref, "--prompt", PROMPT,
            "--out", tmp_path / "out")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith(f"ib: error: --base {tmp_path / 'other'}: the base's UNet "
                                                        "differs from the one the weights were trained on: cross_attention_dim 48 vs 32")
    assert not (tmp_path / "out").exists()
    r = _ib(capsys, "generate", "--weights", weights, "--base", tmp_path / "nowhere", "--ref", ref, "--prompt", PROMPT,
            "--out", tmp_path / "out")
    assert r.returncode == 2 and r.stderr.strip().endswith(f"--base: folder not found: {tmp_path / 'nowhere'}")


def test_ib_evaluate_refuses_a_missing_base_before_writing(weights, tmp_path, capsys):
    from tests.test_dreambench import write_layout
    data = write_layout(tmp_path / "bench")
    r = _ib(capsys, "evaluate", "--weights", weights, "--base", tmp_path / "nowhere", "--data", data, "--out", tmp_path / "out",
            "--backbones", "conf/metrics/tiny.yaml", "--steps", "2")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == f"ib: error: --base: folder not found: {tmp_path / 'nowhere'}"
    assert not (tmp_path / "out").exists()

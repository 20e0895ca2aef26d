"""Speed switches (ib/models/speed.py) compute what the baseline computes, and keep training the right
parameters. Tolerances: exact-maths switches 1e-5 relative; bf16 frozen parts 2% on the loss, 0.05 on
images in [0, 1]; the visual-KV cache 1e-5 (the same products, grouped differently)."""
import json
import math

import pytest
import torch

from ib.errors import ConfigError
from ib.lit_module import InstantBoothModule
from ib.models.sampler import SamplingConfig
from ib.models.speed import SpeedConfig, check_speed
from ib.pipeline import InstantBoothPipeline, generate
from tests.conftest import build_tiny_model, default_config

CAPTIONS = ["a photo of a sks ball on the grass", "a sks box in the snow"]


def _model(cfg: SpeedConfig | None = None, inference: bool = False):
    model = build_tiny_model(speed=cfg or SpeedConfig(), inference=inference)
    with torch.no_grad():
        for a in model.adapters:
            a.gate.fill_(0.3)  # open gates: every adapter weight gets gradient and changes the output
    return model


def sample(model, refs, prompts, cfg, seeds):
    return generate(InstantBoothPipeline.from_model(model, cfg.scheduler), refs, prompts, cfg, seeds)


def _loss_and_grads(model, latents: bool = False):
    torch.manual_seed(1)
    images, refs = torch.rand(2, 3, 32, 32), torch.rand(2, 1, 3, 32, 32)
    torch.manual_seed(2)
    kw = {"latents": model.ldm.encode_images(images)} if latents else {}
    with model.frozen_autocast():
        loss = model.training_loss(images, refs, CAPTIONS, **kw)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.fixture(scope="module")
def baseline():
    return _loss_and_grads(_model())


def _check(model, baseline, rel):
    loss, grads = _loss_and_grads(model)
    base_loss, base_grads = baseline
    assert math.isclose(loss.item(), base_loss.item(), rel_tol=rel), (loss.item(), base_loss.item())
    assert grads.keys() == base_grads.keys()
    for n, g in grads.items():
        assert g is not None and g.abs().sum() > 0, f"no gradient reached {n}"
        assert g.dtype == torch.float32, n  # fp32 master weights
        cos = torch.nn.functional.cosine_similarity(g.flatten().double(), base_grads[n].flatten().double(), dim=0)
        assert cos > (0.999999 if rel < 1e-4 else 0.98), (n, cos.item())
    # Trainable inside the frozen parts: only the adapters (`.fuser.`) and the patch head, which sits in the
    # UNet's GLIGEN slot `position_net` (named there first, since the UNet is registered before the heads).
    assert model.ldm.unet.position_net is model.patch_head
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith(("ldm.", "image_encoder."))
                   and ".fuser." not in n and not n.startswith("ldm.unet.position_net."))


@pytest.mark.parametrize("cfg", [SpeedConfig(channels_last=True), SpeedConfig(gradient_checkpointing=True),
                                 SpeedConfig(sdpa=False)],
                         ids=["channels_last", "gradient_checkpointing", "classic_attention"])
def test_exact_switches_keep_loss_and_gradients(cfg, baseline):
    _check(_model(cfg), baseline, rel=1e-5)


def test_bf16_frozen_parts_keep_loss_and_fp32_trainables(baseline):
    model = _model(SpeedConfig(frozen_dtype="bfloat16"))
    assert model.ldm.unet.conv_in.weight.dtype == torch.bfloat16
    assert model.image_encoder.visual.conv1.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.param_groups()["adapters"] + model.param_groups()["heads"])
    _check(model, baseline, rel=0.02)


def _autocast_seen_inside(model, module_types=(torch.nn.GroupNorm,)) -> set:
    """Whether autocast was on in each frozen UNet module of these types, over one training loss."""
    seen = set()
    for m in model.ldm.unet.modules():
        if isinstance(m, module_types):
            m.register_forward_pre_hook(lambda mod, args: seen.add(torch.is_autocast_enabled("cpu")))
    _loss_and_grads(model)
    return seen


def test_native_bf16_frozen_compute_keeps_loss_and_fp32_trainables(baseline):
    """Autocast is off inside the frozen parts, the adapters compute in bf16 from fp32 master weights, and
    loss and gradients stay those of the fp32 model (bf16 tolerance)."""
    model = _model(SpeedConfig(frozen_dtype="bfloat16", native_frozen_compute=True))
    norm_inputs = []
    model.adapters[0].attn.to_q.register_forward_pre_hook(lambda mod, args: norm_inputs.append(args[0].dtype))
    assert _autocast_seen_inside(model) == {False}
    assert norm_inputs == [torch.bfloat16]  # the adapter's LayerNorm output (fp32 under autocast)
    assert all(p.dtype == torch.float32 for p in model.param_groups()["adapters"] + model.param_groups()["heads"])
    _check(model, baseline, rel=0.02)
    assert _autocast_seen_inside(_model(SpeedConfig(frozen_dtype="bfloat16"))) == {True}  # the switch decides


@torch.no_grad()
def test_native_bf16_inference_holds_trainables_in_bf16_and_samples_like_fp32():
    torch.manual_seed(0)  # the references: the rounding's effect depends on them, not on the tests run before
    refs, prompts, cfg = torch.rand(1, 2, 3, 32, 32), ["a sks ball"], SamplingConfig(steps=3)
    want = sample(_model(), refs, prompts, cfg, seeds=[0])
    model = _model(SpeedConfig(frozen_dtype="bfloat16", native_frozen_compute=True, cache_visual_kv=True),
                   inference=True)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    got = sample(model, refs, prompts, cfg, seeds=[0])
    assert got.dtype == torch.float32
    # On the trained toy base bf16 rounding moves one pixel by up to 0.05 of the range (3 steps) and the mean by
    # 0.005-0.012 over 12 reference draws; these references: 0.006 / 0.038.
    diff = (got - want).abs()
    assert diff.mean() < 0.01 and diff.max() < 0.1


@pytest.mark.slow
def test_regional_compile_keeps_loss_and_gradients(baseline):
    """Dynamo captures every transformer block (with its adapter) and resnet block, forward and backward.
    The aot_eager backend traces the same regions as Inductor without C++ code generation, which takes
    ~2 minutes on 2 CPU cores; the Inductor path is measured by the bench (`--sweep`)."""
    from ib.models.speed import COMPILED_BLOCKS
    model = _model(SpeedConfig(compile_blocks=True, compile_backend="aot_eager"))
    blocks = [m for m in model.ldm.unet.modules() if isinstance(m, COMPILED_BLOCKS)]
    assert blocks and all(m._compiled_call_impl is not None for m in blocks)
    _check(model, baseline, rel=1e-5)


def test_transformer_compile_scope_compiles_only_transformer_blocks():
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D
    model = _model(SpeedConfig(compile_blocks=True, compile_scope="transformer", compile_backend="aot_eager"))
    blocks = [m for m in model.ldm.unet.modules() if isinstance(m, BasicTransformerBlock)]
    resnets = [m for m in model.ldm.unet.modules() if isinstance(m, ResnetBlock2D)]
    assert blocks and all(m._compiled_call_impl is not None for m in blocks)
    assert resnets and all(m._compiled_call_impl is None for m in resnets)


def test_precomputed_latents_skip_the_vae_and_give_the_same_loss(monkeypatch):
    model = _model()
    torch.manual_seed(1)
    images, refs = torch.rand(2, 3, 32, 32), torch.rand(2, 1, 3, 32, 32)
    torch.manual_seed(2)
    base = model.training_loss(images, refs, CAPTIONS)
    torch.manual_seed(2)
    latents = model.ldm.encode_images(images)  # the same posterior draw as inside training_loss
    monkeypatch.setattr(model.ldm.vae, "encode", lambda *a, **k: pytest.fail("VAE encode although latents were given"))
    torch.testing.assert_close(model.training_loss(images, refs, CAPTIONS, latents=latents), base)


@torch.no_grad()
def test_visual_kv_cache_gives_the_same_images():
    refs, prompts, cfg = torch.rand(2, 5, 3, 32, 32), ["a sks ball", "a sks box"], SamplingConfig(steps=3)
    plain = _model()
    cached = _model(SpeedConfig(cache_visual_kv=True))
    seen = {}
    for name, m in (("plain", plain), ("cached", cached)):
        k = m.adapters[0].attn.to_k
        hook = k.register_forward_hook(lambda mod, i, o, name=name: seen.setdefault(name, set()).add(i[0].shape[1]))
        seen[name] = set()
        out = sample(m, refs, prompts, cfg, seeds=[0, 1])
        hook.remove()
        if name == "plain":
            want = out
    tokens, latent_rows = 5 * 17, 8 * 8  # 5 references x (CLS + 4x4 patches); the first block's 8x8 latents
    assert seen["plain"] == {latent_rows + tokens}  # every step projects latents + visual tokens
    assert seen["cached"] == {tokens, latent_rows}  # visual tokens once, then latent rows only
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(out, sample(cached, refs.flip(1), prompts, cfg, seeds=[0, 1]))  # the cache is per run


@torch.no_grad()
def test_bf16_sampling_close_to_fp32():
    refs, prompts, cfg = torch.rand(1, 2, 3, 32, 32), ["a sks ball"], SamplingConfig(steps=3)
    want = sample(_model(), refs, prompts, cfg, seeds=[0])
    got = sample(_model(SpeedConfig(frozen_dtype="bfloat16", cache_visual_kv=True)), refs, prompts, cfg, seeds=[0])
    assert got.dtype == torch.float32
    # On the trained toy base bf16 rounding moves one pixel by up to 0.05 of the range (3 steps) and the mean by
    # 0.005-0.012 over 12 reference draws; these references: 0.006 / 0.038.
    diff = (got - want).abs()
    assert diff.mean() < 0.01 and diff.max() < 0.1


def test_cuda_only_and_bad_switches_are_refused():
    # The device is known where the switches are checked for a run (config checks, the module's setup, --speed).
    with pytest.raises(ConfigError, match="cuda_graphs_sampling"):
        check_speed(SpeedConfig(cuda_graphs_sampling=True), "cpu")
    with pytest.raises(ConfigError, match="frozen_dtype"):
        build_tiny_model(speed=SpeedConfig(frozen_dtype="int8"))
    with pytest.raises(ConfigError, match="compile_scope: unknown 'resnets'"):
        build_tiny_model(speed=SpeedConfig(compile_blocks=True, compile_scope="resnets"))
    with pytest.raises(ConfigError, match="native_frozen_compute: needs frozen_dtype bfloat16"):
        build_tiny_model(speed={"native_frozen_compute": True})


def test_lit_module_keeps_speed_in_hparams_and_fuses_adamw():
    m = default_config()["model"]
    module = InstantBoothModule(ldm=m["ldm"], image_encoder=m["image_encoder"],
                                speed={"fused_optimizer": True, "cache_visual_kv": True})
    assert module.hparams["speed"] == dict(vars(SpeedConfig(fused_optimizer=True, cache_visual_kv=True)))
    opt = module.configure_optimizers()["optimizer"]
    assert opt.defaults["fused"] is True
    assert m["speed"] == {k: v for k, v in vars(SpeedConfig()).items() if k in m["speed"]}  # default.yaml: all off


@pytest.mark.slow
@pytest.mark.parametrize("scale", ["tiny", "tiny_sdxl"])  # SD 1.x's text side, and SDXL's added conditioning
def test_bench_runs_at_tiny_scale_and_writes_json(tmp_path, scale):
    from bench.bench_speed import main
    main(["--scale", scale, "--device", "cpu", "--batch", "2", "--iters", "1", "--warmup", "1", "--sample-steps", "2",
          "--sample-iters", "1", "--dreambooth-steps", "3", "--cache-visual-kv", "--out", str(tmp_path)])
    (path,) = tmp_path.glob(f"bench-{scale}-cpu-*.json")
    res = json.loads(path.read_text())
    for key in ("device", "train_samples_per_s", "train_mfu", "sample_s_per_image_bs1", "sample_s_per_image_bs4",
                "adapter_overhead", "speedup_vs_dreambooth", "date", "commit", "torch"):
        assert key in res, key
    assert res["device"] == "cpu" and res["train_mfu"] is None  # MFU only on a GPU
    assert res["train_samples_per_s"] > 0 and res["train"]["step_GFLOP"] > 0
    assert res["sample_s_per_image_bs1"] > 0 and res["sample_s_per_image_bs4"] > 0
    assert res["dreambooth"]["extrapolated"] is True and res["speedup_vs_dreambooth"] > 0
    assert res["speed"]["cache_visual_kv"] is True
    # the other guidance choice, measured in the same run: the adapters skip the unconditional half
    assert res["uncond_adapters"] is True and res["sampling"]["bs1_refs5_uncond_adapters_false"]["s_per_image"] > 0
    assert isinstance(res["adapter_overhead_uncond_plain"], float)
    assert "AttnProcessor2_0" in res["attention_backends"]["unet_and_adapters"]


def test_lit_module_refuses_bf16_frozen_parts_without_mixed_precision():
    import lightning as L
    m = default_config()["model"]
    module = InstantBoothModule(ldm=m["ldm"], image_encoder=m["image_encoder"], speed={"frozen_dtype": "bfloat16"})
    module.trainer = L.Trainer(accelerator="cpu", precision="32-true", logger=False, enable_checkpointing=False)
    with pytest.raises(ConfigError, match="bf16-mixed"):
        module.setup("fit")
    module.trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False, enable_checkpointing=False)
    module.setup("fit")
    assert module.model.ldm.unet.conv_in.weight.dtype == torch.bfloat16
    assert module.model.adapters[0].proj.weight.dtype == torch.float32


@pytest.mark.slow
def test_fit_with_native_bf16_frozen_compute(tmp_path, synthetic_shards):
    """A real Trainer fit under bf16-mixed with the frozen parts computing natively in bf16: finite losses,
    no skipped step, fp32 trainable weights in the checkpoint, and they moved."""
    from ib.cli import main
    from tests.conftest import edit_config, run_config
    config = edit_config(run_config(tmp_path, synthetic_shards, precision="bf16-mixed", max_steps=3),
                         {"model.speed.frozen_dtype": "bfloat16", "model.speed.native_frozen_compute": True})
    assert main(["fit", "--config", str(config)]) == 0
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 3 and ckpt["nonfinite_steps"] == 0
    assert ckpt["hyper_parameters"]["speed"]["native_frozen_compute"] is True
    assert {v.dtype for v in ckpt["state_dict"].values()} == {torch.float32}
    start = InstantBoothModule(**ckpt["hyper_parameters"]).model.trainable_state_dict()
    assert any(not torch.equal(start[k.removeprefix("model.")], v) for k, v in ckpt["state_dict"].items())

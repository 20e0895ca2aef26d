"""bench/estimate_step.py: its autocast emulation records what a real autocast records, and the estimate
runs and tells the precision modes apart."""
import json

import torch
from diffusers import UNet2DConditionModel

from bench import estimate_step as E
from bench.scales import model_config
from ib.models.adapter import adapter_kwargs, install_adapters
from ib.models.heads import PatchHead


def _saved_by(unet, inputs, context) -> tuple[int, list]:
    saved = {}

    def pack(x):
        saved[x.untyped_storage()._cdata] = (x.untyped_storage().nbytes(), str(x.dtype))
        return x
    noisy, t, text, visual = inputs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), context:
        out = unet(noisy, t, encoder_hidden_states=text, cross_attention_kwargs=adapter_kwargs(visual, 1.0)).sample
    return sum(v[0] for v in saved.values()), sorted(saved.values()), out


def test_emulated_autocast_saves_what_real_autocast_saves(monkeypatch):
    """The emulation with CPU autocast's lists (its float32 list holds none of the ops this model reaches) against
    a real CPU autocast, on real tensors: the same saved tensors, bytes and dtypes, and the same output."""
    cfg = model_config("tiny")["ldm"]["unet"]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg).requires_grad_(False)
    width = cfg["cross_attention_dim"]
    install_adapters(unet, width, PatchHead(width, width))  # its forward only hands the visual tokens on
    with torch.no_grad():
        for m in unet.modules():
            if hasattr(m, "gate"):
                m.gate.fill_(0.3)
    inputs = (torch.randn(2, 4, 16, 16), torch.tensor([3, 700]), torch.randn(2, 77, 32), torch.randn(2, 17, 32))
    real = _saved_by(unet, inputs, torch.autocast("cpu", dtype=torch.bfloat16))
    monkeypatch.setattr(E, "FP32", set())
    emulated = _saved_by(unet, inputs, E.CudaStep(autocast=True))
    assert real[0] > 0 and real[:2] == emulated[:2]
    torch.testing.assert_close(real[2], emulated[2], rtol=0, atol=0)


def test_estimate_runs_at_tiny_scale_and_native_bf16_saves_less(tmp_path):
    res = E.main(["--scale", "tiny", "--batch", "2", "--tokens-per-ref", "17", "--sample-settings", "1x0", "1x5",
                  "--out", str(tmp_path)])
    rows = {r["mode"]: r for r in res["train"]}
    assert rows["native_bf16"]["saved_bytes"] < rows["autocast_bf16_weights"]["saved_bytes"]
    assert rows["native_bf16"]["moved_bytes"] < rows["autocast_bf16_weights"]["moved_bytes"]
    assert rows["native_bf16"]["flops"] == rows["autocast_bf16_weights"]["flops"] > 0  # same maths
    # Without adapters in guidance's unconditional half they run on half the batch: fewer FLOPs, more than none.
    calls = {(r["mode"], r["batch"], r["refs"], r["uncond_adapters"]): r["flops"] for r in res["sampling_unet_call"]}
    plain, both, cond_only = (calls[("native_bf16", 1, 0, True)], calls[("native_bf16", 1, 5, True)],
                              calls[("native_bf16", 1, 5, False)])
    assert plain < cond_only < both
    (path,) = tmp_path.glob("estimate_step-tiny-*.json")
    assert json.loads(path.read_text())["sampling_unet_call"]

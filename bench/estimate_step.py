"""Device-free estimate of the adapter-training step's memory at any scale, with no GPU and no weights.

The UNet + adapters forward/backward (the part that keeps activations for backward; the VAE, text encoder
and CLIP run without grad) is run on PyTorch's `meta` device, which tracks shapes and dtypes but computes
nothing, so SD 1.5 at batch 32 takes seconds on a laptop. Per precision mode it reports:

  saved_GiB   activation bytes autograd keeps for backward (unique storages), the bulk of peak memory
  moved_GiB   bytes read + written by the eager kernels of forward + backward (no fusion): divided by the
              card's bandwidth, the time floor of the non-matmul work
  TFLOP       matmul/conv/attention FLOPs (torch.utils.flop_counter)
and, per `compile_scope`, how many graphs Dynamo captures (one Inductor compile each).

Modes:
  autocast_fp32_weights  frozen weights fp32, adapters fp32, under CUDA autocast (the H200 baseline row)
  autocast_bf16_weights  frozen weights bf16, adapters fp32, under CUDA autocast (`frozen_dtype: bfloat16`)
  native_bf16            everything bf16, no autocast (`native_frozen_compute`; the adapters' fp32 master
                         weights add one bf16 copy of the weights per step, not counted here)
  anchor                 a plain-diffusers adapter baseline (pure bf16) from the Python file --anchor (defining
                         `Adapter(dim, context_dim, heads)` and `Pass`), for calibration; skipped without it

The meta device has no autocast, so CUDA autocast's policy is emulated above autograd (as autocast sits):
matmul/conv/linear/attention inputs cast to bf16; layer_norm, group_norm, softmax, exp, pow, sum, mse_loss
to fp32 (the documented CUDA float32 list); everything else by type promotion. With CPU autocast's lists
the same mechanism reproduces a real CPU autocast's saved tensors exactly (checked at tiny scale);
calibration against the H200 peaks measured on 2026-11-28 is in docs/benchmarks.md.

Usage: python bench/estimate_step.py [--batch 32] [--scale sd15|tiny] [--refs 1] [--out bench/results]
"""
import argparse
import datetime
import importlib
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ib.atomic_write import write_json  # noqa: E402
from ib.models.adapter import adapter_kwargs, install_adapters  # noqa: E402
from ib.models.heads import PatchHead  # noqa: E402
from bench.scales import CONFIGS, model_config  # noqa: E402

MODES = ("autocast_fp32_weights", "autocast_bf16_weights", "native_bf16", "anchor")
# CUDA autocast: ops run in bf16 ...
LOW = {F.linear, F.conv2d, torch.matmul, torch.bmm, torch.baddbmm, torch.addmm, torch.mm,
       F.scaled_dot_product_attention, torch.Tensor.__matmul__}
# ... and ops run in fp32 (the part of the documented CUDA float32 list this model reaches)
FP32 = {F.layer_norm, F.group_norm, F.softmax, torch.softmax, torch.Tensor.softmax, torch.exp, torch.Tensor.exp,
        torch.pow, torch.Tensor.pow, torch.Tensor.__pow__, torch.rsqrt, torch.sum, torch.Tensor.sum, F.mse_loss}
# aten ops that only make a view or reshape metadata: no bytes move
VIEWS = {"view", "_unsafe_view", "reshape", "transpose", "permute", "expand", "slice", "select", "t", "unsqueeze",
         "squeeze", "as_strided", "detach", "alias", "split", "split_with_sizes", "chunk", "unbind", "unflatten",
         "flatten", "_reshape_alias", "lift_fresh", "empty", "zeros_like", "empty_like", "empty_strided"}


class CudaStep(TorchFunctionMode):
    """What a CUDA step does that the meta device would not: attention through the flash kernel (the meta
    device's SDPA would take the math path and keep (L x L) attention matrices for backward), and with
    autocast=True, CUDA autocast's casting rules, applied above autograd so the casts are recorded as
    autocast's are."""

    def __init__(self, autocast: bool, dtype=torch.bfloat16):
        super().__init__()
        self.autocast, self.dtype = autocast, dtype

    def __enter__(self):
        # Code that asks whether autocast is on (the adapters do) hears the emulated answer.
        self._is_enabled, torch.is_autocast_enabled = torch.is_autocast_enabled, lambda *a: self.autocast
        return super().__enter__()

    def __exit__(self, *exc):
        torch.is_autocast_enabled = self._is_enabled
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = None
        if self.autocast:
            target = self.dtype if func in LOW else torch.float32 if func in FP32 else None
        if target is not None:
            def cast(x):
                return x.to(target) if torch.is_tensor(x) and x.is_floating_point() else x
            args = tuple(cast(a) for a in args)
            kwargs = {k: cast(v) for k, v in kwargs.items()}
        if func is F.scaled_dot_product_attention and args[0].is_meta:
            assert kwargs.get("attn_mask") is None and not kwargs.get("is_causal"), "flash path: no mask"
            q, k, v = args[:3]
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[0]
        return func(*args, **kwargs)


class BytesMoved(TorchDispatchMode):
    """Bytes read + written by every non-view kernel, as eager (unfused) execution moves them."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ not in VIEWS:
            leaves = torch.utils._pytree.tree_leaves((args, kwargs, out))
            self.bytes += sum(x.nbytes for x in leaves if torch.is_tensor(x))
        return out


ANCHOR_FILE: Path | None = None  # set from --anchor


def unet_with_adapters(scale: str, mode: str):
    """The scale's UNet with InstantBooth's adapters (or the anchor's), on the meta device."""
    from diffusers import UNet2DConditionModel
    cfg = model_config(scale)["ldm"]["unet"]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
        unet.requires_grad_(False)
        if mode == "anchor":
            sys.path.insert(0, str(ANCHOR_FILE.parent))
            anchor = importlib.import_module(ANCHOR_FILE.stem)
            Adapter, Pass = anchor.Adapter, anchor.Pass
            from diffusers.models.attention import BasicTransformerBlock
            for m in unet.modules():
                if isinstance(m, BasicTransformerBlock):
                    m.fuser = Adapter(m.norm1.normalized_shape[0], cfg["cross_attention_dim"], heads=8)
            unet.position_net = Pass()
            unet.to(torch.bfloat16)
        else:
            width = cfg["cross_attention_dim"]
            install_adapters(unet, width, PatchHead(width, width))  # tokens arrive projected; the head only routes them
            frozen = torch.float32 if mode == "autocast_fp32_weights" else torch.bfloat16
            for name, p in unet.named_parameters():
                p.data = p.data.to(torch.bfloat16 if mode == "native_bf16" else
                                   torch.float32 if ".fuser." in name else frozen)
    return unet, cfg


def _inputs(cfg: dict, mode: str, batch: int, tokens: int):
    dt = torch.float32 if mode.startswith("autocast") else torch.bfloat16
    side, width = cfg["sample_size"], cfg["cross_attention_dim"]
    return (torch.randn(batch, cfg["in_channels"], side, side, device="meta", dtype=dt),
            torch.zeros(batch, dtype=torch.long, device="meta"),
            torch.randn(batch, 77, width, device="meta", dtype=dt),
            torch.randn(batch, tokens, width, device="meta", dtype=dt))


def estimate_train(scale: str, mode: str, batch: int, tokens: int) -> dict:
    """One training step's UNet + adapters forward and backward."""
    unet, cfg = unet_with_adapters(scale, mode)
    noisy, t, text, visual = _inputs(cfg, mode, batch, tokens)
    kwargs = {"gligen": {"objs": visual}} if mode == "anchor" else adapter_kwargs(visual, 1.0)
    saved = {}

    def pack(x):
        saved[x.untyped_storage()._cdata] = x.untyped_storage().nbytes()
        return x

    moved = BytesMoved()
    with FlopCounterMode(display=False) as flops, moved:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), CudaStep(mode.startswith("autocast")):
            out = unet(noisy, t, encoder_hidden_states=text, cross_attention_kwargs=kwargs).sample
            loss = F.mse_loss(out.float(), noisy.float())
        loss.backward()
    return {"mode": mode, "saved_bytes": sum(saved.values()), "moved_bytes": moved.bytes,
            "saved_GiB": round(sum(saved.values()) / 2**30, 2), "moved_GiB": round(moved.bytes / 2**30, 1),
            "flops": flops.get_total_flops(), "TFLOP": round(flops.get_total_flops() / 1e12, 2),
            "frozen_weights_GiB": round(sum(p.nbytes for p in unet.parameters() if not p.requires_grad) / 2**30, 2)}


@torch.no_grad()
def estimate_sampling_call(scale: str, mode: str, batch: int, tokens: int, uncond_adapters: bool = True) -> dict:
    """One CFG UNet call of sampling (batch doubled), with the visual keys/values cached as
    `cache_visual_kv` does (the anchor has no cache); tokens 0: plain SD. uncond_adapters False: the
    unconditional half is the plain frozen model and the adapters skip it (`skip_rows`)."""
    unet, cfg = unet_with_adapters(scale, mode)
    noisy, t, text, visual = _inputs(cfg, mode, 2 * batch, tokens)
    skip = 0 if uncond_adapters else batch
    if tokens == 0:  # plain SD: the adapters are not called
        kwargs = None
    elif mode == "anchor":
        kwargs = {"gligen": {"objs": visual}}
    else:
        visual = visual[skip:]
        with CudaStep(mode.startswith("autocast")):
            kv = tuple(m.fuser.visual_kv(visual) for m in unet.modules() if hasattr(m, "fuser"))
        kwargs = adapter_kwargs(visual, 1.0, kv, skip)
    moved = BytesMoved()
    with FlopCounterMode(display=False) as flops, moved, CudaStep(mode.startswith("autocast")):
        unet(noisy, t, encoder_hidden_states=text, cross_attention_kwargs=kwargs)
    return {"mode": mode, "uncond_adapters": uncond_adapters, "moved_GiB": round(moved.bytes / 2**30, 2),
            "flops": flops.get_total_flops(), "TFLOP": round(flops.get_total_flops() / 1e12, 3)}


def count_compiles(scale: str, batch: int, train_tokens: int, tokens_per_ref: int,
                   sample_settings: list[tuple[int, int]]) -> dict:
    """Graphs Dynamo captures per `compile_scope` for one training forward and one sampling call per
    setting (static shapes, as `compile_blocks` compiles): each is one Inductor compile (training adds
    its backward), so compile time grows with these counts."""
    from torch._dynamo.testing import CompileCounter
    from ib.models.speed import COMPILE_SCOPES, RECOMPILE_LIMIT
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    out = {}
    for scope, blocks in COMPILE_SCOPES.items():
        torch._dynamo.reset()
        unet, cfg = unet_with_adapters(scale, "native_bf16")
        counter = CompileCounter()
        for m in unet.modules():
            if isinstance(m, blocks):
                m.compile(backend=counter, dynamic=False)
        noisy, t, text, visual = _inputs(cfg, "native_bf16", batch, train_tokens)
        with CudaStep(autocast=False):
            unet(noisy, t, encoder_hidden_states=text, cross_attention_kwargs=adapter_kwargs(visual, 1.0))
        train = counter.frame_count
        with torch.no_grad(), CudaStep(autocast=False):
            for bs, refs in sample_settings:
                noisy, t, text, visual = _inputs(cfg, "native_bf16", 2 * bs, refs * tokens_per_ref)
                unet(noisy, t, encoder_hidden_states=text,
                     cross_attention_kwargs=adapter_kwargs(visual, 1.0) if refs else None)
        out[scope] = {"training_forward_graphs": train, "sampling_graphs": counter.frame_count - train}
    torch._dynamo.reset()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=sorted(CONFIGS), default="sd15")
    ap.add_argument("--batch", type=int, default=32, help="training batch")
    ap.add_argument("--train-refs", type=int, default=1)
    ap.add_argument("--sample-settings", nargs="*", default=["1x0", "1x1", "1x5", "4x1"],
                    help="BATCHxREFS of the sampling UNet call (refs 0: plain SD)")
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--tokens-per-ref", type=int, default=257, help="ViT-L/14 at 224 px: CLS + 16x16 patches")
    ap.add_argument("--bandwidth", type=float, default=4.8e12, help="bytes/s for the floors (H200 HBM3e)")
    ap.add_argument("--peak-flops", type=float, default=790e12, help="FLOP/s for the floors (H200 dense bf16)")
    ap.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--anchor", type=Path, help="the anchor mode's model file (see Modes); without it, no anchor")
    a = ap.parse_args(argv)
    global ANCHOR_FILE
    ANCHOR_FILE = a.anchor
    modes = [m for m in a.modes if m != "anchor" or (a.anchor is not None and a.anchor.is_file())]
    train = [estimate_train(a.scale, m, a.batch, a.train_refs * a.tokens_per_ref) for m in modes]
    # The sampler never runs fp32 weights under autocast (fp32 frozen parts sample in plain fp32/TF32).
    settings = [tuple(int(v) for v in x.split("x")) for x in a.sample_settings]
    sampling = [dict(estimate_sampling_call(a.scale, m, bs, refs * a.tokens_per_ref), batch=bs, refs=refs)
                for bs, refs in settings for m in modes if m != "autocast_fp32_weights"]
    # model.uncond_adapters: false, where the adapters run on guidance's conditional half only
    sampling += [dict(estimate_sampling_call(a.scale, "native_bf16", bs, refs * a.tokens_per_ref, False),
                      batch=bs, refs=refs) for bs, refs in settings if refs and "native_bf16" in modes]
    for r in train:
        r["floor_s"] = {"matmul": round(r["TFLOP"] * 1e12 / a.peak_flops, 4), "memory": round(r["moved_GiB"] * 2**30 / a.bandwidth, 4)}
    for r in sampling:
        n, bs = a.sample_steps, r["batch"]
        r["floor_s_per_image"] = {"matmul": round(n * r["TFLOP"] * 1e12 / a.peak_flops / bs, 4),
                                  "memory": round(n * r["moved_GiB"] * 2**30 / a.bandwidth / bs, 4)}
    compiles = count_compiles(a.scale, a.batch, a.train_refs * a.tokens_per_ref, a.tokens_per_ref, settings)
    res = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "scale": a.scale, "args": vars(a),
           "train": train, "sampling_unet_call": sampling, "compile_graphs": compiles,
           "what": "UNet + adapters on the meta device, flash attention and CUDA autocast emulated "
                   "(bench/estimate_step.py); floors = FLOPs / peak and eager bytes / bandwidth"}
    print(f"\n== estimate: {a.scale} UNet + adapters, training batch {a.batch} x {a.train_refs} ref(s), "
          f"{a.sample_steps}-step CFG sampling, {a.tokens_per_ref} tokens per ref")
    print(f"  {'training step':<28}{'saved GiB':>10}{'moved GiB':>11}{'TFLOP':>8}{'floor s: matmul':>17}{'memory':>8}")
    for r in train:
        print(f"  {r['mode']:<28}{r['saved_GiB']:>10}{r['moved_GiB']:>11}{r['TFLOP']:>8}"
              f"{r['floor_s']['matmul']:>17}{r['floor_s']['memory']:>8}")
    print(f"  {'sampling UNet call':<28}{'BxR':>10}{'moved GiB':>11}{'TFLOP':>8}{'floor s/img: matmul':>21}{'memory':>8}")
    for r in sampling:
        mode = r["mode"] + ("" if r.get("uncond_adapters", True) else ", uncond plain")
        print(f"  {mode:<28}{str(r['batch']) + 'x' + str(r['refs']):>10}{r['moved_GiB']:>11}{r['TFLOP']:>8}"
              f"{r['floor_s_per_image']['matmul']:>21}{r['floor_s_per_image']['memory']:>8}")
    print(f"  {'compile_scope':<28}{'training forward graphs':>24}{'sampling graphs (all settings)':>32}")
    for scope, c in compiles.items():
        print(f"  {scope:<28}{c['training_forward_graphs']:>24}{c['sampling_graphs']:>32}")
    os.makedirs(a.out, exist_ok=True)
    path = Path(a.out) / f"estimate_step-{a.scale}-{res['date']}.json"
    write_json(path, res)  # atomically: a cut-short run leaves no half-written file
    print(f"\n  written: {path}")
    return res


if __name__ == "__main__":
    main()

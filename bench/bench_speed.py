"""`make bench`: training throughput, sampling latency and the "instant" claim, through the real code.

Random weights (speed does not depend on their values). Scales (bench/scales.py):
  tiny  the embedded default model (conf/default.yaml) — runs on CPU in a few minutes
  sd15  Stable Diffusion 1.5 + OpenCLIP ViT-L/14 shapes (conf/sd15.yaml) — for a GPU
  sd21  Stable Diffusion 2.1 (768 px, v-prediction) + OpenCLIP ViT-L/14 (conf/sd21.yaml) — for a GPU

What it measures, in one run on one device:
  train     InstantBooth.training_loss (VAE encode, text encoder, CLIP backbone, heads, adapters, UNet
            forward) + backward + AdamW step: samples/s, peak memory, FLOPs (torch.utils.flop_counter over
            the whole step) and MFU against --peak-flops (GPU only; null on CPU).
  sample    ib.models.sampler.sample: encode references + N-step CFG + VAE decode, batch 1 and 4 with 1 and
            5 references, and plain SD (refs None: β = 0 and no concept, which the sampler guarantees is the
            frozen model) — the adapters' overhead is against that, in the same run.
  personalization  InstantBooth (encode 5 references + generate one image) against a DreamBooth-style full
            UNet fine-tune (batch 2, AdamW on every UNet parameter, 400 steps) + the same generation.
            --dreambooth-steps fewer than 400 are extrapolated linearly, and the JSON says so.
  --sweep   every speed switch (ib/models/speed.py) on its own against the all-off baseline, then all the
            recommended ones together.

Usage: python bench/bench_speed.py [--scale tiny|sd15|sd21|sdxl] [--sweep] [switch flags] [--out bench/results]
"""
import argparse
import copy
import dataclasses
import datetime
import gc
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ib.models.frozen_ldm import LDMConfig  # noqa: E402
from ib.models.image_encoder import ImageEncoderConfig  # noqa: E402
from ib.atomic_write import write_json  # noqa: E402
from ib.models.frozen_ldm import FrozenLDM  # noqa: E402
from ib.models.image_encoder import FrozenImageEncoder  # noqa: E402
from ib.models.instantbooth import InstantBooth  # noqa: E402
from ib.models.sampler import SamplingConfig  # noqa: E402
from ib.models.speed import SpeedConfig, attention_backends, check_speed  # noqa: E402
from ib.pipeline import InstantBoothPipeline, generate  # noqa: E402
from bench.scales import CONFIGS, model_config  # noqa: E402

DEFAULTS = {  # per scale: what a run on its intended device can afford
    "tiny": dict(batch=4, iters=5, warmup=2, sample_iters=3, dreambooth_steps=20, budget_s=1e9),
    # budget: what is left is skipped (and said so) so a 10-minute GPU slot still writes its JSON
    "sd15": dict(batch=32, iters=10, warmup=3, sample_iters=3, dreambooth_steps=200, budget_s=450),
    "sd21": dict(batch=16, iters=10, warmup=3, sample_iters=3, dreambooth_steps=200, budget_s=450),  # 768 px
    "sdxl": dict(batch=8, iters=10, warmup=3, sample_iters=3, dreambooth_steps=100, budget_s=450),  # 1024 px
}
DEFAULTS.update(tiny_sd21=DEFAULTS["tiny"], tiny_sdxl=DEFAULTS["tiny"])
PROMPT = "a photo of a sks dog on the beach"
DREAMBOOTH_STEPS = 400  # the diffusers DreamBooth recipe
GATE = 0.1  # adapters opened a little, as after training (cost does not depend on it)
SWITCHES = {  # sweep name -> SpeedConfig change (precomputed_latents is a data property, not a model switch)
    "cuda_graphs_sampling": dict(cuda_graphs_sampling=True),
    "frozen_bf16": dict(frozen_dtype="bfloat16"),
    "native_bf16": dict(frozen_dtype="bfloat16", native_frozen_compute=True),
    "channels_last": dict(channels_last=True),
    "fused_optimizer": dict(fused_optimizer=True),
    "cache_visual_kv": dict(cache_visual_kv=True),
    "precomputed_latents": {},
    "compile_transformer": dict(compile_blocks=True, compile_scope="transformer"),
    "compile_blocks": dict(compile_blocks=True),
    "gradient_checkpointing": dict(gradient_checkpointing=True),
    "no_sdpa": dict(sdpa=False),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=sorted(CONFIGS), default=None, help="default: sd15 on CUDA, tiny otherwise")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, help="training batch size")
    ap.add_argument("--train-refs", type=int, default=1, help="references per training sample")
    ap.add_argument("--iters", type=int, help="timed training steps (median reported)")
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--sample-iters", type=int, help="timed sampling runs per setting (after one warm-up)")
    ap.add_argument("--guidance-scale", type=float, default=7.5)
    ap.add_argument("--dreambooth-steps", type=int, help=f"steps actually run; extrapolated to {DREAMBOOTH_STEPS}")
    ap.add_argument("--peak-flops", type=float, default=790e12, help="device peak for MFU (H200 dense bf16)")
    ap.add_argument("--sweep", action="store_true", help="measure each switch against the all-off baseline")
    ap.add_argument("--skip", nargs="*", default=[], choices=sorted(SWITCHES) + ["recommended"],
                    help="sweep entries to leave out (e.g. compile_blocks: Inductor compiles take minutes on 2 CPU cores)")
    ap.add_argument("--sample-settings", nargs="*", default=["1x0", "1x1", "1x5", "4x0", "4x1", "4x5"],
                    help="BATCHxREFS sampling settings of the main measurement (refs 0: plain SD)")
    ap.add_argument("--no-sampling-compile", action="store_true",
                    help="sample without compile_blocks (CUDA graphs alone: no compile wait per new shape)")
    ap.add_argument("--train-last", action="store_true",
                    help="main measurement: sampling and DreamBooth first, training (the longest compile) last")
    ap.add_argument("--budget-s", type=float, help="skip what is left after this many seconds (sd15: 450)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (1 gives steadier timings on a shared CPU)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    # speed switches for the main measurement (ib/models/speed.py)
    ap.add_argument("--frozen-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--native-frozen-compute", action="store_true", help="with --frozen-dtype bfloat16: frozen parts compute in bf16 with autocast off")
    ap.add_argument("--no-sdpa", action="store_true")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile-blocks", action="store_true")
    ap.add_argument("--compile-scope", default="all", choices=["all", "transformer"])
    ap.add_argument("--cuda-graphs-sampling", action="store_true")
    ap.add_argument("--fused-optimizer", action="store_true")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--cache-visual-kv", action="store_true")
    ap.add_argument("--precomputed-latents", action="store_true", help="training batch carries VAE latents")
    ap.add_argument("--recommended", action="store_true",
                    help="main measurement with conf/sd15.yaml's model.speed (CUDA-only switches dropped on CPU)")
    a = ap.parse_args(argv)
    a.scale = a.scale or ("sd15" if a.device.startswith("cuda") else "tiny")
    for k, v in DEFAULTS[a.scale].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def main_speed(a) -> SpeedConfig:
    if a.recommended:
        return recommended(a.device)
    return SpeedConfig(frozen_dtype=a.frozen_dtype, native_frozen_compute=a.native_frozen_compute,
                       sdpa=not a.no_sdpa, channels_last=a.channels_last,
                       compile_blocks=a.compile_blocks, compile_scope=a.compile_scope, cuda_graphs_sampling=a.cuda_graphs_sampling,
                       fused_optimizer=a.fused_optimizer, gradient_checkpointing=a.gradient_checkpointing,
                       cache_visual_kv=a.cache_visual_kv)


def recommended(device: str) -> SpeedConfig:
    """conf/sd15.yaml's training switches, plus CUDA graphs for sampling where there is CUDA."""
    cfg = SpeedConfig(**model_config("sd15").get("speed", {}))
    return dataclasses.replace(cfg, cuda_graphs_sampling=device.startswith("cuda"))


def for_training(cfg: SpeedConfig) -> SpeedConfig:
    return dataclasses.replace(cfg, cuda_graphs_sampling=False)


def for_sampling(cfg: SpeedConfig) -> SpeedConfig:
    """Training-only switches off (they change nothing in a no-grad run)."""
    return dataclasses.replace(cfg, fused_optimizer=False, gradient_checkpointing=False)


# Swept after the main measurement: compiles take minutes and the last two matter least, so a budget-limited
# GPU run loses them first; the transformer-only compile (few shapes) goes before the full one.
LATE = ("compile_transformer", "compile_blocks", "gradient_checkpointing", "no_sdpa")


# --- measuring ------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, a):
        self.a, self.dev = a, torch.device(a.device)
        self.t0 = time.time()
        m = model_config(a.scale)  # random weights of the architecture
        ldm, enc = LDMConfig(**m["ldm"]), ImageEncoderConfig(**m["image_encoder"])
        t = time.time()
        # The frozen parts, built once; every variant is a copy with its own speed switches.
        self.frozen = (FrozenLDM.from_config(ldm).to(self.dev), FrozenImageEncoder.build(enc).to(self.dev))
        self.base = self.variant(SpeedConfig())
        self.build_s = time.time() - t
        self.image_size = self.base.ldm.image_size
        self.ref_size = self.base.image_encoder.image_size
        self.flops_cache = {}

    def over_budget(self) -> bool:
        return time.time() - self.t0 > self.a.budget_s

    def sync(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn, warmup, iters) -> tuple[float, float]:
        """(first call s, typical s) — the first call includes any compilation. Typical: the median on a
        GPU; on CPU the minimum, because a shared CPU's noise only ever adds time (other processes)."""
        t = time.perf_counter()
        fn()
        self.sync()
        first = time.perf_counter() - t
        for _ in range(max(0, warmup - 1)):
            fn()
        self.sync()
        ts = []
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            self.sync()
            ts.append(time.perf_counter() - t)
        ts.sort()
        return first, ts[len(ts) // 2] if self.dev.type == "cuda" else ts[0]

    def reset_memory(self):
        gc.collect()
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self):
        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if self.dev.type == "cuda" else None

    def autocast(self, cfg: SpeedConfig):
        """bf16 autocast as Lightning's bf16-mixed on GPU; on CPU only when the frozen parts are bf16."""
        on = self.dev.type == "cuda" or cfg.frozen_dtype != "float32"
        return torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=on)

    def variant(self, cfg: SpeedConfig, inference: bool = False) -> InstantBooth:
        """A copy of the frozen parts with new heads and adapters (the same for every variant: seeded), built
        with the switches `cfg`; adapter gates opened so the adapters' compute is not skipped."""
        self.reset_memory()
        check_speed(cfg, self.dev.type)
        torch.manual_seed(0)
        ldm, encoder = (copy.deepcopy(m) for m in self.frozen)
        model = InstantBooth(ldm, encoder, speed=cfg, inference=inference).to(self.dev)
        with torch.no_grad():
            for ad in model.adapters:
                ad.gate.fill_(GATE)
        return model

    # --- training ---
    def train_batch(self, bs, model, cfg: SpeedConfig):
        g = torch.Generator().manual_seed(0)
        images = torch.rand(bs, 3, self.image_size, self.image_size, generator=g).to(self.dev)
        refs = torch.rand(bs, self.a.train_refs, 3, *self.ref_size, generator=g).to(self.dev)
        with torch.no_grad(), self.autocast(cfg):
            latents = model.ldm.encode_images(images)
        return images, refs, [PROMPT] * bs, latents

    def train(self, cfg: SpeedConfig, precomputed_latents=False) -> dict:
        a, cfg = self.a, for_training(cfg)
        model = self.variant(cfg)
        groups = model.param_groups()
        opt = torch.optim.AdamW([{"params": groups["heads"]}, {"params": groups["adapters"]}], lr=1e-6,
                                fused=cfg.fused_optimizer or None)
        images, refs, captions, latents = self.train_batch(a.batch, model, cfg)
        latents = latents if precomputed_latents else None

        def step():
            with self.autocast(cfg):
                loss = model.training_loss(images, refs, captions, latents=latents)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        first, s = self.timed(step, a.warmup, a.iters)
        peak = self.peak_gib()
        flops = self.step_flops(precomputed_latents)
        out = {"batch": a.batch, "step_s": round(s, 4), "samples_per_s": round(a.batch / s, 2),
               "first_step_s": round(first, 2), "peak_mem_GiB": peak, "step_GFLOP": round(flops / 1e9, 2),
               "achieved_TFLOP_per_s": round(flops / s / 1e12, 4),
               "mfu": round(flops / s / a.peak_flops, 4) if self.dev.type == "cuda" else None}
        del model, opt
        return out

    def step_flops(self, precomputed_latents: bool) -> float:
        """Model FLOPs of one full step, counted once on the plain eager model (the same maths for every
        switch; gradient checkpointing's recomputation is not counted, as usual for MFU)."""
        key = bool(precomputed_latents)
        if key not in self.flops_cache:
            from torch.utils.flop_counter import FlopCounterMode
            model = self.variant(SpeedConfig())
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
            images, refs, captions, latents = self.train_batch(self.a.batch, model, SpeedConfig())
            with FlopCounterMode(display=False) as fc:
                with self.autocast(SpeedConfig()):
                    loss = model.training_loss(images, refs, captions, latents=latents if key else None)
                loss.backward()
                opt.step()
            self.flops_cache[key] = fc.get_total_flops()
            del model, opt
        return self.flops_cache[key]

    # --- sampling ---
    def sample_time(self, model, bs: int, n_refs: int) -> dict:
        """n_refs 0: plain SD (no references: β = 0 and no concept — the frozen model)."""
        a = self.a
        g = torch.Generator().manual_seed(1)
        refs = torch.rand(bs, n_refs, 3, *self.ref_size, generator=g).to(self.dev) if n_refs else None
        cfg = SamplingConfig(steps=a.sample_steps, guidance_scale=a.guidance_scale, use_concept=n_refs > 0)
        pipe = InstantBoothPipeline.from_model(model, cfg.scheduler)
        first, s = self.timed(lambda: generate(pipe, refs, [PROMPT] * bs, cfg, seeds=list(range(bs))),
                              1, a.sample_iters)
        return {"bs": bs, "refs": n_refs, "s_per_batch": round(s, 4), "s_per_image": round(s / bs, 4),
                "first_run_s": round(first, 2), "peak_mem_GiB": self.peak_gib()}

    def graph_check(self, model) -> dict:
        """Graph replay against the same weights called eagerly: the same images (bs 1, 1 reference)."""
        g = torch.Generator().manual_seed(2)
        refs = torch.rand(1, 1, 3, *self.ref_size, generator=g).to(self.dev)
        cfg = SamplingConfig(steps=self.a.sample_steps, guidance_scale=self.a.guidance_scale)
        graphed = generate(InstantBoothPipeline.from_model(model), refs, [PROMPT], cfg, seeds=[3])
        eager_model = self.variant(dataclasses.replace(model.speed, cuda_graphs_sampling=False), inference=True)
        eager = generate(InstantBoothPipeline.from_model(eager_model), refs, [PROMPT], cfg, seeds=[3])
        del eager_model
        return {"max_abs_diff": float((graphed - eager).abs().max()),
                "graphs_captured": len(model.noise_predictor().graphs),
                "what": "images in [0, 1] from graph replay vs the same weights called eagerly, bs 1, 1 reference"}

    # --- DreamBooth-style baseline ---
    def dreambooth(self, cfg: SpeedConfig) -> dict:
        """Full fine-tune of every UNet weight (fp32 master weights, AdamW, batch 2), with the VAE encode
        and text encoder per step as in diffusers' train_dreambooth.py; the same autocast as training."""
        a, bs = self.a, 2
        self.reset_memory()
        model = copy.deepcopy(self.base)
        unet = model.ldm.unet
        params = [p for n, p in unet.named_parameters() if ".fuser." not in n]  # the plain SD UNet
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=5e-6, fused=(self.dev.type == "cuda") or None)
        images, _, captions, _ = self.train_batch(bs, model, SpeedConfig())
        sched = model.ldm.noise_scheduler

        def step():
            with self.autocast(SpeedConfig()):
                latents = model.ldm.encode_images(images)
                text = model.encode_prompts(captions)
                added = model.encode_added(captions, tuple(images.shape[-2:]))  # SDXL; None otherwise
                noise = torch.randn_like(latents)
                t = torch.randint(0, sched.config.num_train_timesteps, (bs,), device=self.dev)
                pred = unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=text,
                            added_cond_kwargs=added).sample
            torch.nn.functional.mse_loss(pred.float(), noise.float()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        warm = min(2, a.dreambooth_steps)
        for _ in range(warm):
            step()
        self.sync()
        n = max(1, a.dreambooth_steps - warm)
        t = time.perf_counter()
        for _ in range(n):
            step()
        self.sync()
        step_s = (time.perf_counter() - t) / n  # mean over the steps: a fine-tune pays for all of them
        out = {"batch": bs, "steps_run": warm + n, "steps_timed": n, "steps_target": DREAMBOOTH_STEPS,
               "step_s": round(step_s, 4), "finetune_s": round(DREAMBOOTH_STEPS * step_s, 2),
               "extrapolated": n + warm < DREAMBOOTH_STEPS, "peak_mem_GiB": self.peak_gib()}
        del model, opt, params
        return out


# --- the run ---------------------------------------------------------------------------------------------
def git_commit() -> str:
    if os.environ.get("IB_COMMIT"):  # a copy of the tree without .git (e.g. a rented GPU machine)
        return os.environ["IB_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def device_name(dev: str) -> str:
    if dev.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores"


def safely(res: dict, key: str, bench: Bench, fn):
    """Every figure is independent: an error or the budget skips it, the rest still runs."""
    if bench.over_budget():
        res[key] = "skipped: --budget-s reached"
    else:
        try:
            res[key] = fn()
        except Exception as e:  # noqa: BLE001 — recorded in the JSON, the run goes on
            res[key] = f"error: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:400]
    print(f"  {key}: {res[key]}", flush=True)
    return res[key]


def run(a) -> dict:
    if a.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 paths on Ampere+ as anyone would run them
        torch.backends.cudnn.allow_tf32 = True
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = main_speed(a)
    stamp = datetime.datetime.now(datetime.timezone.utc)
    res = {"date": stamp.isoformat(timespec="seconds"), "commit": git_commit(), "torch": torch.__version__,
           "device": a.device, "device_name": device_name(a.device), "scale": a.scale,
           "machine": f"{platform.node()} ({platform.platform()}), {os.cpu_count()} logical cores",
           "torch_threads": torch.get_num_threads() if not a.threads else a.threads,
           "args": vars(a), "speed": dataclasses.asdict(cfg),
           "timing": "median of timed runs" if a.device.startswith("cuda") else
                     "minimum of timed runs (shared CPU: other processes only add time)"}
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench-{a.scale}-{a.device.split(':')[0]}-{stamp:%Y-%m-%d}{'-sweep' if a.sweep else ''}.json"

    def save():  # after every figure: a run cut short still leaves what it measured
        res["wall_s"] = round(time.time() - bench.t0, 1)
        res["process_max_rss_GiB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        write_json(path, res, default=str)

    print(f"building the {a.scale} model on {a.device} ...", flush=True)
    bench = Bench(a)
    res["build_s"] = round(bench.build_s, 1)
    res["attention_backends"] = attention_backends(bench.base)
    res["trainable_params_M"] = round(sum(p.numel() for p in bench.base.parameters() if p.requires_grad) / 1e6, 2)

    rows = []
    if a.sweep:  # the cheap eager variants first: the "before" of every switch
        res["sweep"] = rows
        sweep(a, bench, save, rows, [v for v in variants(a) if v[0] not in LATE and v[0] != "recommended"])

    print("main measurement, speed =", res["speed"], flush=True)

    def measure_train():
        out = safely(res, "train", bench, lambda: bench.train(cfg, a.precomputed_latents))
        save()
        return out
    train = None if a.train_last else measure_train()
    sampling = {}
    smodel = None
    scfg = for_sampling(cfg)
    if a.no_sampling_compile:
        scfg = dataclasses.replace(scfg, compile_blocks=False)
    res["sampling_speed"] = dataclasses.asdict(scfg)
    try:
        smodel = bench.variant(scfg, inference=True)
    except Exception as e:  # noqa: BLE001
        res["sampling_error"] = f"{type(e).__name__}: {e}"
    for bs, n_refs in (tuple(int(v) for v in x.split("x")) for x in a.sample_settings):
        if smodel is not None:
            safely(sampling, f"bs{bs}_refs{n_refs}", bench, lambda: bench.sample_time(smodel, bs, n_refs))
        res["sampling"] = sampling
        save()
    res["uncond_adapters"] = bench.base.uncond_adapters
    if smodel is not None and "bs1_refs5" in sampling:
        # The other guidance choice (model.uncond_adapters: false): the adapters run on the conditional half only.
        smodel.uncond_adapters = not bench.base.uncond_adapters
        key = "bs1_refs5_uncond_adapters_" + str(smodel.uncond_adapters).lower()
        safely(sampling, key, bench, lambda: bench.sample_time(smodel, 1, 5))
        smodel.uncond_adapters = bench.base.uncond_adapters
        save()
    if smodel is not None and cfg.cuda_graphs_sampling:
        safely(res, "cuda_graph_check", bench, lambda: bench.graph_check(smodel))
        save()
    del smodel
    db = safely(res, "dreambooth", bench, lambda: bench.dreambooth(cfg))
    save()
    if a.train_last:
        train = measure_train()

    def per_image(key):
        v = sampling.get(key)
        return v["s_per_image"] if isinstance(v, dict) else None

    def ratio(x, y):
        return round(x / y - 1, 4) if x and y else None
    res["train_samples_per_s"] = train.get("samples_per_s") if isinstance(train, dict) else None
    res["train_mfu"] = train.get("mfu") if isinstance(train, dict) else None
    res["train_mfu_note"] = (f"FlopCounterMode FLOPs of the whole step / step time / {a.peak_flops:.3g}"
                             if a.device.startswith("cuda") else "null on CPU: MFU is only meaningful on a GPU")
    res["sample_s_per_image_bs1"] = per_image("bs1_refs1")
    res["sample_s_per_image_bs4"] = per_image("bs4_refs1")
    res["adapter_overhead"] = ratio(per_image("bs1_refs5"), per_image("bs1_refs0"))  # 5 refs, batch 1
    res["adapter_overhead_refs1"] = ratio(per_image("bs1_refs1"), per_image("bs1_refs0"))
    res["adapter_overhead_uncond_plain"] = ratio(  # 5 refs, batch 1, guidance's unconditional half without adapters
        per_image("bs1_refs5") if not res["uncond_adapters"] else per_image("bs1_refs5_uncond_adapters_false"),
        per_image("bs1_refs0"))
    personalize = per_image("bs1_refs5")  # encode 5 references + generate one image
    res["personalization_s"] = personalize
    if isinstance(db, dict) and personalize and per_image("bs1_refs0"):
        db["total_s"] = round(db["finetune_s"] + per_image("bs1_refs0"), 2)  # + the same generation (plain)
        res["speedup_vs_dreambooth"] = round(db["total_s"] / personalize, 1)
    else:
        res["speedup_vs_dreambooth"] = None
    save()

    if a.sweep:
        late = [v for v in variants(a) if v[0] in LATE]
        if a.recommended or dataclasses.asdict(cfg) == dataclasses.asdict(recommended(a.device)):
            rows.append({"name": "recommended", "speed": res["speed"], "same_as": "main measurement",
                         "train": train, "sample_bs1_refs5": sampling.get("bs1_refs5")})
        else:
            late.append(("recommended", recommended(a.device), False))
        sweep(a, bench, save, rows, late)
        speedups(rows)
    save()
    res["results_file"] = str(path)
    return res


def variants(a) -> list[tuple[str, SpeedConfig, bool]]:
    """(name, speed, precomputed latents): the all-off baseline, each switch alone, the recommended set."""
    out = [("baseline", SpeedConfig(), False)]
    out += [(name, SpeedConfig(**change), name == "precomputed_latents") for name, change in SWITCHES.items()]
    rec = recommended(a.device)
    if rec.compile_blocks:  # the set without its compile: the compile's own share, and what is left if
        # Inductor fails on a block (as it did on a whole adapter-carrying SD 1.5 UNet in training)
        out.append(("recommended_eager", dataclasses.replace(rec, compile_blocks=False), False))
    return out + [("recommended", rec, False)]


def sweep(a, bench: Bench, save, rows: list, todo) -> None:
    """Training step and 1-image sampling with 5 references (where the adapters cost most) per variant."""
    for name, cfg, latents in todo:
        if name in a.skip:
            rows.append({"name": name, "speed": dataclasses.asdict(cfg), "train": "skipped: --skip"})
            continue
        print(f"sweep: {name}", flush=True)
        row = {"name": name, "speed": dataclasses.asdict(cfg), "precomputed_latents": latents}
        if cfg.cuda_graphs_sampling and bench.dev.type != "cuda":
            row["train"] = row["sample_bs1_refs5"] = "refused: CUDA graphs need a CUDA device"
        else:
            trains = name not in ("cuda_graphs_sampling", "cache_visual_kv")  # sampling-only switches
            samples = name not in ("fused_optimizer", "gradient_checkpointing", "precomputed_latents")
            if trains:
                safely(row, "train", bench, lambda: bench.train(cfg, latents))
            if samples:
                def one():
                    model = bench.variant(for_sampling(cfg), inference=True)
                    return bench.sample_time(model, 1, 5)
                safely(row, "sample_bs1_refs5", bench, one)
        rows.append(row)
        save()


def speedups(rows: list[dict]) -> None:
    base = next((r for r in rows if r["name"] == "baseline"), None)
    if base is None:
        return
    for row in rows:
        if row is base:
            continue
        for key, metric, better in (("train", "samples_per_s", 1), ("sample_bs1_refs5", "s_per_image", -1)):
            if isinstance(row.get(key), dict) and isinstance(base.get(key), dict):
                row[f"{key}_speedup"] = round((row[key][metric] / base[key][metric]) ** better, 3)


def fmt(v, unit=""):
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}{unit}"
    return f"{v}{unit}"


def print_table(res: dict) -> None:
    t = res.get("train") if isinstance(res.get("train"), dict) else {}
    db = res.get("dreambooth") if isinstance(res.get("dreambooth"), dict) else {}
    print(f"\n== ib bench: {res['scale']} on {res['device_name']} (torch {res['torch']}, {res['commit'][:12]})")
    rows = [
        ("train samples/s (batch %s)" % t.get("batch"), fmt(res.get("train_samples_per_s"))),
        ("train step s", fmt(t.get("step_s"))),
        ("train step GFLOP (flop counter)", fmt(t.get("step_GFLOP"))),
        ("train MFU", fmt(res.get("train_mfu"))),
        ("train peak memory GiB", fmt(t.get("peak_mem_GiB"))),
    ]
    for key, v in (res.get("sampling") or {}).items():
        if isinstance(v, dict):
            rows.append((f"sample s/image {key}", fmt(v["s_per_image"])))
    rows += [
        ("adapter overhead, 5 refs (1 ref)", f"{fmt(res.get('adapter_overhead'))} ({fmt(res.get('adapter_overhead_refs1'))})"),
        ("adapter overhead, 5 refs, unconditional half plain", fmt(res.get("adapter_overhead_uncond_plain"))),
        ("personalization s (5 refs + 1 image)", fmt(res.get("personalization_s"))),
        ("DreamBooth-style %s steps + image s%s" % (db.get("steps_target"), " (extrapolated)" if db.get("extrapolated") else ""),
         fmt(db.get("total_s"))),
        ("speedup vs DreamBooth", fmt(res.get("speedup_vs_dreambooth"), "x")),
    ]
    w = max(len(r[0]) for r in rows)
    for name, v in rows:
        print(f"  {name:<{w}}  {v}")
    if res.get("sweep"):
        print("\n  sweep (each switch alone vs baseline; speedup > 1 is better)")
        print(f"  {'switch':<24}{'train samples/s':>16}{'x':>7}{'sample s/img bs1 5refs':>24}{'x':>7}")
        for r in res["sweep"]:
            tr, sm = r.get("train"), r.get("sample_bs1_refs5")
            tr_s = fmt(tr["samples_per_s"]) if isinstance(tr, dict) else (str(tr)[:14] if tr else "—")
            sm_s = fmt(sm["s_per_image"]) if isinstance(sm, dict) else (str(sm)[:22] if sm else "—")
            print(f"  {r['name']:<24}{tr_s:>16}{fmt(r.get('train_speedup')):>7}{sm_s:>24}"
                  f"{fmt(r.get('sample_bs1_refs5_speedup')):>7}")
    print(f"\n  written: {res.get('results_file')}")


def main(argv=None):
    a = parse_args(argv)
    res = run(a)
    print_table(res)
    return res


if __name__ == "__main__":
    main()

"""Cold Inductor compile time of the regional compile (`compile_blocks`) per `compile_scope`: one training
step (UNet + adapters forward and backward) at the chosen scale, each scope in its own process with an
empty Inductor cache. Compile time = first compiled step - second compiled step.

Usage: python bench/bench_compile.py [--scale sd15|tiny] [--batch 1] [--device cpu|cuda] [--out bench/results]
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.scales import CONFIGS, model_config  # noqa: E402


def one_scope(scale: str, scope: str, batch: int, device: str) -> dict:
    """Runs inside a fresh process (see main)."""
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel

    from ib.models.adapter import adapter_kwargs, install_adapters
    from ib.models.heads import PatchHead
    from ib.models.speed import COMPILE_SCOPES, RECOMPILE_LIMIT

    torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    cfg = model_config(scale)["ldm"]["unet"]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg).requires_grad_(False)
    width = cfg["cross_attention_dim"]
    install_adapters(unet, width, PatchHead(width, width))
    unet.to(device)
    side = cfg["sample_size"]
    x = torch.randn(batch, cfg["in_channels"], side, side, device=device)
    t = torch.full((batch,), 500, device=device)
    text, visual = torch.randn(batch, 77, width, device=device), torch.randn(batch, 257, width, device=device)

    def step() -> float:
        start = time.perf_counter()
        out = unet(x, t, encoder_hidden_states=text, cross_attention_kwargs=adapter_kwargs(visual, 1.0)).sample
        F.mse_loss(out, x).backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    step()
    eager = step()
    blocks = [m for m in unet.modules() if isinstance(m, COMPILE_SCOPES[scope])]
    for m in blocks:
        m.compile(dynamic=False)
    first, second = step(), step()
    return {"scope": scope, "compiled_modules": len(blocks), "eager_step_s": round(eager, 2),
            "first_compiled_step_s": round(first, 1), "compiled_step_s": round(second, 2),
            "compile_s": round(first - second, 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=sorted(CONFIGS), default="sd15")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scopes", nargs="*", default=["transformer", "all"])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure this scope in this process
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(one_scope(a.scale, a.one, a.batch, a.device)))
        return None
    rows = []
    for scope in a.scopes:
        with tempfile.TemporaryDirectory() as cache:  # cold: nothing compiled before
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, PYTHONPATH=str(ROOT))
            r = subprocess.run([sys.executable, __file__, "--one", scope, "--scale", a.scale, "--batch", str(a.batch),
                                "--device", a.device], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            rows.append({"scope": scope, "error": (r.stderr.strip().splitlines() or ["?"])[-1][:300]})
        else:
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    import torch
    res = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "scale": a.scale, "batch": a.batch,
           "device": a.device, "cpu_cores": os.cpu_count(), "rows": rows}
    os.makedirs(a.out, exist_ok=True)
    path = Path(a.out) / f"compile-{a.scale}-{a.device}-{res['date']}.json"
    from ib.atomic_write import write_json
    write_json(path, res)  # atomically: a cut-short run leaves no half-written file
    print(f"written: {path}")
    return res


if __name__ == "__main__":
    main()

"""Per model family: what trains and what is stored, measured on CPU with random weights (sizes do not depend
on the values). Above the tiny scales the frozen latent diffusion model is built on the meta device (shapes, no
memory: SDXL's 3.4 B frozen parameters would not fit a 24 GiB machine beside its trained part's AdamW state);
the image encoder and the trained part are allocated.

  trainable     parameters of the heads and adapters; total: with the frozen parts
  adapters      how many, and their widths
  export        the `ib export` file (ib.weights.export_weights), fp32 and bf16
  checkpoint    the trained part with its AdamW state after one step, as a Lightning checkpoint holds them
                (the frozen parts are never saved: they are rebuilt from the config)
  step_ms       tiny scales only: one training step (loss, backward, AdamW) at batch 4 and the native size,
                on this machine's CPU with OMP_NUM_THREADS threads (median of 5 after 2 warm-up steps)

Usage: python bench/family_sizes.py [--scale tiny sd15 sd21 sdxl] [--adapter-blocks PREFIX ...] [--out bench/results]
  --adapter-blocks: adapters in those UNet blocks only (model.adapter_blocks); the file name lists them.
"""
import argparse
import datetime
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.scales import CONFIGS, model_config  # noqa: E402
from ib.atomic_write import write_json  # noqa: E402
from ib.models.frozen_ldm import FrozenLDM, LDMConfig  # noqa: E402
from ib.models.image_encoder import FrozenImageEncoder, ImageEncoderConfig  # noqa: E402
from ib.models.instantbooth import InstantBooth  # noqa: E402
from ib.weights import export_weights  # noqa: E402

MIB = 2 ** 20


@torch.no_grad()
def measure(scale: str, adapter_blocks: list[str] | None = None) -> dict:
    m = model_config(scale)
    torch.manual_seed(0)
    tiny = scale.startswith("tiny")
    image_encoder = FrozenImageEncoder.build(ImageEncoderConfig(**m["image_encoder"]))
    with torch.device("cpu" if tiny else "meta"):
        model = InstantBooth(FrozenLDM.from_config(LDMConfig(**m["ldm"])), image_encoder, adapter_blocks=adapter_blocks)
    if not tiny:
        for part in (model.concept_head, model.patch_head, model.adapters):
            part.to_empty(device="cpu")
            for p in part.parameters():
                torch.nn.init.normal_(p, std=0.02)
    trainable = [p for p in model.parameters() if p.requires_grad]
    out = {"trainable": sum(p.numel() for p in trainable), "total": sum(p.numel() for p in model.parameters()),
           "adapters": len(model.adapters),
           "adapter_widths": dict(sorted(Counter(a.norm.normalized_shape[0] for a in model.adapters).items())),
           "text_width": model.ldm.text_width, "context_dim": model.ldm.unet.config.cross_attention_dim,
           "prediction_type": model.ldm.noise_scheduler.config.prediction_type, "native_px": model.ldm.image_size}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("fp32", "bf16"):
            path = export_weights(model, Path(tmp) / f"{dtype}.safetensors", dtype=dtype)
            out[f"export_{dtype}_MiB"] = round(path.stat().st_size / MIB, 1)
        optim = torch.optim.AdamW(trainable, lr=1e-6)
        for p in trainable:
            p.grad = torch.zeros_like(p)
        optim.step()  # creates the two moment buffers per parameter
        ckpt = Path(tmp) / "ckpt.pt"
        torch.save({"state_dict": model.trainable_state_dict(), "optimizer_states": [optim.state_dict()]}, ckpt)
        out["checkpoint_MiB"] = round(ckpt.stat().st_size / MIB, 1)
    if tiny:
        out["step_ms"] = step_ms(model, optim)
    return out


def step_ms(model, optim, batch: int = 4) -> float:
    size, ref = model.ldm.image_size, model.image_encoder.image_size[0]
    g = torch.Generator().manual_seed(0)
    images, refs = torch.rand(batch, 3, size, size, generator=g), torch.rand(batch, 1, 3, ref, ref, generator=g)
    times = []
    with torch.enable_grad():
        for _ in range(7):
            t = time.perf_counter()
            loss = model.training_loss(images, refs, ["a photo of a sks ball"] * batch)
            optim.zero_grad()
            loss.backward()
            optim.step()
            times.append(time.perf_counter() - t)
    return round(1000 * statistics.median(times[2:]), 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", nargs="+", choices=sorted(CONFIGS), default=sorted(CONFIGS))
    ap.add_argument("--adapter-blocks", nargs="+", default=None, metavar="PREFIX",
                    help="adapters in these UNet blocks only (model.adapter_blocks), e.g. down_blocks.2 mid_block")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    a = ap.parse_args(argv)
    rows = {}
    print(f"{'scale':9} {'trainable':>12} {'total':>15} {'adapters':>8} {'export fp32/bf16 MiB':>21} {'ckpt MiB':>9} "
          f"{'step ms':>8}")
    for scale in a.scale:
        rows[scale] = r = measure(scale, a.adapter_blocks)
        print(f"{scale:9} {r['trainable']:>12,} {r['total']:>15,} {r['adapters']:>8} "
              f"{r['export_fp32_MiB']:>10} / {r['export_bf16_MiB']:<8} {r['checkpoint_MiB']:>9} "
              f"{r.get('step_ms', '-'):>8}", flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    blocks = "-blocks-" + "-".join(a.adapter_blocks) if a.adapter_blocks else ""
    path = a.out / f"family_sizes-cpu-{datetime.date.today()}{blocks}.json"
    write_json(path, {"date": str(datetime.date.today()), "commit": commit, "device": "cpu",
                      "adapter_blocks": a.adapter_blocks, "scales": rows}, indent=1)
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

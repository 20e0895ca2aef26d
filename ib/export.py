"""`ib export`: a checkpoint's trained weights as one safetensors file, named by their diffusers module paths.

    ib export --ckpt runs/default/checkpoints/last.ckpt --out instantbooth.safetensors [--dtype bf16]

Keys: unet.<transformer block path>.fuser.* (the adapters), unet.position_net.* (the patch encoder),
concept_encoder.* (the concept encoder). Metadata: format and version, the base model, the image encoder,
identifier, tokens per reference, the UNet's shape and the sampler defaults. Files of the older format (one
`ib_config` metadata entry, the model's own names) load too; `ib export --ckpt OLD.safetensors` converts one.
"""
from pathlib import Path

from ib.config_checks import OneLineParser, check_creatable_folder
from ib.errors import ConfigError
from ib.weights import EXPORT_DTYPES, export_weights, load_model



def parser() -> OneLineParser:
    p = OneLineParser(prog="ib export", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="a Lightning checkpoint written by `ib fit` (or an older export file)")
    p.add_argument("--out", required=True, type=Path, help="the .safetensors file to write")
    p.add_argument("--dtype", choices=sorted(EXPORT_DTYPES), default="fp32")
    return p


def export(ckpt: str, out: Path, dtype: str = "fp32") -> Path:
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out: must end in .safetensors: {out}")
    if out.is_dir():
        raise ConfigError(f"--out: is a folder: {out}")
    check_creatable_folder(out.parent, "--out")
    # Built to name the weights by module path; refuses unsafe configs and NaN / inf weights.
    model, hparams = load_model(ckpt, field_name="--ckpt")
    export_weights(model, out, hparams.get("sampling"), dtype)  # atomic: never a half-written file
    n = sum(v.numel() for v in model.trainable_state_dict().values())
    print(f"wrote {out}: {n:,} trainable parameters, {out.stat().st_size / 2**20:.1f} MiB ({dtype})")
    return out


def main(argv: list[str]) -> int:
    a = parser().parse_args(argv)
    export(a.ckpt, a.out, a.dtype)
    return 0

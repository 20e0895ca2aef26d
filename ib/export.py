"""`ib export`: a checkpoint's trainable weights as one safetensors file with the config to rebuild the model.

    ib export --ckpt runs/default/checkpoints/last.ckpt --out instantbooth.safetensors [--dtype bf16]
"""
from pathlib import Path

import torch

from ib.config_checks import OneLineParser, check_creatable_folder
from ib.errors import ConfigError
from ib.weights import check_finite, read_weights, write_weights

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parser() -> OneLineParser:
    p = OneLineParser(prog="ib export", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="a Lightning checkpoint written by `ib fit`")
    p.add_argument("--out", required=True, type=Path, help="the .safetensors file to write")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    return p


def export(ckpt: str, out: Path, dtype: str = "fp32") -> Path:
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out: must end in .safetensors: {out}")
    if out.is_dir():
        raise ConfigError(f"--out: is a folder: {out}")
    check_creatable_folder(out.parent, "--out")
    hparams, state = read_weights(ckpt, "--ckpt")  # refuses unsafe configs and NaN / inf weights
    state = {k: v.to(DTYPES[dtype]) for k, v in state.items()}
    check_finite(state, f"--dtype {dtype}: {{key}} does not fit {dtype} (values overflow to inf)")
    write_weights(state, hparams, out)  # atomic: never a half-written file under the final name
    n = sum(v.numel() for v in state.values())
    print(f"wrote {out}: {n:,} trainable parameters, {out.stat().st_size / 2**20:.1f} MiB ({dtype})")
    return out


def main(argv: list[str]) -> int:
    a = parser().parse_args(argv)
    export(a.ckpt, a.out, a.dtype)
    return 0

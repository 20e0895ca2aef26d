"""Load a trained InstantBooth for inference from a Lightning checkpoint or an `ib export` file.

Both hold the trainable weights and the config that rebuilds the frozen parts (hyper-parameters).
"""
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ib.errors import ConfigError
from ib.models.frozen_ldm import LDMConfig
from ib.models.image_encoder import ImageEncoderConfig
from ib.models.instantbooth import InstantBooth

CONFIG_KEY = "ib_config"  # safetensors metadata entry holding the JSON config


def read_weights(path: str | Path, field_name: str = "--weights") -> tuple[dict, dict[str, torch.Tensor]]:
    """-> (hyper-parameters, trainable state dict without the 'model.' prefix)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{field_name}: file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            state = load_file(str(path))
        except Exception as e:
            raise ConfigError(f"{field_name}: cannot read {path}: {e}") from e
        if CONFIG_KEY not in meta:
            raise ConfigError(f"{field_name}: {path} has no '{CONFIG_KEY}' metadata (not written by `ib export`)")
        return json.loads(meta[CONFIG_KEY]), state
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"{field_name}: cannot read {path}: {str(e).splitlines()[0]}") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ConfigError(f"{field_name}: {path} is not an ib checkpoint")
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    return dict(ckpt["hyper_parameters"]), state


def build_from_hparams(hparams: dict) -> InstantBooth:
    # Random frozen parts (the embedded default) are not in the file; they are a function of the configs'
    # init_seed, so the same ones are rebuilt here.
    return InstantBooth.from_config(LDMConfig(**hparams["ldm"]), ImageEncoderConfig(**hparams["image_encoder"]),
                                    identifier=hparams.get("identifier", "sks"),
                                    uncond_adapters=hparams.get("uncond_adapters", True))


def load_trainable(model: InstantBooth, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load of the trainable part with a one-line message when the file is from another model."""
    expected = model.trainable_state_dict()
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing or unexpected:
        example = sorted(missing or unexpected)[0]
        raise ConfigError(f"{source}: weights do not fit this model ({len(missing)} missing, "
                          f"{len(unexpected)} unexpected, e.g. {example})")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise ConfigError(f"{source}: weights do not fit this model: {k} is {tuple(v.shape)}, "
                              f"expected {tuple(expected[k].shape)}")
    model.load_state_dict(state, strict=False)


def load_instantbooth(path: str | Path) -> tuple[InstantBooth, dict]:
    """-> (model in eval mode with trained weights, hyper-parameters)."""
    hparams, state = read_weights(path)
    model = build_from_hparams(hparams)
    load_trainable(model, state, f"--weights {path}")
    return model.eval(), hparams


def write_weights(state: dict[str, torch.Tensor], hparams: dict, out: str | Path) -> Path:
    """Trainable weights as safetensors, the rebuild config in its metadata; written atomically (temp + rename)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp),
              metadata={CONFIG_KEY: json.dumps(hparams)})
    tmp.replace(out)
    return out


def export_weights(model: InstantBooth, hparams: dict, out: str | Path) -> Path:
    return write_weights(model.trainable_state_dict(), hparams, out)

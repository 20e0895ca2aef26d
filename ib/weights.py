"""Load a trained InstantBooth for inference from a Lightning checkpoint or an `ib export` file.

Both hold the trainable weights and the config that rebuilds the frozen parts (hyper-parameters). That config
is someone else's input: it is checked against the configs' allow-lists before anything is built.
"""
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ib.allow_list import dataclass_from
from ib.atomic_write import atomic_path
from ib.errors import ConfigError
from ib.models.frozen_ldm import LDMConfig
from ib.models.image_encoder import ImageEncoderConfig
from ib.models.instantbooth import InstantBooth
from ib.models.sampler import SamplingConfig

CONFIG_KEY = "ib_config"  # safetensors metadata entry holding the JSON config


def read_weights(path: str | Path, field_name: str = "--weights") -> tuple[dict, dict[str, torch.Tensor]]:
    """-> (hyper-parameters, trainable state dict without the 'model.' prefix), both checked."""
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
        try:
            hparams = json.loads(meta[CONFIG_KEY])
        except ValueError as e:
            raise ConfigError(f"{field_name} {path}: '{CONFIG_KEY}' metadata is not JSON") from e
        what = f"'{CONFIG_KEY}' metadata"
    else:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ConfigError(f"{field_name}: cannot read {path}: {str(e).splitlines()[0]}") from e
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
            raise ConfigError(f"{field_name}: {path} is not an ib checkpoint")
        state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
        hparams, what = ckpt["hyper_parameters"], "'hyper_parameters'"
    try:
        check_hparams(hparams, what)
        check_finite(state)
    except ConfigError as e:
        raise ConfigError(f"{field_name} {path}: {e}") from e
    return dict(hparams), state


def check_hparams(hparams, what: str = "'hyper_parameters'") -> tuple[LDMConfig, ImageEncoderConfig]:
    """The stored configs, through the same allow-lists as a config file (nothing is built)."""
    if not isinstance(hparams, dict):
        raise ConfigError(f"{what} is not a mapping")
    for key in ("ldm", "image_encoder"):
        if key not in hparams:
            raise ConfigError(f"{what} has no '{key}'")
    ldm = dataclass_from(LDMConfig, hparams["ldm"], "model.ldm")
    ldm.check("model.ldm")
    image_encoder = dataclass_from(ImageEncoderConfig, hparams["image_encoder"], "model.image_encoder")
    image_encoder.check("model.image_encoder")
    if "sampling" in hparams:  # read by `ib generate` / `ib evaluate` into SamplingConfig
        dataclass_from(SamplingConfig, hparams["sampling"], "model.sampling")
    return ldm, image_encoder


def check_finite(state: dict[str, torch.Tensor], reason: str = "non-finite values in {key}") -> None:
    """NaN / inf weights would sample black images without a word: refuse them, naming a tensor."""
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ConfigError(reason.format(key=key))


def build_from_hparams(hparams: dict) -> InstantBooth:
    # Random frozen parts (the embedded default) are not in the file; they are a function of the configs'
    # init_seed, so the same ones are rebuilt here.
    ldm, image_encoder = check_hparams(hparams)
    return InstantBooth.from_config(ldm, image_encoder, identifier=hparams.get("identifier", "sks"),
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
    """Trainable weights as safetensors, the rebuild config in its metadata; atomic, with the usual mode."""
    with atomic_path(out) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp,
                  metadata={CONFIG_KEY: json.dumps(hparams)})
    return Path(out)


def export_weights(model: InstantBooth, hparams: dict, out: str | Path) -> Path:
    return write_weights(model.trainable_state_dict(), hparams, out)

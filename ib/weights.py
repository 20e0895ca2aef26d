"""Load a trained InstantBooth for inference from a Lightning checkpoint or an `ib export` file.

Both hold the trainable weights and the config that rebuilds the frozen parts (hyper-parameters). That config
is someone else's input: it is checked against the configs' allow-lists before anything is built.
"""
import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ib.allow_list import dataclass_from
from ib.atomic_write import atomic_path
from ib.errors import ConfigError
from ib.models.frozen_ldm import FrozenLDM, LDMConfig, missing_pretrained_folder
from ib.models.image_encoder import FrozenImageEncoder, ImageEncoderConfig
from ib.models.instantbooth import InstantBooth
from ib.models.sampler import SamplingConfig

CONFIG_KEY = "ib_config"  # format 1: one metadata entry holding the JSON config, keys named as in InstantBooth
FORMAT, FORMAT_VERSION = "instantbooth", "2"  # format 2: diffusers module paths, one metadata entry per field
# What decides whether trained adapters fit a UNet: the number, places and widths of its transformer blocks.
EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
UNET_SHAPE = ("in_channels", "block_out_channels", "down_block_types", "up_block_types", "layers_per_block",
              "transformer_layers_per_block", "cross_attention_dim", "attention_head_dim", "num_attention_heads")


def read_weights(path: str | Path, field_name: str = "--weights") -> tuple[dict, dict[str, torch.Tensor]]:
    """-> (hyper-parameters, trainable state dict), both checked. The state's keys are as stored: diffusers
    module paths in an `ib export` file (format 2), the model's own names in a checkpoint or an older export;
    `load_trainable` takes either."""
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
        try:
            hparams = hparams_from_metadata(meta)
            what = "metadata" if meta.get("format") == FORMAT else f"'{CONFIG_KEY}' metadata"
        except ConfigError as e:
            raise ConfigError(f"{field_name} {path}: {e}") from e
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


def hparams_from_metadata(meta: dict[str, str]) -> dict:
    """An export file's metadata -> the hyper-parameters that rebuild the model (format 2, or format 1's
    single JSON entry)."""
    if meta.get("format") != FORMAT:
        if CONFIG_KEY not in meta:
            raise ConfigError(f"no '{CONFIG_KEY}' or format metadata (not written by `ib export`)")
        return _json(meta, CONFIG_KEY)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"format version {meta.get('format_version')!r}; this ib reads {FORMAT_VERSION}")
    for key in ("base_model", "image_encoder"):
        if key not in meta:
            raise ConfigError(f"has no '{key}' metadata")
    hparams = {"ldm": _json(meta, "base_model"), "image_encoder": _json(meta, "image_encoder"),
               "identifier": meta.get("identifier", "sks"), "uncond_adapters": meta.get("uncond_adapters") != "false"}
    for key in ("sampling", "unet_shape", "adapter_blocks"):
        if key in meta:
            hparams[key] = _json(meta, key)
    return hparams


def _json(meta: dict[str, str], key: str):
    try:
        return json.loads(meta[key])
    except ValueError as e:
        raise ConfigError(f"'{key}' metadata is not JSON") from e


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


def build_from_hparams(hparams: dict, speed=None, image_encoder_folder: Path | None = None,
                       inference: bool = True) -> InstantBooth:
    """image_encoder_folder: a saved FrozenImageEncoder (a pipeline folder's) instead of the recorded one."""
    # Random frozen parts (the embedded default) are not in the file; they are a function of the configs'
    # init_seed, so the same ones are rebuilt here.
    ldm_cfg, image_encoder_cfg = check_hparams(hparams)
    if image_encoder_folder is not None:
        image_encoder = FrozenImageEncoder.from_pretrained(image_encoder_folder)
    else:
        image_encoder = FrozenImageEncoder.build(image_encoder_cfg)
    return InstantBooth(FrozenLDM.from_config(ldm_cfg), image_encoder, identifier=hparams.get("identifier", "sks"),
                        uncond_adapters=hparams.get("uncond_adapters", True), speed=speed, inference=inference,
                        adapter_blocks=hparams.get("adapter_blocks"))


def unet_shape(model: InstantBooth) -> dict:
    config = model.ldm.unet.config
    return {k: list(v) if isinstance(v, tuple) else v for k, v in ((k, config.get(k)) for k in UNET_SHAPE)}


def check_unet_shape(model: InstantBooth, hparams: dict, source: str) -> None:
    """A base whose UNet differs from the one the weights were trained on: one line naming the first difference."""
    recorded = hparams.get("unet_shape")
    if not recorded:
        return  # older files: the tensor shapes are checked by load_trainable
    actual = unet_shape(model)
    for key in UNET_SHAPE:
        if key in recorded and recorded[key] != actual[key]:
            raise ConfigError(f"{source}: the base's UNet differs from the one the weights were trained on: "
                              f"{key} {actual[key]} vs {recorded[key]}")


def load_trainable(model: InstantBooth, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load of the trainable part (keys as the model names them, or as diffusers module paths) with a
    one-line message when the file is from another model."""
    if any(k.startswith(model.DIFFUSERS_PREFIXES) for k in state):
        state = model.from_diffusers_names(state)
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


def load_model(path: str | Path, base: str | None = None, speed=None, field_name: str = "--weights",
               base_field: str = "--base", image_encoder_folder: Path | None = None) -> tuple[InstantBooth, dict]:
    """-> (model in eval mode with trained weights, ready for inference; hyper-parameters). base: another base
    model (a hub id or a diffusers folder) with the same UNet shape, instead of the one recorded with the
    weights. speed: the model's speed switches (ib.models.speed)."""
    hparams, state = read_weights(path, field_name)
    if base is not None:
        if missing_pretrained_folder(base):
            raise ConfigError(f"{base_field}: folder not found: {base}")
        hparams["ldm"] = {"pretrained": str(base)}
    model = build_from_hparams(hparams, speed, image_encoder_folder)
    if base is not None:
        check_unet_shape(model, hparams, f"{base_field} {base}")
    load_trainable(model, state, f"{field_name} {path}")
    return model.eval(), hparams


def export_metadata(model: InstantBooth, sampling: dict | None = None) -> dict[str, str]:
    """Format 2's metadata: what rebuilds the model on its base (the base and image encoder it was built
    from), and the sampler defaults."""
    encoder = model.image_encoder.config
    image_encoder = {"model_name": encoder.model_name, "pretrained": encoder.pretrained,
                     "overrides": dict(encoder.overrides or {}), "init_seed": encoder.init_seed}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "base_model": json.dumps(asdict(model.ldm.source)),
            "image_encoder": json.dumps(image_encoder), "identifier": model.identifier,
            "uncond_adapters": json.dumps(model.uncond_adapters),
            "tokens_per_reference": str(model.image_encoder.tokens_per_image),
            "reference_size": str(model.image_encoder.image_size[0]), "unet_shape": json.dumps(unet_shape(model))}
    if sampling is not None:
        meta["sampling"] = json.dumps(sampling)
    if model.adapter_blocks is not None:  # absent: every block (also what files written before it mean)
        meta["adapter_blocks"] = json.dumps(model.adapter_blocks)
    return meta


def write_weights(state: dict[str, torch.Tensor], metadata: dict[str, str], out: str | Path) -> Path:
    """Weights as safetensors with `metadata`; atomic, with the usual mode."""
    with atomic_path(out) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp, metadata=metadata)
    return Path(out)


def export_weights(model: InstantBooth, out: str | Path, sampling: dict | None = None, dtype: str = "fp32") -> Path:
    """The trainable weights named by their diffusers module paths (format 2), in `dtype` (EXPORT_DTYPES);
    sampling: the sampler defaults to record (SamplingConfig fields)."""
    state = model.to_diffusers_names(model.trainable_state_dict())
    state = {k: v.to(EXPORT_DTYPES[dtype]) for k, v in state.items()}
    check_finite(state, f"--dtype {dtype}: {{key}} does not fit {dtype} (values overflow to inf)")
    return write_weights(state, export_metadata(model, sampling), out)

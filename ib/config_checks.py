"""Checks on the parsed config before anything is built or written: the first problem, as one ConfigError
naming the field.

They run on the CLI's parsed namespace, before any class is instantiated: LightningCLI builds the model
(minutes for the frozen SD parts) before the DataModule, and a check inside a constructor would come after
that. A field absent from the namespace is skipped, so these rules do not pin the config's layout.
The argparse commands (`ib generate|evaluate|export`) get their one-line errors and folder check here too.
"""
import argparse
import inspect
import json
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler
from jsonargparse import Namespace, get_loader
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.accelerators import AcceleratorRegistry

from ib.data.shards import resolve_shards
from ib.errors import ConfigError
from ib.ranges import check_ranges
from ib.models.frozen_ldm import LDMConfig, missing_pretrained_folder
from ib.models.image_encoder import ImageEncoderConfig, missing_checkpoint_file
from ib.models.sampler import SamplingConfig, check_sampling
from ib.models.speed import SpeedConfig, check_speed

PREDICTION_TYPES = ("epsilon", "v_prediction")  # the targets InstantBooth.training_loss implements


def _get(cfg: Namespace, key: str):
    return cfg.get(key) if key in cfg else None


def parse_dict_scalars(value) -> None:
    """In place: strings in plain-dict fields (model.ldm.scheduler, .unet, ...) that read as YAML scalars
    become them. jsonargparse hands `--model.ldm.scheduler.beta_end 2.0` to an untyped dict as the string
    "2.0"; a typed field would have parsed it."""
    load = get_loader("yaml")
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, str) and item.strip():
                parsed = load(item)
                if isinstance(parsed, (bool, int, float)) or (parsed is None and item.strip() in ("null", "~")):
                    value[key] = parsed
    children = vars(value).values() if isinstance(value, Namespace) else value.values() if isinstance(value, dict) \
        else value if isinstance(value, list) else ()
    for child in children:
        parse_dict_scalars(child)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _accelerator(cfg: Namespace) -> str | None:
    """trainer.accelerator as Lightning will resolve it: "cuda", "cpu", ...; None for an Accelerator object.
    Refuses one this machine does not have, and trainer.devices it cannot provide."""
    name = _get(cfg, "trainer.accelerator")
    if not isinstance(name, str):
        return None
    # Lightning's own availability checks: they do not initialise CUDA in this process (DDP forks it).
    gpus = [n for n in ("cuda", "mps") if AcceleratorRegistry[n]["accelerator"].is_available()]
    if name == "auto":
        name = (gpus or ["cpu"])[0]
    elif name == "gpu":
        if not gpus:
            raise ConfigError("trainer.accelerator: gpu: this machine has no GPU (neither CUDA nor MPS)")
        name = gpus[0]
    if name not in AcceleratorRegistry:
        raise ConfigError(f"trainer.accelerator: unknown '{name}' (one of auto, gpu, "
                          f"{', '.join(sorted(AcceleratorRegistry.available_accelerators()))})")
    accelerator = AcceleratorRegistry[name]["accelerator"]
    if not accelerator.is_available():
        raise ConfigError(f"trainer.accelerator: {name}: not available on this machine")
    devices = _get(cfg, "trainer.devices")
    if devices not in (None, "auto"):
        try:
            accelerator.parse_devices(devices)
        except (MisconfigurationException, TypeError, ValueError) as e:
            raise ConfigError(f"trainer.devices: {devices}: {_one_line(e)}") from e
    return name


# As FrozenLDM.vae_scale_factor: pixels per latent cell along a side; diffusers' default when unset.
_VAE_CHANNELS = inspect.signature(AutoencoderKL).parameters["block_out_channels"].default


def _read_json(folder: Path, name: str) -> dict:
    try:
        return json.loads((folder / name).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.ldm.pretrained: cannot read {folder / name}: {_one_line(e)}") from e


def _vae_factor(cfg: Namespace) -> int | None:
    """From the config alone (the folder's vae/config.json, or model.ldm.vae); None for a hub id."""
    pretrained = _get(cfg, "model.ldm.pretrained")
    if pretrained:
        folder = Path(pretrained).expanduser()
        vae = _read_json(folder, "vae/config.json") if folder.is_dir() else None
    else:
        vae = _get(cfg, "model.ldm.vae")
    if vae is None:
        return None
    return 2 ** (len(vae.get("block_out_channels", _VAE_CHANNELS)) - 1)


def check_noise_schedule(scheduler: dict, field: str = "model.ldm.scheduler") -> None:
    """The training noise schedule: betas in (0, 1) (above 1 every loss is NaN), a prediction type the loss
    implements. The dict is built the way FrozenLDM builds it, so what diffusers refuses is named here."""
    for key in ("beta_start", "beta_end", "num_train_timesteps"):
        value = scheduler.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{field}.{key}: expected a number, got {value!r}")
    unknown = sorted(set(scheduler) - set(inspect.signature(DDPMScheduler).parameters))
    if unknown:
        raise ConfigError(f"{field}.{unknown[0]}: unknown key")
    try:
        sched = DDPMScheduler(**scheduler)
    except NotImplementedError as e:
        raise ConfigError(f"{field}.beta_schedule: unknown '{scheduler.get('beta_schedule')}' "
                          "(not implemented by diffusers' DDPMScheduler)") from e
    c = sched.config
    if c.num_train_timesteps < 1:
        raise ConfigError(f"{field}.num_train_timesteps: must be >= 1, got {c.num_train_timesteps}")
    if c.prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"{field}.prediction_type: unknown '{c.prediction_type}' (one of {', '.join(PREDICTION_TYPES)})")
    if c.trained_betas is None:
        for name in ("beta_start", "beta_end"):
            if not 0 < c[name] < 1:
                raise ConfigError(f"{field}.{name}: must be in (0, 1), got {c[name]}")
        if c.beta_start >= c.beta_end:
            raise ConfigError(f"{field}.beta_start: must be < beta_end ({c.beta_end}), got {c.beta_start}")
    if not ((sched.betas > 0) & (sched.betas < 1)).all():
        raise ConfigError(f"{field}: the schedule's betas must lie in (0, 1)")


def check_config(cfg: Namespace, sections: dict[str, type]) -> None:
    """sections: {"model": the LightningModule class, ...}: the ranges declared on their fields (ib.ranges);
    a callback's fields sit under its init_args."""
    for key, cls in sections.items():
        check_ranges(cls, _get(cfg, key), f"{key.replace('.init_args', '')}.")
    # Whether a prefix holds a transformer block is known once the UNet is built; a misspelt root, here.
    for prefix in _get(cfg, "model.adapter_blocks") or ():
        root = prefix.split(".")
        if not (root[0] == "mid_block" or (root[0] in ("down_blocks", "up_blocks") and root[1:2] and root[1].isdigit())):
            raise ConfigError(f"model.adapter_blocks: '{prefix}' is not a UNet block path "
                              "(down_blocks.N, mid_block or up_blocks.N, then optionally deeper)")
    identifier = _get(cfg, "model.identifier")
    if identifier is not None and not identifier.strip():
        raise ConfigError("model.identifier: must not be empty")
    # The allow-lists of the frozen parts' fields, before the (possibly large) base model is loaded.
    for key, config_class in (("model.ldm", LDMConfig), ("model.image_encoder", ImageEncoderConfig)):
        section = _get(cfg, key)
        if section is not None:
            config_class(**(section.as_dict() if isinstance(section, Namespace) else dict(section))).check(key)
    ldm = _get(cfg, "model.ldm.pretrained")
    if missing_pretrained_folder(ldm):
        raise ConfigError(f"model.ldm.pretrained: folder not found: {ldm}")
    clip = _get(cfg, "model.image_encoder.pretrained")
    if missing_checkpoint_file(clip):
        raise ConfigError(f"model.image_encoder.pretrained: file not found: {clip}")
    for key in ("data.train_shards", "data.val_shards"):
        if _get(cfg, key):
            resolve_shards(_get(cfg, key), key)

    if not ldm and _get(cfg, "model.ldm.scheduler") is not None:  # a pretrained folder brings its own
        check_noise_schedule(_get(cfg, "model.ldm.scheduler"))
    vae_factor = _vae_factor(cfg)
    size = _get(cfg, "data.image_size")
    if vae_factor and size and size % vae_factor:
        raise ConfigError(f"data.image_size: must be a multiple of {vae_factor} (the VAE's downsampling factor), got {size}")
    sampling = _get(cfg, "model.sampling")
    if sampling is not None:
        check_sampling(SamplingConfig(**sampling.as_dict()), vae_factor)
    device_type = _accelerator(cfg)
    speed = _get(cfg, "model.speed")
    if speed is not None:
        check_speed(SpeedConfig(**speed.as_dict()), device_type, str(_get(cfg, "trainer.precision") or "32-true"))


# --- the argparse commands (`ib generate|evaluate|export`) ---------------------------------------------------
class OneLineParser(argparse.ArgumentParser):
    """A bad or missing flag is a ConfigError naming it (one line, exit 2), not usage text."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, exit_on_error=False, **kwargs)

    def parse_args(self, args=None, namespace=None):
        try:
            return super().parse_args(args, namespace)
        except argparse.ArgumentError as e:  # a bad value: the flag is known
            raise ConfigError(f"{e.argument_name}: {e.message}") from e

    def error(self, message):  # missing or unknown flags: argparse names them in the message
        raise ConfigError(message)


def check_creatable_folder(folder: Path, flag: str) -> None:
    """`folder` is a folder or can be made one, checked before the model loads: a NotADirectoryError after
    sampling would lose the work."""
    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                raise ConfigError(f"{flag}: {path} is a file, not a folder")
            if not os.access(path, os.W_OK | os.X_OK):
                raise ConfigError(f"{flag}: {path} is not writable")
            return


def check_device(name: str, flag: str = "--device") -> torch.device:
    """A device this machine has; checked before the model loads."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"{flag}: {_one_line(e)}") from e
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"{flag}: {name}: this machine has {torch.cuda.device_count()} CUDA GPUs")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{flag}: {name}: MPS is not available on this machine")
    return device

"""Checks on the parsed config before anything is built or written: the first problem, as one ConfigError
naming the field.

They run on the CLI's parsed namespace, before any class is instantiated: LightningCLI builds the model
(minutes for the frozen SD parts) before the DataModule, and a check inside a constructor would come after
that. A field absent from the namespace is skipped, so these rules do not pin the config's layout.
"""
from jsonargparse import Namespace

from ib.data.shards import resolve_shards
from ib.errors import ConfigError
from ib.models.frozen_ldm import missing_pretrained_folder
from ib.models.image_encoder import missing_checkpoint_file


def _between(lo, hi, lo_open=False, hi_open=False):
    def ok(v):
        return (v > lo if lo_open else v >= lo) and (hi is None or (v < hi if hi_open else v <= hi))
    text = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}{')' if hi_open or hi is None else ']'}"
    return ok, f"must be in {text}"


def _at_least(lo):
    return (lambda v: v >= lo), f"must be >= {lo}"


# field -> (test, what the message says). Learning rates above 1 are typos, not settings.
RANGES = {
    "model.optim.lr_heads": _between(0, 1, lo_open=True),
    "model.optim.lr_adapters": _between(0, 1, lo_open=True),
    "model.optim.weight_decay": _at_least(0),
    "model.optim.warmup_steps": _at_least(0),
    "model.beta_train": _between(0, 1, lo_open=True),  # 0 would switch the adapters off: nothing to train
    "model.cond_dropout": _between(0, 1, hi_open=True),
    "model.max_nonfinite_steps": _at_least(1),
    "model.sampling.alpha": _between(0, 1),  # concept renormalization (paper: 0.4)
    "model.sampling.beta": _between(0, 1),  # balanced sampling (paper: 0.3)
    "model.sampling.steps": _at_least(1),
    "model.sampling.guidance_scale": _at_least(0),
    "data.batch_size": _at_least(1),
    "data.val_batch_size": _at_least(1),
    "data.batches_per_epoch": _at_least(1),
    "data.val_batches": _at_least(1),
    "data.image_size": _at_least(1),
    "data.reference_size": _at_least(1),
    "data.loader.num_workers": _at_least(0),
}


def _get(cfg: Namespace, key: str):
    return cfg.get(key) if key in cfg else None


def check_config(cfg: Namespace) -> None:
    for key, (ok, must) in RANGES.items():
        value = _get(cfg, key)
        if value is not None and not ok(value):
            raise ConfigError(f"{key}: {must}, got {value}")
    identifier = _get(cfg, "model.identifier")
    if identifier is not None and not identifier.strip():
        raise ConfigError("model.identifier: must not be empty")
    ldm = _get(cfg, "model.ldm.pretrained")
    if missing_pretrained_folder(ldm):
        raise ConfigError(f"model.ldm.pretrained: folder not found: {ldm}")
    clip = _get(cfg, "model.image_encoder.pretrained")
    if missing_checkpoint_file(clip):
        raise ConfigError(f"model.image_encoder.pretrained: file not found: {clip}")
    for key in ("data.train_shards", "data.val_shards"):
        if _get(cfg, key):
            resolve_shards(_get(cfg, key), key)

"""Allow-lists for the config dicts that reach library constructors (open_clip, timm, diffusers, transformers).

A stored config (a checkpoint's hyper-parameters, `ib export` metadata) is input like any other: a key such as
open_clip's `weights_only` or timm's `checkpoint_path` would make a library read a file its own way, pickles
included. So only architecture fields pass; anything else is refused by name.
"""
import inspect

from ib.errors import ConfigError

# name -> None (any value) or the allow-list of a nested dict
AllowList = dict[str, "AllowList | None"]


def fields(*names: str) -> AllowList:
    return dict.fromkeys(names)


def init_fields(cls, exclude: tuple[str, ...] = ()) -> AllowList:
    """The named parameters of a constructor that takes architecture only (no **kwargs, nothing to load)."""
    params = inspect.signature(cls.__init__).parameters.values()
    return fields(*(p.name for p in params if p.name != "self" and p.name not in exclude
                    and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)))


def check_fields(value, allowed: AllowList, field: str) -> None:
    """ConfigError '<field>.<key>: not an allowed field' for the first key outside `allowed`."""
    if not isinstance(value, dict):
        raise ConfigError(f"{field}: must be a mapping, got {type(value).__name__}")
    for key, item in value.items():
        if key not in allowed:
            raise ConfigError(f"{field}.{key}: not an allowed field")
        if allowed[key] is not None:
            check_fields(item, allowed[key], f"{field}.{key}")


def dataclass_from(cls, value, field: str):
    """A config dataclass from a stored dict: unknown keys are refused by name, not a TypeError."""
    check_fields(value, fields(*cls.__dataclass_fields__), field)
    return cls(**value)

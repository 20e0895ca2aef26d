"""Value ranges declared on the config fields themselves, `lr: Annotated[float, Range(gt=0, le=1)]`, and the one
check that reads them.

`ib fit` runs `check_ranges` on the parsed config before anything is built or written; the constructors and the
commands (`ib generate|evaluate`) run it on their own arguments. jsonargparse and argparse see the plain type.
"""
import argparse
import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Callable

from ib.errors import ConfigError


@dataclass(frozen=True)
class Range:
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def holds(self, v) -> bool:
        return ((self.gt is None or v > self.gt) and (self.ge is None or v >= self.ge)
                and (self.lt is None or v < self.lt) and (self.le is None or v <= self.le))

    def __str__(self) -> str:
        lo, hi = (self.gt, self.ge), (self.lt, self.le)
        if hi == (None, None):
            return f"must be > {self.gt}" if self.gt is not None else f"must be >= {self.ge}"
        left = f"({self.gt}" if self.gt is not None else f"[{self.ge}" if self.ge is not None else "(-inf"
        right = f"{self.lt})" if self.lt is not None else f"{self.le}]"
        return f"must be in {left}, {right}" if lo != (None, None) else f"must be <= {self.le}"


PositiveInt = Annotated[int, Range(ge=1)]
NonNegativeInt = Annotated[int, Range(ge=0)]
NonNegativeFloat = Annotated[float, Range(ge=0)]
Fraction = Annotated[float, Range(ge=0, le=1)]
Probability = Annotated[float, Range(ge=0, lt=1)]  # 1 would leave nothing to train
LearningRate = Annotated[float, Range(gt=0, le=1)]  # above 1 is a typo, not a setting


def _range_and_type(hint) -> tuple[Range | None, type | None]:
    """Annotated[T, Range] (also inside Optional) -> (Range, None); Optional[dataclass] or dataclass ->
    (None, the dataclass)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        found = [_range_and_type(arg) for arg in typing.get_args(hint) if arg is not type(None)]
        return found[0] if len(found) == 1 else (None, None)
    if typing.get_origin(hint) is Annotated:
        return next((m for m in hint.__metadata__ if isinstance(m, Range)), None), None
    return None, hint if dataclasses.is_dataclass(hint) else None


def declared_ranges(target) -> dict[str, Range]:
    """{"optim.lr_heads": Range, ...}: the ranges on a dataclass's fields or a class's constructor parameters,
    and those of the dataclasses among them, by dotted key."""
    hints = typing.get_type_hints(target if dataclasses.is_dataclass(target) else target.__init__, include_extras=True)
    out = {}
    for name, hint in hints.items():
        found, nested = _range_and_type(hint)
        if found is not None:
            out[name] = found
        elif nested is not None:
            out.update({f"{name}.{key}": r for key, r in declared_ranges(nested).items()})
    return out


def _lookup(values, key: str):
    for part in key.split("."):
        if values is None:
            return None
        values = values.get(part) if isinstance(values, dict) or hasattr(values, "as_dict") else getattr(values, part, None)
    return values


def check_ranges(target, values, name: Callable[[str], str] | str = "") -> None:
    """The first value outside its declared range -> ConfigError naming `name(key)` (a string: a prefix).
    values: a dict, a jsonargparse Namespace or a dataclass instance, read by the keys of declared_ranges."""
    label = name if callable(name) else (lambda key: f"{name}{key}")
    for key, allowed in declared_ranges(target).items():
        value = _lookup(values, key)
        if value is not None and not isinstance(value, bool) and not allowed.holds(value):
            raise ConfigError(f"{label(key)}: {allowed}, got {value}")


def check_arguments(cls, frame_locals: dict, prefix: str) -> None:
    """A constructor's own arguments (pass `locals()` first thing in __init__), for callers that skip the CLI."""
    params = inspect.signature(cls.__init__).parameters
    check_ranges(cls, {k: v for k, v in frame_locals.items() if k in params}, prefix)


def argument_type(hint, field: str | None = None) -> Callable[[str], object]:
    """An argparse `type=` that parses and range-checks: `hint` is Annotated[T, Range], or a dataclass whose
    `field` carries one (so a command's flag reuses the config field's range)."""
    if field is not None:
        hint = typing.get_type_hints(hint, include_extras=True)[field]
    allowed, _ = _range_and_type(hint)
    base = next(a for a in typing.get_args(hint) if a is not type(None))
    base = typing.get_args(base)[0] if typing.get_origin(base) is Annotated else base

    def parse(text: str):
        try:
            value = base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {base.__name__}, got {text!r}") from None
        if not allowed.holds(value):
            raise argparse.ArgumentTypeError(f"{allowed}, got {value}")
        return value
    parse.__name__ = base.__name__
    return parse

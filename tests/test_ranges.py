"""Ranges declared on config fields (ib/ranges.py): read from the annotations, checked in one place."""
import argparse
from dataclasses import dataclass
from typing import Annotated

import pytest

from ib.callbacks.identity_eval import IdentityEval
from ib.data.datamodule import InstantBoothDataModule
from ib.errors import ConfigError
from ib.lit_module import InstantBoothModule
from ib.models.sampler import SamplingConfig
from ib.ranges import PositiveInt, Range, argument_type, check_ranges, declared_ranges


def test_messages():
    assert str(Range(ge=1)) == "must be >= 1"
    assert str(Range(gt=0)) == "must be > 0"
    assert str(Range(gt=0, le=1)) == "must be in (0, 1]"
    assert str(Range(ge=0, lt=1)) == "must be in [0, 1)"
    assert str(Range(le=3)) == "must be <= 3"


def test_bounds_are_open_or_closed_as_declared():
    r = Range(gt=0, le=1)
    assert [r.holds(v) for v in (0, 1e-9, 1, 1.0001)] == [False, True, True, False]
    r = Range(ge=0, lt=1)
    assert [r.holds(v) for v in (-1e-9, 0, 0.999, 1)] == [False, True, True, False]


def test_nested_dataclasses_and_optional_fields_are_found():
    model = declared_ranges(InstantBoothModule)
    assert {"optim.lr_heads", "optim.warmup_steps", "sampling.steps", "sampling.height", "cond_dropout",
            "beta_train", "max_nonfinite_steps"} <= set(model)
    data = declared_ranges(InstantBoothDataModule)
    assert {"batch_size", "val_batches", "loader.num_workers", "augment.hflip"} <= set(data)
    assert "concepts" in declared_ranges(IdentityEval)


@dataclass
class Inner:
    n: PositiveInt = 1


@dataclass
class Outer:
    inner: Inner | None = None
    p: Annotated[float, Range(ge=0, le=1)] | None = None


@pytest.mark.parametrize("values", [
    {"inner": {"n": 0}},               # dicts (a checkpoint's hyper-parameters)
    Outer(inner=Inner(n=0)),           # dataclass instances (Python callers)
])
def test_check_names_the_dotted_key(values):
    with pytest.raises(ConfigError, match=r"^cfg\.inner\.n: must be >= 1, got 0$"):
        check_ranges(Outer, values, "cfg.")


def test_absent_none_and_bool_values_are_left_alone():
    check_ranges(Outer, {}, "")
    check_ranges(Outer, {"inner": None, "p": None}, "")


def test_a_command_flag_reuses_the_field_range():
    p = argparse.ArgumentParser(exit_on_error=False)
    p.add_argument("--steps", type=argument_type(SamplingConfig, "steps"))
    p.add_argument("--height", type=argument_type(SamplingConfig, "height"))  # Optional[PositiveInt]
    assert p.parse_args(["--steps", "3", "--height", "8"]).steps == 3
    for argv, message in ((["--steps", "0"], "must be >= 1, got 0"), (["--height", "x"], "expected int, got 'x'")):
        with pytest.raises(argparse.ArgumentError, match=message):
            p.parse_args(argv)

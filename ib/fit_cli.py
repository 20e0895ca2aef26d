"""`ib fit|validate`: the LightningCLI of InstantBooth, with its checks and one-line errors."""
import sys
from pathlib import Path
from typing import Optional

import yaml
from jsonargparse import ArgumentError
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ib.callbacks.identity_eval import IdentityEval
from ib.checkpoint_io import check_checkpoint_file
from ib.config_checks import check_config, parse_dict_scalars
from ib.data.datamodule import InstantBoothDataModule
from ib.errors import ConfigError, NonFiniteLossError, one_line
from ib.lit_module import InstantBoothModule
from ib.run_cli import RunCLI
from ib.weights import check_hparams


class InstantBoothCLI(RunCLI):
    def add_arguments_to_parser(self, parser):
        super().add_arguments_to_parser(parser)
        parser.link_arguments("model.identifier", "data.identifier")
        # One source for the reference size: the image encoder's input size.
        parser.link_arguments("model.reference_size", "data.reference_size", apply_on="instantiate")
        # Its own key rather than an entry of trainer.callbacks, so that an overlay can turn it off (null).
        parser.add_argument("--identity_eval", type=Optional[IdentityEval], default=None,
                            help="identity metrics at every validation (ib.callbacks.identity_eval); null: off")

    def before_instantiate_classes(self):
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        parse_dict_scalars(cfg)  # in place: the classes are built from this namespace
        check_config(cfg, {"model": InstantBoothModule, "data": InstantBoothDataModule,
                           "identity_eval.init_args": IdentityEval})
        super().before_instantiate_classes()

    def instantiate_trainer(self, **kwargs):
        cfg = self.config_init[self.subcommand] if self.subcommand else self.config_init
        if cfg.get("identity_eval") is not None:
            kwargs["callbacks"] = [*(cfg["trainer"].get("callbacks") or []), cfg["identity_eval"]]
        return super().instantiate_trainer(**kwargs)


def _config_error(e: BaseException | None) -> ConfigError | None:
    """A ConfigError anywhere in the chain: jsonargparse wraps those raised while it builds callbacks."""
    while e is not None:
        if isinstance(e, ConfigError):
            return e
        e = e.__cause__ or e.__context__
    return None


def _option_values(argv: list[str], name: str) -> list[str]:
    """Values of `name VALUE` and `name=VALUE` in argv."""
    return [argv[i + 1] if arg == name else arg.partition("=")[2] for i, arg in enumerate(argv)
            if (arg == name and i + 1 < len(argv)) or arg.startswith(name + "=")]


def check_ckpt_path(argv: list[str]) -> None:
    """A checkpoint file given by path, before anything is built: readable without running code, its stored
    config inside the allow-lists (the run is built from the command line, not from it: RunCLI), and written
    by Lightning (the trainer restores its loops from that)."""
    for path in _option_values(argv, "--ckpt_path"):
        if path in ("last", "best", "hpc", "registry", "null", ""):
            continue
        ckpt = check_checkpoint_file(path)
        if "hyper_parameters" in ckpt:
            try:
                check_hparams(ckpt["hyper_parameters"])
            except ConfigError as e:
                raise ConfigError(f"--ckpt_path {path}: {e}") from e
        if "pytorch-lightning_version" not in ckpt:
            raise ConfigError(f"--ckpt_path: {path} is not a Lightning checkpoint (no pytorch-lightning_version)")


def check_config_files(argv: list[str]) -> None:
    """Every --config file must exist and be valid YAML; say which one is not."""
    for path in _option_values(argv, "--config"):
        try:
            yaml.safe_load(Path(path).read_text())
        except OSError as e:
            raise ConfigError(f"--config: cannot read {path}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"--config: {path} is not valid YAML: {one_line(e)}") from e


def run(args: list[str]) -> int:
    """`ib fit|validate ARGS` -> exit code (0, 2 bad input, 1 NaN guard, 143 preempted)."""
    try:
        check_config_files(args)
        check_ckpt_path(args)
        InstantBoothCLI(InstantBoothModule, InstantBoothDataModule, args=args,
                        save_config_kwargs={"overwrite": True}, parser_kwargs={"exit_on_error": False})
    except ArgumentError as e:
        cause = _config_error(e)
        # Otherwise jsonargparse's own report, which names the key ('Parser key "data.batch_size": Expected a
        # <class 'int'>. Got value: two'), spread over lines: kept whole, on one.
        raise ConfigError(one_line(cause) if cause else " ".join(str(e).split())) from e
    except NonFiniteLossError as e:
        print(f"ib: error: {e}", file=sys.stderr)
        return 1
    except SIGTERMException:
        print("ib: stopped by a preemption signal; last.ckpt is written, run the same command to resume",
              file=sys.stderr)
        return 143
    except ConfigError:
        raise
    except Exception as e:  # jsonargparse wraps a ConfigError raised while it builds callbacks
        cause = _config_error(e)
        if cause is None:
            raise
        raise ConfigError(one_line(cause)) from e
    return 0

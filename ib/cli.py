"""`ib fit|validate --config conf/...` (LightningCLI) and `ib generate|export|evaluate|toy-base ...`.

Exit codes: 0 done; 2 bad input (one line on stderr naming the field or file, nothing written); 1 stopped
by the NaN guard; 143 (128 + SIGTERM) preempted, with last.ckpt written: rerun the same command to resume.
"""
import importlib
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Optional

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import yaml  # noqa: E402
from jsonargparse import ArgumentError  # noqa: E402
from lightning.pytorch.utilities.exceptions import SIGTERMException  # noqa: E402

from ib.callbacks.identity_eval import IdentityEval  # noqa: E402
from ib.checkpoint_io import check_checkpoint_file  # noqa: E402
from ib.config_checks import check_config, parse_dict_scalars  # noqa: E402
from ib.data.datamodule import InstantBoothDataModule  # noqa: E402
from ib.errors import ConfigError, NonFiniteLossError  # noqa: E402
from ib.lit_module import InstantBoothModule  # noqa: E402
from ib.run_cli import RunCLI  # noqa: E402


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
        check_config(cfg)
        super().before_instantiate_classes()

    def instantiate_trainer(self, **kwargs):
        cfg = self.config_init[self.subcommand] if self.subcommand else self.config_init
        if cfg.get("identity_eval") is not None:
            kwargs["callbacks"] = [*(cfg["trainer"].get("callbacks") or []), cfg["identity_eval"]]
        return super().instantiate_trainer(**kwargs)


def _one_line(e: BaseException) -> str:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    return lines[0] if lines else type(e).__name__


def _parser_error(e: ArgumentError) -> str:
    """jsonargparse's nested multi-line report -> 'model.optim.lr_heads: Expected a float. Got value: fast'."""
    text = str(e)
    keys = re.findall(r'Parser key "([^"]+)":', text)
    if not keys:
        return _one_line(e)
    field = keys[0]
    for key in keys[1:]:  # inner keys are relative to the outer one
        field = key if key.startswith(field + ".") else f"{field}.{key}"
    unknown = re.search(r"Option '([^']+)' is not accepted", text)
    if unknown:
        return f"{field}.{unknown.group(1)}: unknown key"
    after = text.split(f'Parser key "{keys[-1]}":', 1)[1].splitlines()
    reason = next((l.strip(" -") for l in after if l.strip(" -")), "invalid value")
    reason = re.sub(r"Expected an? <class '([\w.]+)'>", r"expected \1", reason)
    return f"{field}: {reason}"
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
    """A checkpoint file given by path: LightningCLI reads its hyper-parameters before anything else."""
    for path in _option_values(argv, "--ckpt_path"):
        if path not in ("last", "best", "hpc", "registry", "null", ""):
            check_checkpoint_file(path)


def check_config_files(argv: list[str]) -> None:
    """Every --config file must exist and be valid YAML; say which one is not."""
    for path in _option_values(argv, "--config"):
        try:
            yaml.safe_load(Path(path).read_text())
        except OSError as e:
            raise ConfigError(f"--config: cannot read {path}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"--config: {path} is not valid YAML: {_one_line(e)}") from e


# Commands beside LightningCLI's fit/validate: name -> module with main(argv).
COMMANDS = {"generate": "ib.generate", "export": "ib.export", "evaluate": "ib.evaluate",
            "toy-base": "ib.toy.cli"}
# Every command, one line each: `ib`, `ib --help`. `ib COMMAND --help` has the options.
USAGE = """usage: ib COMMAND [options]   (ib COMMAND --help: its options)

commands:
  fit        train: --config conf/NAME.yaml [--trainer.default_root_dir runs/NAME] [--ckpt_path last]
  validate   validation loss, image grid and identity metrics of a checkpoint (--ckpt_path FILE)
  generate   images of a new subject from reference photos and a prompt (no fine-tuning)
  export     a checkpoint's trained weights + model config as one safetensors file
  evaluate   CLIP-I, CLIP-T, DINO on DreamBench-layout data
  toy-base   train the tiny base text-to-image model of the synthetic-world experiment
"""
FIT_COMMANDS = ("fit", "validate")


def main(argv: list[str] | None = None) -> int:
    # The frozen parts are in eval mode on purpose; Lightning's warning about it is noise here.
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="", file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    if args[0] not in (*FIT_COMMANDS, *COMMANDS) and not args[0].startswith("-"):  # options: LightningCLI's
        print(f"ib: error: unknown command '{args[0]}'; commands: {', '.join((*FIT_COMMANDS, *COMMANDS))} "
              "(ib --help)", file=sys.stderr)
        return 2
    try:
        if args[0] in COMMANDS:
            return importlib.import_module(COMMANDS[args[0]]).main(args[1:])
        check_config_files(args)
        check_ckpt_path(args)
        InstantBoothCLI(InstantBoothModule, InstantBoothDataModule, args=argv,
                        save_config_kwargs={"overwrite": True}, parser_kwargs={"exit_on_error": False})
    except ConfigError as e:
        print(f"ib: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except ArgumentError as e:
        cause = _config_error(e)
        print(f"ib: error: {_one_line(cause) if cause else _parser_error(e)}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"ib: error: {e}", file=sys.stderr)
        return 1
    except SIGTERMException:
        print("ib: stopped by a preemption signal; last.ckpt is written, run the same command to resume",
              file=sys.stderr)
        return 143
    except Exception as e:  # jsonargparse wraps a ConfigError raised while it builds callbacks
        cause = _config_error(e)
        if cause is None:
            raise
        print(f"ib: error: {_one_line(cause)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

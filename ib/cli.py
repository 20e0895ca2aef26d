"""`ib fit|validate --config conf/...` (LightningCLI) and `ib evaluate ...` (ib.evaluate).
Bad input ends in one line on stderr and exit 2."""
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import yaml  # noqa: E402
from jsonargparse import ArgumentError  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

from ib.data.datamodule import InstantBoothDataModule  # noqa: E402
from ib.errors import ConfigError  # noqa: E402
from ib.lit_module import InstantBoothModule  # noqa: E402


class InstantBoothCLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        parser.link_arguments("model.identifier", "data.identifier")


def _one_line(e: BaseException) -> str:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    return lines[0] if lines else type(e).__name__


def _config_error(e: BaseException | None) -> ConfigError | None:
    """A ConfigError anywhere in the chain: jsonargparse wraps those raised while it builds callbacks."""
    while e is not None:
        if isinstance(e, ConfigError):
            return e
        e = e.__cause__ or e.__context__
    return None


def check_config_files(argv: list[str]) -> None:
    """Every --config file must exist and be valid YAML; say which one is not."""
    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else arg.partition("=")[2] if arg.startswith("--config=") else None
        if path is None:
            continue
        try:
            yaml.safe_load(Path(path).read_text())
        except OSError as e:
            raise ConfigError(f"--config: cannot read {path}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"--config: {path} is not valid YAML: {_one_line(e)}") from e


def main(argv: list[str] | None = None) -> int:
    # The frozen parts are in eval mode on purpose; Lightning's warning about it is noise here.
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["evaluate"]:  # a plain argparse command, not a LightningCLI subcommand
        from ib.evaluate import main as evaluate_main
        return evaluate_main(args[1:])
    try:
        check_config_files(args)
        InstantBoothCLI(InstantBoothModule, InstantBoothDataModule, args=argv,
                        save_config_kwargs={"overwrite": True}, parser_kwargs={"exit_on_error": False})
    except Exception as e:
        cause = _config_error(e)
        if cause is None and not isinstance(e, ArgumentError):
            raise
        print(f"ib: error: {_one_line(cause or e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

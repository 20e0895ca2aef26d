"""`python -m experiments.toy.cli --config conf/toy_base.yaml [--ckpt_path last]`: LightningCLI fit of the toy
base model (the synthetic-world experiment's tiny text-to-image LDM)."""
import sys

from ib.data.datamodule import InstantBoothDataModule
from ib.run_cli import RunCLI
from experiments.toy.base_module import ToyBaseModule


def main(argv: list[str]) -> int:
    cli = RunCLI(ToyBaseModule, InstantBoothDataModule, args=["fit", *argv],
                 save_config_kwargs={"overwrite": True}, parser_kwargs={"exit_on_error": False})
    if cli.trainer.is_global_zero:
        cli.model.save_base()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""`python -m experiments.toy.cli --config conf/toy_base.yaml [--ckpt_path last]`: LightningCLI fit of the toy
base model (the synthetic-world experiment's tiny text-to-image LDM)."""
import json
import subprocess
import sys
import warnings
from pathlib import Path

from ib.data.datamodule import InstantBoothDataModule
from ib.run_cli import RunCLI
from experiments.toy.base_module import ToyBaseModule


def main(argv: list[str]) -> int:
    # Manual optimisation (two phases): a checkpoint holds the state after the step, which is what resuming needs.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    commit = _commit()  # the code the training runs, before an hour in which the tree may change
    cli = RunCLI(ToyBaseModule, InstantBoothDataModule, args=["fit", *argv],
                 save_config_kwargs={"overwrite": True}, parser_kwargs={"exit_on_error": False})
    if cli.trainer.is_global_zero:
        cfg = cli.config["fit"]
        cli.model.save_base({"command": " ".join(["python -m experiments.toy.cli", *argv]),
                             "seed": cfg["seed_everything"], "commit": commit,
                             "train_shards": cfg["data"]["train_shards"], "world": _world(cfg["data"]["train_shards"])})
    return 0


def _commit() -> str:
    """HEAD, marked "+changes" when the working tree differs from it (the record must say so)."""
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def _world(train_shards: str) -> dict | None:
    """The synthetic world's settings (data_tools.synthetic_world's manifest beside the split), if it is one."""
    manifest = Path(train_shards).parent / "manifest.json"
    return json.loads(manifest.read_text())["settings"] if manifest.is_file() else None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

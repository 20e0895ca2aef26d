"""`ib COMMAND`: fit|validate (LightningCLI, ib/fit_cli.py) and generate|export|evaluate.

Exit codes: 0 done; 2 bad input (one line on stderr naming the field or file, nothing written); 1 stopped
by the NaN guard; 143 (128 + SIGTERM) preempted, with last.ckpt written: rerun the same command to resume.
Commands are imported only when run, so `ib --help` answers at once.
"""
import importlib
import os
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from ib.errors import ConfigError, one_line  # noqa: E402

# Commands beside LightningCLI's fit/validate: name -> module with main(argv).
COMMANDS = {"generate": "ib.generate", "export": "ib.export", "evaluate": "ib.evaluate"}
# Every command, one line each: `ib`, `ib --help`. `ib COMMAND --help` has the options.
USAGE = """usage: ib COMMAND [options]   (ib COMMAND --help: its options)

commands:
  fit        train: --config conf/NAME.yaml [--trainer.default_root_dir runs/NAME] [--ckpt_path last]
  validate   validation loss, image grid and identity metrics of a checkpoint (--ckpt_path FILE)
  generate   images of a new subject from reference photos and a prompt (no fine-tuning)
  export     a checkpoint's trained weights + model config as one safetensors file
  evaluate   CLIP-I, CLIP-T, DINO on DreamBench-layout data
"""
FIT_COMMANDS = ("fit", "validate")


def main(argv: list[str] | None = None) -> int:
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
        return importlib.import_module("ib.fit_cli").run(args)
    except ConfigError as e:
        print(f"ib: error: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

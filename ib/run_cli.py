"""LightningCLI of every training command (`ib fit|validate`, the toy base's `experiments/toy/cli.py`): one shared trainer layer under
each run config, and one run folder per run.

- conf/trainer/default.yaml is read before any --config (jsonargparse's default_config_files), so
  `ib fit --config conf/sd15.yaml` gets atomic checkpoints, RNG state, TensorBoard and the checkpoint
  settings without repeating them; a run config overrides any of it and adds callbacks with `callbacks+:`.
- trainer.default_root_dir names the run folder; the TensorBoard logger and the checkpoint folder are linked
  to it, so a run is named once (`--trainer.default_root_dir runs/NAME`).
- `fit` keeps runs apart: a folder that holds a run is resumed only with --ckpt_path and only by the same
  run (RUN_IDENTITY: the same data, base model and identifier); anything else is refused in one line before
  anything is written. What may change on resume: step budget, learning rates, batch size, loaders, validation.
"""
import json
import warnings
from pathlib import Path

import yaml
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from ib.atomic_write import atomic_path
from ib.callbacks.checkpoint import RunCheckpoint
from ib.errors import ConfigError

SHARED_CONFIG = Path(__file__).resolve().parents[1] / "conf" / "trainer" / "default.yaml"
CONFIG_FILE = "config.yaml"
# What makes two runs the same run, a resume must not change: the data, the frozen base and image encoder it
# trains on, the identifier (a missing key counts as null). A changed architecture is refused by the weights
# check when last.ckpt loads (ib.checkpoint_io).
RUN_IDENTITY = ("data.train_shards", "data.val_shards", "model.ldm.pretrained", "model.image_encoder.model_name",
                "model.image_encoder.pretrained", "model.identifier")


class SaveRunConfig(SaveConfigCallback):
    """The resolved config of a fit at <run folder>/config.yaml, where a later `ib fit` checks a resume."""

    def __init__(self, parser, config, **kwargs):
        super().__init__(parser, config, **{**kwargs, "save_to_log_dir": False})

    def save_config(self, trainer, pl_module, stage) -> None:
        if stage == "fit" and trainer.is_global_zero:
            with atomic_path(Path(trainer.default_root_dir) / self.config_filename) as tmp:  # whole or not at all
                self.parser.save(self.config, tmp, skip_none=False, overwrite=True, multifile=False)


def _get(tree: dict, dotted: str):
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _plain(value):
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def check_run_folder(config: dict, resume: bool) -> None:
    """Refuses (ConfigError) a fit into a folder that holds a run, unless it resumes that same run."""
    if not config["trainer"].get("default_root_dir"):
        return
    run = Path(config["trainer"]["default_root_dir"])
    saved = run / CONFIG_FILE
    checkpoints = run / "checkpoints"
    if not saved.is_file() and not (checkpoints.is_dir() and any(checkpoints.glob("*.ckpt"))):
        return  # a new run
    if not resume:
        raise ConfigError(f"trainer.default_root_dir: {run} holds a run already; resume it with --ckpt_path last, "
                          "or name a new run folder")
    if not saved.is_file():
        return  # checkpoints without a config: nothing to compare with
    try:
        before = yaml.safe_load(saved.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"trainer.default_root_dir: cannot read {saved}: {e}") from e
    for key in RUN_IDENTITY:
        old, new = _plain(_get(before, key)), _plain(_get(config, key))
        if old != new:
            shown = old if isinstance(old, (str, int, float, type(None))) else "another value"
            raise ConfigError(f"trainer.default_root_dir: {run} holds another run ({key} there: {shown}); "
                              "name a new run folder")


class RunCLI(LightningCLI):
    def __init__(self, *args, save_config_callback=SaveRunConfig, **kwargs):
        # Our entry points hand LightningCLI their argv on purpose; the frozen parts are in eval mode on purpose.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
        super().__init__(*args, save_config_callback=save_config_callback, **kwargs)

    def setup_parser(self, add_subcommands, main_kwargs, subparser_kwargs):
        shared = {"default_config_files": [str(SHARED_CONFIG)]}
        if add_subcommands:
            subparser_kwargs = {name: {**shared, **subparser_kwargs.get(name, {})} for name in self.subcommands()}
        else:
            main_kwargs = {**shared, **main_kwargs}
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)

    def add_arguments_to_parser(self, parser):
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.link_arguments("trainer.default_root_dir", "trainer.logger.init_args.save_dir")
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", compute_fn=_checkpoint_dir)

    def _parse_ckpt_path(self) -> None:
        """Does nothing: the config is what a resume runs. Lightning's CLI (2.6) puts the hyper-parameters stored
        in a checkpoint over the command line when --ckpt_path names a file (not for `last`), silently undoing a
        changed learning rate (Lightning-AI/pytorch-lightning#21455). What must not change is refused by
        check_run_folder and by the weights check when the checkpoint loads."""

    def before_instantiate_classes(self):
        if self.subcommand == "fit":
            cfg = self.config["fit"]
            check_run_folder(cfg.as_dict(), resume=cfg.get("ckpt_path") is not None)


def _checkpoint_dir(run_dir: str | None) -> str | None:
    return None if run_dir is None else str(Path(run_dir) / "checkpoints")

"""ib/run_cli.py: the shared trainer layer under every shipped run config, and one run folder per run."""
from pathlib import Path

import pytest
import torch

from ib.cli import main
from ib.fit_cli import InstantBoothCLI
from ib.data.datamodule import InstantBoothDataModule
from ib.lit_module import InstantBoothModule
from ib.run_cli import RunCLI
from experiments.toy.base_module import ToyBaseModule
from tests.conftest import ROOT, run_config


class ParseOnly:
    """The configs as the CLI resolves them, without building models."""

    def before_instantiate_classes(self):
        pass

    def instantiate_classes(self):
        pass


class InstantBoothParse(ParseOnly, InstantBoothCLI):
    pass


class ToyBaseParse(ParseOnly, RunCLI):
    pass


@pytest.mark.parametrize("configs, cli", [
    (["default.yaml"], InstantBoothParse), (["sd15.yaml"], InstantBoothParse),
    (["sd15.yaml", "random_weights.yaml"], InstantBoothParse), (["default.yaml", "experiment.yaml"], InstantBoothParse),
    (["toy_base.yaml"], ToyBaseParse)])
def test_every_run_config_gets_the_shared_trainer_layer(configs, cli):
    """A plain `--config conf/X.yaml` gets atomic checkpoints, RNG state and the SLURM requeue signal (the toy
    configs used to lack them), and its logger and checkpoints land in its run folder."""
    module = ToyBaseModule if cli is ToyBaseParse else InstantBoothModule
    args = [a for name in configs for a in ("--config", str(ROOT / "conf" / name))]
    cfg = cli(module, InstantBoothDataModule, run=False, save_config_callback=None, args=args).config
    t = cfg.trainer
    assert [p.class_path for p in t.plugins] == ["ib.checkpoint_io.SafeCheckpointIO"]
    assert {"ib.callbacks.rng_state.RNGState", "lightning.pytorch.callbacks.LearningRateMonitor"} <= \
        {c.class_path for c in t.callbacks}
    preemption = [c for c in t.callbacks if c.class_path == "ib.callbacks.preemption.Preemption"]
    assert len(preemption) == 1 and preemption[0].init_args.requeue_signal == "SIGUSR1" and cfg.checkpoint.save_last
    assert "ib.callbacks.progress.TrainProgress" in {c.class_path for c in t.callbacks}
    assert t.logger.init_args.save_dir == t.default_root_dir
    assert cfg.checkpoint.dirpath == str(Path(t.default_root_dir) / "checkpoints")
    assert t.default_root_dir == f"runs/{configs[-1].removesuffix('.yaml')}" if configs[-1] == "experiment.yaml" \
        else f"runs/{configs[0].removesuffix('.yaml')}"


def _step(run: Path) -> int:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["global_step"]


@pytest.mark.slow
def test_a_run_is_named_once_and_runs_never_share_a_folder(tmp_path, synthetic_shards, capsys):
    config = str(run_config(tmp_path, synthetic_shards, max_steps=2, val_check_interval=1000))
    mine = tmp_path / "mine"
    # Named on the command line: everything goes there, nothing to the config's own folder (it went there).
    assert main(["fit", "--config", config, "--trainer.default_root_dir", str(mine)]) == 0
    assert _step(mine) == 2 and (mine / "config.yaml").is_file()
    assert list((mine / "tensorboard").glob("events.out.tfevents.*"))
    assert not (tmp_path / "run").exists()
    saved = (mine / "checkpoints" / "last.ckpt").read_bytes()

    # A fresh run into it, or a resume with other data: refused in one line, nothing touched.
    other = tmp_path / "other_val"
    other.symlink_to(synthetic_shards / "val")
    capsys.readouterr()
    for extra, message in (
            ([], f"ib: error: trainer.default_root_dir: {mine} holds a run already; resume it with --ckpt_path "
                  "last, or name a new run folder"),
            (["--ckpt_path", "last", "--data.val_shards", str(other)],
             f"ib: error: trainer.default_root_dir: {mine} holds another run (data.val_shards there: "
             f"{synthetic_shards / 'val'}); name a new run folder")):
        assert main(["fit", "--config", config, "--trainer.default_root_dir", str(mine), "--trainer.max_steps", "4",
                     *extra]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [message]
        assert (mine / "checkpoints" / "last.ckpt").read_bytes() == saved

    # The same run resumes, with a larger step budget.
    assert main(["fit", "--config", config, "--trainer.default_root_dir", str(mine), "--trainer.max_steps", "4",
                 "--ckpt_path", "last"]) == 0
    assert _step(mine) == 4

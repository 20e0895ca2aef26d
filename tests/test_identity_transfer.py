"""A reduced `make experiment`: toy base LDM -> InstantBooth on it, frozen -> held-out concepts.

Asserts the direction of the effect with a margin: the denoising loss with a held-out concept's own
references is lower than with another concept's (same class). If references were ignored anywhere on the
injection path the two losses would be equal and this fails.
"""
import json

import pytest
import yaml

from data_tools.synthetic_world import build
from ib.cli import main
from ib.toy.experiment import main as experiment_main
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def _config(name: str, tmp_path, **edits) -> str:
    cfg = yaml.safe_load((ROOT / "conf" / name).read_text())
    run = tmp_path / name.removesuffix(".yaml")
    t = cfg["trainer"]
    t.update(default_root_dir=str(run), limit_val_batches=0, enable_progress_bar=False, log_every_n_steps=50)
    t["logger"]["init_args"]["save_dir"] = str(run)
    t["callbacks"] = [cb for cb in t["callbacks"] if cb["class_path"].endswith("RunCheckpoint")]
    t["callbacks"][0]["init_args"]["dirpath"] = str(run / "checkpoints")
    for key, value in edits.items():
        section, field = key.split(".", 1)
        cfg[section][field] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_own_references_beat_shuffled_references_on_held_out_concepts(tmp_path):
    world = build(tmp_path / "world", concepts=96, val_concepts=12, images_per_concept=6, size=32,
                  shard_size=200, seed=1)
    data = {"data.train_shards": str(world / "train"), "data.val_shards": str(world / "val")}
    base = tmp_path / "base_ldm"
    assert main(["toy-base", "--config", _config("toy_base.yaml", tmp_path, **data, **{
        "trainer.max_steps": 1100, "model.vae_steps": 300, "model.output_dir": str(base)})]) == 0
    ib_cfg = yaml.safe_load((ROOT / "conf" / "toy_instantbooth.yaml").read_text())["model"]
    ib_cfg["ldm"] = {"pretrained": str(base)}
    assert main(["fit", "--config", _config("toy_instantbooth.yaml", tmp_path, **data, **{
        "trainer.max_steps": 700, "model.ldm": ib_cfg["ldm"]})]) == 0

    out = tmp_path / "experiment"
    ckpt = tmp_path / "toy_instantbooth" / "checkpoints" / "last.ckpt"
    assert experiment_main(["--weights", str(ckpt), "--data", str(world / "val"), "--out", str(out),
                            "--prompts-per-concept", "1", "--sample-steps", "4"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["loss_own"] < 0.99 * report["loss_shuffled"], report
    assert report["loss_own"] < report["loss_base"], report
    assert (out / "grid.png").is_file()

"""A reduced `make experiment`: toy base LDM -> InstantBooth on it, frozen -> held-out concepts.

Asserts the direction of the effect with a margin: the denoising loss with a held-out concept's own
references is lower than with another concept's (same class). If references were ignored anywhere on the
injection path the two losses would be equal and this fails; the second half of the test breaks the path on
purpose (every concept's references replaced by the same blank images) and checks that the gap
goes away and the checks fail.
"""
import json

import pytest
import torch
import yaml

from data_tools.synthetic_world import build
from ib.cli import main
from experiments.toy.cli import main as toy_base_main
from experiments.toy.experiment import main as experiment_main
from tests.conftest import ROOT

# About 11 minutes of one thread on a quiet 2-core machine (the toy base is trained inside the test): three
# times that, so a machine busy with another job does not fail it.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

BASE_STEPS, VAE_STEPS, IB_STEPS = 1100, 300, 700
# conf/toy_instantbooth.yaml's learning rates x 4 for the 700-step schedule (x 1, 2, 4, 8 measured: x 4 gave the
# widest object-region gap on both seeds tried; docs/identity-experiment.md).
IB_LR = {"model.optim.lr_heads": 4e-3, "model.optim.lr_adapters": 2e-3}
# Own-vs-shuffled loss reductions this run must reach. Measured with IB_LR (object region / whole image):
# seed 0 (the test's) 9.4 % / 4.3 %, seed 1 4.6 % / 2.3 %. References ignored on the injection path give
# exactly 0 % / 0 % (checked below). The margins sit below the weaker seed, well above zero.
MARGIN_OBJECT, MARGIN_IMAGE = 0.03, 0.01


def _config(name: str, tmp_path, **edits) -> str:
    cfg = yaml.safe_load((ROOT / "conf" / name).read_text())
    run = tmp_path / name.removesuffix(".yaml")
    t = cfg["trainer"]
    t.update(default_root_dir=str(run), limit_val_batches=0, enable_progress_bar=False, log_every_n_steps=50)
    t.pop("callbacks+", None)  # no image grids: no validation runs
    for key, value in edits.items():
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def reduced_experiment(tmp_path, seed=0, base_steps=BASE_STEPS, vae_steps=VAE_STEPS, ib_steps=IB_STEPS,
                       base_edits=None, ib_edits=None) -> dict:
    """World, toy base, InstantBooth and the held-out measurement; -> report.json. `seed` picks the world,
    seed_everything and the loaders' seed: the same seed gives the same numbers."""
    world = build(tmp_path / "world", concepts=96, val_concepts=12, images_per_concept=6, size=32,
                  shard_size=200, seed=1 + seed)
    data = {"data.train_shards": str(world / "train"), "data.val_shards": str(world / "val"),
            "seed_everything": seed, "data.loader.seed": seed}
    base = tmp_path / "base_ldm"
    assert toy_base_main(["--config", _config("toy_base.yaml", tmp_path, **data, **{
        "trainer.max_steps": base_steps, "model.vae_steps": vae_steps, "model.output_dir": str(base)},
        **(base_edits or {}))]) == 0
    assert main(["fit", "--config", _config("toy_instantbooth.yaml", tmp_path, **data, **{
        "trainer.max_steps": ib_steps, "model.ldm.pretrained": str(base)}, **{**IB_LR, **(ib_edits or {})})]) == 0
    out = tmp_path / "experiment"
    ckpt = tmp_path / "toy_instantbooth" / "checkpoints" / "last.ckpt"
    assert experiment_main(["--weights", str(ckpt), "--data", str(world / "val"), "--out", str(out),
                            "--prompts-per-concept", "1", "--sample-steps", "4"]) == 0
    assert (out / "grid.png").is_file()
    return json.loads((out / "report.json").read_text())


def shortfalls(report: dict) -> list[str]:
    """What a report lacks to show identity transfer; [] when it shows it with the margins."""
    checks = {
        f"object-region loss with own references >= {MARGIN_OBJECT:.0%} below shuffled":
            report["own_vs_shuffled_reduction_object"] >= MARGIN_OBJECT,
        f"whole-image loss with own references >= {MARGIN_IMAGE:.0%} below shuffled":
            report["own_vs_shuffled_reduction"] >= MARGIN_IMAGE,
        "own references below the frozen base alone": report["loss_own"] < report["loss_base"],
    }
    return [name for name, ok in checks.items() if not ok]


def test_own_references_beat_shuffled_references_on_held_out_concepts(tmp_path, monkeypatch):
    report = reduced_experiment(tmp_path)
    summary = {k: round(v, 5) for k, v in report.items() if isinstance(v, float)}
    assert not shortfalls(report), (shortfalls(report), summary)

    # The same measurement with the references cut off the injection path (every concept's references
    # replaced by the same blank images) must fail the checks: the margins above are not met by chance.
    from experiments.toy.experiment import Experiment
    ckpt = tmp_path / "toy_instantbooth" / "checkpoints" / "last.ckpt"
    exp = Experiment(str(ckpt), str(tmp_path / "world" / "val"), num_refs=3,
                     timesteps=report["settings"]["timesteps"], seed=0)
    real_refs = exp.refs
    monkeypatch.setattr(exp, "refs", lambda concept, exclude_key: torch.zeros_like(real_refs(concept, exclude_key)))
    losses = exp.losses()
    broken = {"loss_own": losses["own"]["mean"], "loss_shuffled": losses["shuffled"]["mean"],
              "loss_base": losses["base"]["mean"],
              "own_vs_shuffled_reduction": 1 - losses["own"]["mean"] / losses["shuffled"]["mean"],
              "own_vs_shuffled_reduction_object": 1 - losses["own"]["object_mean"] / losses["shuffled"]["object_mean"]}
    assert broken["own_vs_shuffled_reduction"] == broken["own_vs_shuffled_reduction_object"] == 0.0, broken
    assert shortfalls(broken), broken
    # Sanity of the measurement itself: the unbroken run reproduces its own report's numbers.
    monkeypatch.setattr(exp, "refs", real_refs)
    assert exp.losses()["own"]["mean"] == pytest.approx(report["loss_own"], rel=1e-5)

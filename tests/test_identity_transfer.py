"""The embedded default learns identity: `make train`'s config on the stored toy base (assets/toy-base), then the
held-out measurement of `make experiment` (experiments/toy/experiment.py).

Asserts the direction of the effect with a margin: the denoising loss with a held-out concept's own
references is lower than with another concept's (same class). If references were ignored anywhere on the
injection path the two losses would be equal and this fails; the second half of the test breaks the path on
purpose (every concept's references replaced by the same blank images) and checks that the gap goes away and
the checks fail. The run's TensorBoard must show the same thing as the user sees it (val/loss_own below
val/loss_shuffled, val/identity_own above val/identity_shuffled, the reference | own | shuffled grid).
"""
import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from data_tools.synthetic_world import main as build_world
from experiments.toy.experiment import Experiment
from experiments.toy.experiment import main as experiment_main
from ib.cli import main
from tests.conftest import ROOT

# The default run and the measurement take about 3.3 minutes of one thread beside another one-thread job (7.1 on
# the earlier base, twice the UNet, with a `make train` running beside the suite too); the timeout is three times MINUTES, the loaded time rounded up,
# so a machine busy with another job does not fail it.
MINUTES = 8
pytestmark = [pytest.mark.slow(minutes=MINUTES), pytest.mark.timeout(3 * 60 * MINUTES)]

# Own-vs-shuffled loss reductions the default run must reach (object region / whole image). This test's
# measurement (3 timesteps) on the default run gives 17.4 % / 10.5 % (`make experiment`'s 6 timesteps: 19.0 % /
# 11.9 %, docs/identity-experiment.md); 6.1 % / 3.5 % with the paper's zero gate init and plain loss on an earlier
# base. References ignored on the injection path give exactly 0 % / 0 % (checked below).
MARGIN_OBJECT, MARGIN_IMAGE = 0.13, 0.08
# Colour identity, own minus shuffled references, the run's TensorBoard and this test's 4-step sampling must
# show: 0.116 and 0.123 measured (0 when references are ignored).
MARGIN_IDENTITY = 0.05


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


def test_the_default_run_transfers_identity_to_held_out_concepts(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the config names its base as assets/toy-base, as `make train` runs it
    world, run = tmp_path / "world", tmp_path / "run"
    build_world(["--output", str(world)])  # the default world: the concepts the stored base was trained on
    assert main(["fit", "--config", "conf/default.yaml", "--trainer.default_root_dir", str(run),
                 "--data.train_shards", str(world / "train"), "--data.val_shards", str(world / "val")]) == 0

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    last = {tag: events.Scalars(tag)[-1].value
            for tag in ("val/loss_own", "val/loss_shuffled", "val/identity_own", "val/identity_shuffled")}
    assert last["val/loss_own"] < last["val/loss_shuffled"], last
    assert last["val/identity_own"] > last["val/identity_shuffled"] + MARGIN_IDENTITY, last
    assert "val/reference_own_shuffled_other" in events.Tags()["images"]

    out, ckpt = tmp_path / "experiment", run / "checkpoints" / "last.ckpt"
    assert experiment_main(["--weights", str(ckpt), "--data", str(world / "val"), "--out", str(out),
                            "--prompts-per-concept", "1", "--sample-steps", "4", "--timesteps", "100", "400", "700"]) == 0
    assert torch.is_grad_enabled()  # the measurement leaves the process as it found it (it used to switch autograd off)
    report = json.loads((out / "report.json").read_text())
    summary = {k: round(v, 5) for k, v in report.items() if isinstance(v, float)}
    assert not shortfalls(report), (shortfalls(report), summary)
    assert report["identity_own"] > report["identity_shuffled"] + MARGIN_IDENTITY, summary
    # One image per concept and setting: the gap over concepts is the difference of the means.
    assert report["identity_gap"] == pytest.approx(report["identity_own"] - report["identity_shuffled"])
    assert report["identity_gap_se"] > 0 and 0 < report["identity_concepts_own_above"] <= 24
    assert report["ablations"]["both_off"]["own_vs_shuffled_reduction"] == 0.0  # nothing reads the references

    # The same measurement with the references cut off the injection path (every concept's references
    # replaced by the same blank images) must fail the checks: the margins above are not met by chance.
    exp = Experiment(str(ckpt), str(world / "val"), num_refs=3, timesteps=report["settings"]["timesteps"], seed=0)
    real_refs = exp.refs
    monkeypatch.setattr(exp, "refs", lambda concept, exclude_key: torch.zeros_like(real_refs(concept, exclude_key)))
    full = exp.losses(("full",))["full"]
    broken = {"loss_own": full["own"]["mean"], "loss_shuffled": full["shuffled"]["mean"],
              "loss_base": report["loss_base"],
              "own_vs_shuffled_reduction": 1 - full["own"]["mean"] / full["shuffled"]["mean"],
              "own_vs_shuffled_reduction_object": 1 - full["own"]["object_mean"] / full["shuffled"]["object_mean"]}
    assert broken["own_vs_shuffled_reduction"] == broken["own_vs_shuffled_reduction_object"] == 0.0, broken
    assert shortfalls(broken), broken
    # Sanity of the measurement itself: the unbroken run reproduces its own report's numbers.
    monkeypatch.setattr(exp, "refs", real_refs)
    assert exp.losses(("full",))["full"]["own"]["mean"] == pytest.approx(report["loss_own"], rel=1e-5)

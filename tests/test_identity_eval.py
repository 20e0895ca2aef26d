"""The validation callback in real `ib validate` runs: metrics and grid in TensorBoard, 1 vs 2 DDP processes."""
import os
import signal
import subprocess
import sys

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ib.callbacks.identity_eval import IdentityEval
from ib.cli import main
from ib.errors import ConfigError
from ib.metrics.backbones import ClipBackboneConfig
from tests.conftest import ROOT, default_config, run_config

METRICS = ("val/clip_i", "val/clip_t", "val/dino")
COLOUR = ("val/identity_own", "val/identity_shuffled")
GRID = "val/reference_own_shuffled_other"


def _tensorboard(run_dir) -> EventAccumulator:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return events


def _run_group(cmd, timeout=300) -> tuple[int, str]:
    """Runs cmd in its own process group; a hang (e.g. a collective only one rank reaches) kills every rank."""
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        stderr = p.communicate(timeout=timeout)[1]
        return p.returncode, stderr
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        return -1, f"timed out after {timeout} s (deadlock?): " + (p.communicate()[1] or "")


def _identity_config(tmp_path, shards, **init_args):
    path = run_config(tmp_path, shards)
    cfg = yaml.safe_load(path.read_text())
    cfg["identity_eval"]["init_args"].update(init_args)
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_validate_logs_identity_metrics_and_grid(tmp_path, synthetic_shards):
    config = _identity_config(tmp_path, synthetic_shards, concepts=3, images_per_prompt=2)
    assert main(["validate", "--config", str(config)]) == 0
    events = _tensorboard(tmp_path / "run")
    for tag in METRICS:
        (value,) = [e.value for e in events.Scalars(tag)]
        assert -1.0 <= value <= 1.0 and value != 0.0, tag
    for tag in COLOUR:
        (value,) = [e.value for e in events.Scalars(tag)]
        assert 0.0 <= value <= 1.0, tag
    assert GRID in events.Tags()["images"]


@pytest.mark.slow
def test_two_ddp_processes_share_the_work_and_agree_with_one(tmp_path, synthetic_shards):
    """3 concepts × 2 prompts × 1 image = 6 items: each rank generates 3 and the logged values are those of
    one process generating all 6 (up to float noise from different batch compositions)."""
    values, rows = {}, {}
    for devices in (1, 2):
        folder = tmp_path / f"devices{devices}"
        folder.mkdir()
        config = _identity_config(folder, synthetic_shards, concepts=3)
        args = ["validate", "--config", str(config), "--trainer.accelerator", "cpu", "--trainer.devices", str(devices)]
        if devices == 1:  # in this process (a subprocess would spend ~9 s importing)
            assert main(args) == 0
        else:
            code, stderr = _run_group([sys.executable, "-m", "ib.cli", *args, "--trainer.strategy", "ddp"])
            assert code == 0, stderr[-3000:]
        events = _tensorboard(folder / "run")
        values[devices] = {tag: events.Scalars(tag)[-1].value for tag in METRICS + COLOUR}
        rows[devices] = events.Images(GRID)[-1].height
    # rank 0's grid shows its own share: 3 rows (reference, own, shuffled, other) of 32 px + padding, against all 6
    assert (rows[1], rows[2]) == (6 * 34 + 2, 3 * 34 + 2)
    for tag in METRICS + COLOUR:
        assert values[2][tag] == pytest.approx(values[1][tag], abs=1e-4), tag


def test_prompts_are_checked_up_front():
    with pytest.raises(ConfigError, match=r"^IdentityEval\.prompts: 'a photo of a \{class\}' has no \{identifier\}"):
        IdentityEval(prompts=["a photo of a {class}"])
    with pytest.raises(ConfigError, match=r"^IdentityEval\.prompts: .*only \{identifier\} and \{class\}"):
        IdentityEval(prompts=["a {identifier} {noun}"])
    with pytest.raises(ConfigError, match=r"^IdentityEval\.sampling: unknown key stepz"):
        IdentityEval(prompts=["a {identifier} {class}"], sampling={"stepz": 2})
    with pytest.raises(ConfigError, match=r"^IdentityEval\.concepts: must be >= 1"):
        IdentityEval(prompts=["a {identifier} {class}"], concepts=0)


def test_missing_backbone_files_fail_at_config_time(tmp_path, synthetic_shards, capsys):
    config = _identity_config(tmp_path, synthetic_shards, dino={"weights": str(tmp_path / "dino.pth")})
    assert main(["validate", "--config", str(config)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"ib: error: IdentityEval.dino.weights: file not found: {tmp_path / 'dino.pth'}"
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"^IdentityEval\.clip\.pretrained: file not found: .*clip\.bin$"):
        IdentityEval(prompts=["a {identifier} {class}"], clip=ClipBackboneConfig(pretrained=str(tmp_path / "clip.bin")))


def test_default_config_uses_the_tiny_backbones_of_conf_metrics():
    """`ib evaluate --backbones conf/metrics/tiny.yaml` must score like the embedded default's validation."""
    init = default_config()["identity_eval"]["init_args"]
    tiny = yaml.safe_load((ROOT / "conf" / "metrics" / "tiny.yaml").read_text())
    assert {"clip": init["clip"], "dino": init["dino"]} == tiny

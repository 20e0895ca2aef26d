"""`ib evaluate` end to end on DreamBench subjects with the tiny model: report, resume, bad input."""
import json
import subprocess
import sys

import pytest
import torch

from ib.evaluate import main as evaluate_main
from ib.weights import export_weights, load_model
from tests.conftest import ROOT, build_tiny_model, default_config, run_config

DREAMBENCH = ROOT.parent / "shared" / "dreambench"
TINY_BACKBONES = str(ROOT / "conf" / "metrics" / "tiny.yaml")

needs_dreambench = pytest.mark.skipif(not DREAMBENCH.is_dir(), reason="no DreamBench folder next to the repository")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The tiny model as `ib export` writes it, with the module's hyper-parameter layout."""
    model_cfg = default_config()["model"]
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    return export_weights(build_tiny_model(), path, sampling=model_cfg["sampling"])


def _args(weights, out, *extra):
    return ["--weights", str(weights), "--data", str(DREAMBENCH), "--out", str(out), "--max-subjects", "2",
            "--max-prompts", "2", "--num-images", "1", "--steps", "2", "--backbones", TINY_BACKBONES, *extra]


@pytest.mark.slow
@needs_dreambench
def test_evaluate_writes_report_and_resumes(weights, tmp_path, capsys):
    out = tmp_path / "eval"
    assert evaluate_main(_args(weights, out)) == 0
    report = json.loads((out / "report.json").read_text())

    assert list(report["per_subject"]) == ["backpack", "backpack_dog"]
    for entry in [report["overall"], *report["per_subject"].values()]:
        for key in ("clip_i", "clip_t", "dino"):
            assert -1.0 <= entry[key] <= 1.0, key
        assert set(entry["real_vs_real"]) == {"clip_i", "dino"}
        assert all(-1.0 <= v <= 1.0 for v in entry["real_vs_real"].values())
    backpack = report["per_subject"]["backpack"]
    assert (backpack["class"], backpack["images"], backpack["references"]) == ("backpack", 2, 6)
    for key in ("clip_i", "dino"):  # overall: every subject counts once
        assert report["overall"][key] == pytest.approx(
            sum(s[key] for s in report["per_subject"].values()) / 2, abs=2e-6)
    assert report["settings"]["sampling"]["steps"] == 2 and report["settings"]["seed"] == 0
    assert report["settings"]["speed"] == "off"  # the CPU default: exactly as trained
    assert report["backbones"]["clip"]["pretrained"] is None

    images = sorted(out.glob("*/*.png"))
    assert [p.relative_to(out).as_posix() for p in images] == [
        "backpack/00_a_backpack_in_the_jungle_0.png", "backpack/01_a_backpack_in_the_snow_0.png",
        "backpack_dog/00_a_backpack_in_the_jungle_0.png", "backpack_dog/01_a_backpack_in_the_snow_0.png"]
    assert "DINO" in capsys.readouterr().out

    # Resume: existing images are reused as they are; a missing one is generated again, identically.
    stamps = {p: p.stat().st_mtime_ns for p in images}
    removed = images[1].read_bytes()
    images[1].unlink()
    assert evaluate_main(_args(weights, out)) == 0
    assert all(p.stat().st_mtime_ns == stamps[p] for p in images if p != images[1])
    assert images[1].read_bytes() == removed
    assert json.loads((out / "report.json").read_text()) == report

    # Other sampler settings in the same folder would mix images: refused, naming the setting.
    capsys.readouterr()
    assert evaluate_main(_args(weights, out, "--beta", "0.9")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ib: error: --out:") and "sampling" in err[0]


@pytest.mark.slow
@needs_dreambench
def test_missing_backbone_files_one_line_error(weights, tmp_path, capsys):
    """Through the `ib` entry point and in-process: one line naming the flag, exit 2, nothing written."""
    r = subprocess.run([sys.executable, "-m", "ib.cli", "evaluate", *_args(weights, tmp_path / "out"),
                        "--dino-weights", str(tmp_path / "dino_missing.pth")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [f"ib: error: --dino-weights: file not found: {tmp_path / 'dino_missing.pth'}"]

    assert evaluate_main([*_args(weights, tmp_path / "out"), "--clip-pretrained", str(tmp_path / "clip.bin")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"ib: error: --clip-pretrained: file not found: {tmp_path / 'clip.bin'}"]
    assert evaluate_main([*_args(weights, tmp_path / "out"), "--speed", "graphs"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("ib: error: --speed graphs: model.speed.cuda_graphs_sampling: CUDA graphs need a CUDA device")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_loaded_tiny_model_is_the_trained_one(tmp_path, synthetic_shards):
    """The embedded default's frozen parts are random and not in the file: loading must rebuild the very
    ones the run trained with, or `ib evaluate` would score another model."""
    from ib.fit_cli import InstantBoothCLI
    from ib.data.datamodule import InstantBoothDataModule
    from ib.lit_module import InstantBoothModule

    cli = InstantBoothCLI(InstantBoothModule, InstantBoothDataModule, run=False,
                          args=["--config", str(run_config(tmp_path, synthetic_shards))])
    trained = cli.model.model
    loaded, _ = load_model(export_weights(trained, tmp_path / "w.safetensors", sampling=cli.model.hparams["sampling"]))
    state = loaded.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in trained.state_dict().items())

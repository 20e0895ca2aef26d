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


def _object_photos(root, subjects: dict[str, int]):
    """A DreamBench-layout folder: per subject two 48 px photos, the first `subjects[name]` of a disc on a plain
    ground, the others plain (nothing for a mask backend to find)."""
    import numpy as np
    from PIL import Image
    from ib.data.dreambench import PROMPTS_FILE
    rows = "\n".join(f"{name},ball" for name in subjects)
    (root / PROMPTS_FILE).parent.mkdir(parents=True)
    (root / PROMPTS_FILE).write_text(f"Classes\n\nsubject_name,class\n{rows}\n\nPrompts\n\nObject Prompts\n\n"
                                     "prompt_list = [\n'a {0} {1} in a room'.format(unique_token, class_token)\n]\n\n"
                                     "Live Subject Prompts\n\nprompt_list = [\n'a {0} {1}'.format(unique_token, class_token)\n]\n")
    yy, xx = np.mgrid[:48, :48]
    for k, (name, discs) in enumerate(subjects.items()):
        (root / name).mkdir()
        for i in range(2):
            photo = np.full((48, 48, 3), (220, 200, 160), np.uint8)
            if i < discs:
                photo[(yy - 24 - 2 * i) ** 2 + (xx - 22 - k) ** 2 < 12 ** 2] = (30, 60, 200 - 40 * k)
            Image.fromarray(photo).save(root / name / f"{i:02d}.png")
    return root


def _toy_args(weights, data, out, *extra):
    return ["--weights", str(weights), "--data", str(data), "--out", str(out), "--num-images", "1", "--steps", "1",
            "--backbones", TINY_BACKBONES, *extra]


def test_mask_backend_masks_the_references_and_is_recorded(weights, tmp_path):
    """Training saw masked object crops; --mask-backend gives evaluation the same kind of reference."""
    data = _object_photos(tmp_path / "bench", {"blue_ball": 2, "navy_ball": 2})
    assert evaluate_main(_toy_args(weights, data, tmp_path / "masked", "--mask-backend", "grabcut")) == 0
    assert evaluate_main(_toy_args(weights, data, tmp_path / "whole")) == 0
    masked = json.loads((tmp_path / "masked" / "settings.json").read_text())
    assert masked["mask_backend"] == "grabcut"
    assert "mask_backend" not in json.loads((tmp_path / "whole" / "settings.json").read_text())
    name = "blue_ball/00_a_ball_in_a_room_0.png"
    from PIL import Image
    import numpy as np
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "masked" / name)),
                              np.asarray(Image.open(tmp_path / "whole" / name)))  # other references, other image


def test_photos_and_subjects_without_a_subject_are_left_out_and_counted(weights, tmp_path, capsys):
    """As corrupt samples in training: skipped, named and counted; with nothing usable at all, a one-line error
    and nothing written."""
    data = _object_photos(tmp_path / "bench", {"blue_ball": 2, "half_ball": 1, "no_ball": 0})
    out = tmp_path / "out"
    assert evaluate_main(_toy_args(weights, data, out, "--mask-backend", "grabcut")) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["per_subject"]) == ["blue_ball", "half_ball"]
    assert report["settings"]["subjects_left_out"] == ["no_ball"]
    half = report["per_subject"]["half_ball"]
    assert (half["references"], half["left_out"]) == (1, ["01.png"])
    err = capsys.readouterr().err
    assert f"the mask of {data / 'half_ball' / '01.png'} is empty" in err and "left out: no_ball" in err

    data = _object_photos(tmp_path / "bench2", {"no_ball": 0})
    out = tmp_path / "out2"
    assert evaluate_main(_toy_args(weights, data, out, "--mask-backend", "grabcut")) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"ib: error: --mask-backend: grabcut finds no subject in any photo of {data}", last
    assert not out.exists()
    assert evaluate_main(_toy_args(weights, data, out, "--mask-backend", "no_such_backend")) == 2
    assert capsys.readouterr().err.strip().startswith("ib: error: --mask-backend: unknown mask backend")
    assert not out.exists()


def test_the_worlds_held_out_concepts_as_a_dreambench_folder(weights, tmp_path, synthetic_shards, capsys):
    """data_tools.held_out_bench: a folder `ib evaluate` reads, one subject per held-out concept; bad input is
    one line, exit 2, nothing written."""
    from data_tools import held_out_bench
    from ib.data.dreambench import read_dreambench
    out = tmp_path / "bench"
    assert held_out_bench.main(["--shards", str(synthetic_shards / "val"), "--out", str(out), "--photos", "2"]) == 0
    bench = read_dreambench(out)
    assert [s.name for s in bench.subjects] == ["ball_006", "box_007", "kite_008"]  # the world's 3 held-out concepts
    assert [len(s.images) for s in bench.subjects] == [2, 2, 2]
    assert bench.prompts(bench.subjects[0], "sks")[0] == "a photo of a sks ball on the grass"
    assert evaluate_main(_toy_args(weights, out, tmp_path / "eval", "--max-prompts", "1")) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert list(report["per_subject"]) == ["ball_006", "box_007", "kite_008"]

    capsys.readouterr()
    assert held_out_bench.main(["--shards", str(tmp_path / "none"), "--out", str(tmp_path / "b2")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: --shards: not found: {tmp_path / 'none'}"]
    assert not (tmp_path / "b2").exists()


def test_held_out_bench_skips_and_counts_unusable_samples(tmp_path, synthetic_shards, capsys):
    """A sample without metadata or with a broken image is skipped and counted, the rest written; a stream
    with nothing usable stops in one line."""
    import shutil
    import webdataset as wds
    from data_tools import held_out_bench
    shards = tmp_path / "shards"
    shards.mkdir()
    for tar in (synthetic_shards / "val").glob("*.tar"):
        shutil.copy(tar, shards)
    with wds.TarWriter(str(shards / "zz-bad.tar")) as w:
        w.write({"__key__": "no_meta", "jpg": b"\xff\xd8", "png": b"", "txt": "a ball"})
        w.write({"__key__": "broken_image", "jpg": b"not a jpeg", "png": b"", "txt": "a ball",
                 "json": b'{"concept": "x_999", "class": "ball"}'})
    assert held_out_bench.main(["--shards", str(shards), "--out", str(tmp_path / "bench")]) == 0
    out = capsys.readouterr()
    assert "2 unusable samples skipped" in out.err and "wrote 3 concepts" in out.out
    assert not (tmp_path / "bench" / "x_999").exists()

    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    shutil.copy(shards / "zz-bad.tar", only_bad)
    assert held_out_bench.main(["--shards", str(only_bad), "--out", str(tmp_path / "b2")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: --shards: {only_bad}: no usable samples"
    assert not (tmp_path / "b2").exists()

"""`ib export` and `ib generate` end to end, and their refusals."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ib.cli import main
from ib.weights import CONFIG_KEY, export_weights, write_weights
from tests.conftest import build_tiny_model, default_config, wider_parts


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    m = default_config()["model"]
    model = build_tiny_model()
    with torch.no_grad():
        for a in model.adapters:
            a.gate.fill_(0.4)
    return export_weights(model, tmp_path_factory.mktemp("w") / "ib.safetensors", sampling=dict(m["sampling"], steps=2))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (80, 60, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
        paths.append(str(d / f"{i}.jpg"))
    mask = np.zeros((80, 60), np.uint8)
    mask[10:60, 10:50] = 255
    Image.fromarray(mask).save(d / "mask.png")
    return paths, str(d / "mask.png")


def test_generate_writes_images_and_settings(tmp_path, weights, photos, capsys):
    refs, _ = photos
    out = tmp_path / "out"
    rc = main(["generate", "--weights", str(weights), "--ref", *refs, "--prompt", "a photo of a sks dog on the beach",
               "--out", str(out), "--num-images", "3", "--seed", "5", "--beta", "0.5", "--batch-size", "2"])
    assert rc == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["seed000005.png", "seed000006.png", "seed000007.png"]
    settings = json.loads((out / "settings.json").read_text())
    assert settings["sampling"]["beta"] == 0.5 and settings["sampling"]["alpha"] == default_config()["model"]["sampling"]["alpha"]
    assert settings["sampling"]["steps"] == 2 and settings["seeds"] == [5, 6, 7] and len(settings["refs"]) == 3
    assert Image.open(out / pngs[0]).size == (32, 32)
    assert settings["speed"] == "off"  # the CPU default: exactly as trained


def test_export_from_checkpoint_and_dtype(tmp_path, weights):
    from ib.export import export

    # A Lightning-style checkpoint (what `ib fit` writes: the model's own names under "model.") exports to the
    # same tensors, named as in the export file.
    from safetensors.torch import load_file
    from ib.weights import load_model, read_weights
    hparams, state = read_weights(weights)
    model, _ = load_model(weights)
    ckpt = tmp_path / "x.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.trainable_state_dict().items()},
                "hyper_parameters": hparams}, ckpt)
    out = export(str(ckpt), tmp_path / "e.safetensors", "bf16")
    got = load_file(str(out))
    assert set(got) == set(state) and all(v.dtype == torch.bfloat16 for v in got.values())
    assert all(torch.equal(got[k], state[k].to(torch.bfloat16)) for k in state)


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ib: error:")
    return err[0]


def test_generate_refusals(tmp_path, weights, photos, capsys):
    refs, mask = photos
    out = tmp_path / "out"
    base = ["generate", "--weights", str(weights), "--out", str(out)]
    assert "identifier 'sks'" in _error(capsys, base + ["--ref", refs[0], "--prompt", "a photo of a dog"])
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    assert "broken.jpg" in _error(capsys, base + ["--ref", str(bad), "--prompt", "a sks dog"])
    assert "nowhere.safetensors" in _error(capsys, ["generate", "--weights", str(tmp_path / "nowhere.safetensors"),
                                                     "--ref", refs[0], "--prompt", "a sks dog", "--out", str(out)])
    assert "--mask" in _error(capsys, base + ["--ref", *refs[:2], "--mask", mask, "--prompt", "a sks dog"])
    assert not out.exists()  # nothing half-written

    # Weights of another architecture: a message, not a stack of shape errors. Format 1 (one JSON config, the
    # model's own names) and format 2 (`ib export`: base model in the metadata, diffusers module paths).
    from safetensors import safe_open
    from ib.weights import read_weights
    hparams, _ = read_weights(weights)
    other = dict(hparams, ldm=wider_parts(48))
    wrong = write_weights(build_tiny_model().trainable_state_dict(), {CONFIG_KEY: json.dumps(other)},
                          tmp_path / "wrong.safetensors")
    with safe_open(str(weights), "pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    wrong2 = write_weights(state, dict(meta, base_model=json.dumps(other["ldm"])), tmp_path / "wrong2.safetensors")
    for path in (wrong, wrong2):
        msg = _error(capsys, ["generate", "--weights", str(path), "--ref", refs[0], "--prompt", "a sks dog",
                              "--out", str(out)])
        assert "do not fit" in msg
        assert not out.exists()


def test_generate_with_masks(tmp_path, weights, photos):
    refs, mask = photos
    assert main(["generate", "--weights", str(weights), "--ref", refs[0], "--mask", mask, "--prompt", "a sks dog",
                 "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "seed000000.png").is_file()


def test_generate_with_a_mask_backend(tmp_path, weights):
    image = np.full((80, 80, 3), 200, np.uint8)
    image[20:60, 25:55] = (200, 30, 30)  # a red object on a plain background
    Image.fromarray(image).save(tmp_path / "obj.jpg")
    out = tmp_path / "gc"
    assert main(["generate", "--weights", str(weights), "--ref", str(tmp_path / "obj.jpg"), "--mask-backend",
                 "grabcut", "--prompt", "a sks dog", "--out", str(out)]) == 0
    assert json.loads((out / "settings.json").read_text())["mask_backend"] == "grabcut"


def test_unknown_mask_backend_is_one_line(tmp_path, weights, photos, capsys):
    refs, _ = photos
    msg = _error(capsys, ["generate", "--weights", str(weights), "--ref", refs[0], "--mask-backend", "nope",
                          "--prompt", "a sks dog", "--out", str(tmp_path / "o")])
    assert "--mask-backend" in msg and not (tmp_path / "o").exists()


def test_speed_presets_need_cuda_for_graphs_and_keep_images_on_cpu(tmp_path, weights, photos, capsys):
    refs, _ = photos
    base = ["generate", "--weights", str(weights), "--ref", refs[0], "--prompt", "a sks dog", "--seed", "3"]
    msg = _error(capsys, base + ["--speed", "graphs", "--out", str(tmp_path / "g")])
    assert msg.startswith("ib: error: --speed graphs: model.speed.cuda_graphs_sampling") and not (tmp_path / "g").exists()
    assert main(base + ["--speed", "off", "--out", str(tmp_path / "off")]) == 0
    settings = json.loads((tmp_path / "off" / "settings.json").read_text())
    assert settings["speed"] == "off"

"""data_tools.encode_latents: VAE posterior moments written into shards, read back by the DataModule, used
by training instead of the VAE encoder."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch

from data_tools.encode_latents import main as encode_main
from ib.cli import main as cli_main
from ib.data.datamodule import InstantBoothDataModule, SampleTransform
from ib.data.shards import decode_sample, read_tar_samples, resolve_shards
from ib.data.transforms import ReferenceAugment, target_transform
from ib.lit_module import InstantBoothModule
from tests.conftest import DEFAULT_CONFIG, build_tiny_model, edit_config, run_config


def _encode(tmp_path, shards, out_name="latents", extra=()):
    out = tmp_path / out_name
    rc = encode_main(["--config", str(DEFAULT_CONFIG), "--input", str(shards), "--output", str(out),
                      "--batch-size", "3", *extra])
    return rc, out


def _samples(folder):
    return [s for u in resolve_shards(str(folder), "t") for s in read_tar_samples([{"url": u}], on_error=pytest.fail)]


def test_moments_are_the_vae_posterior_of_the_centre_crop_and_its_mirror(tmp_path, synthetic_shards):
    rc, out = _encode(tmp_path, synthetic_shards / "train")
    assert rc == 0
    raw_in, raw_out = _samples(synthetic_shards / "train"), _samples(out)
    assert [s["__key__"] for s in raw_out] == [s["__key__"] for s in raw_in]
    for a, b in zip(raw_in, raw_out):  # every original member unchanged, one added
        assert {k: v for k, v in b.items() if k not in ("latents.npy", "__url__")} == \
               {k: v for k, v in a.items() if k != "__url__"}
    report = json.loads((out / "latents.json").read_text())
    assert report["kept"] == len(raw_in) == 24 and report["skipped"] == 0
    assert not list(out.glob("*.tmp"))

    ldm = build_tiny_model().ldm  # the same random VAE: a function of the config's init_seed
    s = decode_sample(raw_out[5])
    crop = target_transform(32, train=False)(image=s["image"])["image"]
    x = torch.from_numpy(crop.transpose(2, 0, 1).copy()).float()[None] / 255
    with torch.no_grad():
        want = ldm.latent_moments(torch.cat([x, x.flip(-1)]))
    got = torch.from_numpy(s["latent_moments"].astype(np.float32))
    assert got.shape == (2, 8, 8, 8)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)  # float16 storage


def test_datamodule_pairs_flip_with_moments_and_training_skips_the_vae(tmp_path, synthetic_shards, monkeypatch):
    _, out = _encode(tmp_path, synthetic_shards / "train")
    transform = SampleTransform(32, 32, "sks", ReferenceAugment(), train=True)
    s = decode_sample(_samples(out)[0])
    seen = set()
    for _ in range(12):  # the flip is random: both halves of the moments get used, each with its image
        ex = transform(s)
        flipped = bool(torch.equal(ex["latent_moments"], torch.from_numpy(s["latent_moments"][1])))
        assert flipped or torch.equal(ex["latent_moments"], torch.from_numpy(s["latent_moments"][0]))
        crop = target_transform(32, train=False)(image=s["image"])["image"]
        assert np.array_equal(ex["image"].numpy().transpose(1, 2, 0), crop[:, ::-1] if flipped else crop)
        seen.add(flipped)
    assert seen == {False, True}

    # A real fit on the latents shards: the VAE encoder is never called, the decoder still is (images).
    config = edit_config(run_config(tmp_path, synthetic_shards), {"data.train_shards": str(out)})
    from diffusers import AutoencoderKL
    monkeypatch.setattr(AutoencoderKL, "encode", lambda *a, **k: pytest.fail("VAE encode with precomputed latents"))
    dm = InstantBoothDataModule(train_shards=str(out), batch_size=2, batches_per_epoch=1)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["latent_moments"].shape == (2, 8, 8, 8) and batch["latent_moments"].dtype == torch.float16
    monkeypatch.undo()
    # Which VAE encodes happen inside a training step? On the plain shards some must (so the probe works);
    # on the latents shards none may (validation still encodes its plain val shards).
    in_step, calls = [], []
    step, encode = InstantBoothModule.training_step, AutoencoderKL.encode

    def probed_step(self, *a, **k):
        in_step.append(1)
        try:
            return step(self, *a, **k)
        finally:
            in_step.pop()
    monkeypatch.setattr(InstantBoothModule, "training_step", probed_step)
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, *a, **k: calls.append(bool(in_step)) or encode(self, *a, **k))
    fit = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2"]  # after --config: they override it
    plain = edit_config(config, {"data.train_shards": str(synthetic_shards / "train"),
                                 "trainer.default_root_dir": str(tmp_path / "plain_run")}, out=tmp_path / "plain.yaml")
    assert cli_main(["fit", "--config", str(plain), *fit]) == 0
    assert sum(calls) == 2  # two training steps, one VAE encode each
    calls.clear()
    assert cli_main(["fit", "--config", str(config), *fit]) == 0
    assert calls and not any(calls)


def test_bad_input_and_settings_mismatch_are_one_line_errors(tmp_path, synthetic_shards, capsys):
    rc, _ = _encode(tmp_path, tmp_path / "nowhere")
    assert rc == 2 and "--input: not found" in capsys.readouterr().err
    shards = tmp_path / "shards"
    shards.mkdir()
    for p in sorted((synthetic_shards / "train").glob("*.tar"))[:1]:
        (shards / p.name).write_bytes(p.read_bytes())
    # a corrupt sample (undecodable jpg) in a second shard: skipped and counted, the rest encoded
    bad = shards / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        for key, data in (("x.jpg", b"not a jpeg"), ("x.png", b"x"), ("x.txt", b"a ball"), ("x.json", b'{"class": "ball"}')):
            info = tarfile.TarInfo(key)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    rc, out = _encode(tmp_path, shards)
    report = json.loads((out / "latents.json").read_text())
    assert rc == 0 and report["skipped"] == 1 and report["kept"] == 8 and report["shards"]["bad.tar"]["kept"] == 0
    cfg = tmp_path / "other.yaml"
    cfg.write_text("data: {image_size: 64}\n")
    rc, _ = _encode(tmp_path, shards, extra=["--config", str(cfg)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "other settings" in err[0]
    rc, _ = _encode(tmp_path, shards)  # the same settings again: complete shards are skipped
    assert rc == 0 and "nothing to do" in capsys.readouterr().out


def test_latents_of_another_image_size_are_a_one_line_error_in_fit(tmp_path, synthetic_shards, capsys):
    large = tmp_path / "large.yaml"
    large.write_text("data: {image_size: 64}\n")
    rc, out = _encode(tmp_path, synthetic_shards / "train", extra=["--config", str(large)])
    assert rc == 0
    config = edit_config(run_config(tmp_path, synthetic_shards), {"data.train_shards": str(out)})
    assert cli_main(["fit", "--config", str(config), "--trainer.max_steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ib: error: data.train_shards: latents.npy moments (8, 16, 16)") and "encode_latents" in err[-1]

"""The real loading code (hub id or local folder / open_clip tag or file), exercised offline on tiny parts."""
from dataclasses import replace

import pytest
import torch
import yaml

from ib.errors import ConfigError
from ib.models.frozen_ldm import FrozenLDM, LDMConfig
from ib.models.image_encoder import FrozenImageEncoder, ImageEncoderConfig, create_open_clip
from tests.conftest import ROOT, default_config, random_parts


def _random_parts() -> LDMConfig:
    return LDMConfig(**random_parts())


def test_diffusers_folder_round_trip(tmp_path):
    cfg = _random_parts()
    built = FrozenLDM.from_config(cfg)
    built.save_pretrained(tmp_path / "sd")
    loaded = FrozenLDM.from_config(LDMConfig(pretrained=str(tmp_path / "sd")))
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(built, part).state_dict(), getattr(loaded, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    prompt = "a photo of a sks dog"
    assert built.tokenizer(prompt).input_ids == loaded.tokenizer(prompt).input_ids
    assert loaded.noise_scheduler.config.num_train_timesteps == 1000
    assert not any(p.requires_grad for p in loaded.parameters())


def test_a_bf16_folder_loads_in_float32(tmp_path):
    """Stored bf16 (like assets/toy-base) -> every frozen part in float32, the text encoder included (transformers
    alone would keep it in bf16 and feed bf16 states to a float32 UNet)."""
    built = FrozenLDM.from_config(_random_parts()).to(torch.bfloat16)
    built.save_pretrained(tmp_path / "bf16")
    loaded = FrozenLDM.from_config(LDMConfig(pretrained=str(tmp_path / "bf16")))
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    a, b = built.unet.state_dict(), loaded.unet.state_dict()
    assert all(torch.equal(a[k].float(), b[k]) for k in a)  # bf16 -> float32 is exact


def test_missing_or_broken_model_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"model.ldm.pretrained: folder not found"):
        FrozenLDM.from_config(LDMConfig(pretrained=str(tmp_path / "absent")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"model.ldm.pretrained: cannot load"):
        FrozenLDM.from_config(LDMConfig(pretrained=str(tmp_path / "empty")))


def test_unknown_hub_id_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"model.ldm.pretrained: cannot load 'no-such-org/no-such-model'"):
        FrozenLDM.from_config(LDMConfig(pretrained="no-such-org/no-such-model"))


def test_a_relative_folder_from_another_directory_names_where_it_looked(tmp_path, monkeypatch):
    """The embedded default records `assets/toy-base`: run from elsewhere (`ib generate --weights` on its
    checkpoint), that name reads as a hub id, and diffusers' own message would only say a config.json is missing."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        FrozenLDM.from_config(LDMConfig(pretrained="assets/toy-base"))
    msg = str(e.value)
    assert msg.startswith("model.ldm.pretrained: cannot load 'assets/toy-base': no folder ")
    assert str(tmp_path / "assets" / "toy-base") in msg and "\n" not in msg


def test_open_clip_checkpoint_file_round_trip(tmp_path):
    cfg = ImageEncoderConfig(**default_config()["model"]["image_encoder"])
    model = create_open_clip(cfg)
    torch.save(model.state_dict(), tmp_path / "clip.pt")
    from_file = FrozenImageEncoder.build(ImageEncoderConfig(cfg.model_name, str(tmp_path / "clip.pt"), cfg.overrides, init_seed=123))
    a, b = model.visual.state_dict(), from_file.visual.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="model.image_encoder.pretrained: file not found"):
        FrozenImageEncoder.build(ImageEncoderConfig(cfg.model_name, str(tmp_path / "absent.pt"), cfg.overrides))


def test_random_init_is_reproducible():
    cfg = _random_parts()
    a = FrozenLDM.from_config(cfg).unet.state_dict()
    b = FrozenLDM.from_config(cfg).unet.state_dict()
    c = FrozenLDM.from_config(replace(cfg, init_seed=1)).unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_sd15_config_names_real_weights():
    m = yaml.safe_load((ROOT / "conf" / "sd15.yaml").read_text())["model"]
    assert m["ldm"]["pretrained"] and m["image_encoder"] == {"model_name": "ViT-L-14", "pretrained": "openai", "overrides": {}}
    assert (m["optim"]["lr_heads"], m["optim"]["lr_adapters"], m["beta_train"]) == (1e-4, 1e-6, 1.0)
    assert (m["sampling"]["beta"], m["sampling"]["alpha"]) == (0.3, 0.4)

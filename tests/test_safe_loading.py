"""No file ib reads can run code: a planted pickle (a class whose unpickling runs a shell command that creates a
marker file) reached through a stored config (`ib export` metadata, a checkpoint's hyper-parameters, a diffusers
folder) is never unpickled. Every command refuses it with one line naming the field, exit 2, or loads safely.
Also: non-finite weights, broken export metadata, and the mode / atomicity of exported files."""
import json
import os
import stat

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from ib.cli import main
from ib.errors import ConfigError
from ib.metrics.backbones import ClipBackbone, ClipBackboneConfig, DinoBackbone, DinoBackboneConfig
from ib.models.frozen_ldm import FrozenLDM, LDMConfig
from ib.models.image_encoder import ImageEncoderConfig, create_open_clip
from ib.weights import CONFIG_KEY, export_metadata, read_weights, write_weights
from tests.conftest import ROOT, build_tiny_model, default_config, edit_config, run_config

DREAMBENCH = ROOT.parent / "shared" / "dreambench"


class Planted:
    """Unpickling it runs a shell command: what an attacker's weights file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path, marker):
    """A file that looks like a checkpoint; loading it with weights_only=False creates `marker`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": Planted(marker)}, path)
    return path


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model()


@pytest.fixture(scope="module")
def state(tiny):
    return tiny.trainable_state_dict()


def tiny_hparams(**changes) -> dict:
    m = default_config()["model"]
    return {"ldm": m["ldm"], "image_encoder": m["image_encoder"], "identifier": "sks", "uncond_adapters": True,
            "sampling": dict(m["sampling"], steps=2), **changes}


def v1(hparams: dict) -> dict[str, str]:
    """Format 1 metadata (older `ib export` files): one JSON entry with the hyper-parameters."""
    return {CONFIG_KEY: json.dumps(hparams)}


def stored(fmt: int, model, state: dict, hparams: dict, out):
    """An export file of format `fmt` holding `state` (the model's own names) and the configs of `hparams`:
    format 1 as above, format 2 as `ib export` writes it (diffusers module paths, one metadata entry per field)."""
    if fmt == 1:
        return write_weights(state, v1(hparams), out)
    meta = dict(export_metadata(model, hparams.get("sampling")), base_model=json.dumps(hparams["ldm"]),
                image_encoder=json.dumps(hparams["image_encoder"]))
    return write_weights(model.to_diffusers_names(state), meta, out)


def evil_image_encoder(planted, **override_changes) -> dict:
    ie = default_config()["model"]["image_encoder"]
    return dict(ie, pretrained=str(planted), overrides={**ie["overrides"], "weights_only": False, **override_changes})


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "ref.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    return str(path)


def one_line_error(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("ib: error:"), err
    return err[0]


def generate_args(weights, photo, out):
    return ["generate", "--weights", str(weights), "--ref", photo, "--prompt", "a sks dog", "--out", str(out)]


# --- a planted pickle through every command -------------------------------------------------------------------

@pytest.mark.parametrize("fmt", [1, 2])
def test_generate_refuses_export_whose_config_unlocks_pickles(tmp_path, tiny, state, photo, fmt, capsys):
    marker = tmp_path / "MARKER"
    planted = plant(tmp_path / "clip.pt", marker)
    weights = stored(fmt, tiny, state, tiny_hparams(image_encoder=evil_image_encoder(planted)),
                     tmp_path / "evil.safetensors")
    msg = one_line_error(capsys, generate_args(weights, photo, tmp_path / "out"))
    assert msg == f"ib: error: --weights {weights}: model.image_encoder.overrides.weights_only: not an allowed field"
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt", [1, 2])
def test_generate_refuses_planted_pickle_without_unlock(tmp_path, tiny, state, photo, fmt, capsys):
    """`pretrained` alone pointing at a pickle: loaded weights-only, so refused, never run."""
    marker = tmp_path / "MARKER"
    planted = plant(tmp_path / "clip.pt", marker)
    ie = dict(default_config()["model"]["image_encoder"], pretrained=str(planted))
    weights = stored(fmt, tiny, state, tiny_hparams(image_encoder=ie), tmp_path / "evil.safetensors")
    msg = one_line_error(capsys, generate_args(weights, photo, tmp_path / "out"))
    assert msg == (f"ib: error: model.image_encoder.pretrained: {planted} is not a weights-only checkpoint (it holds "
                   f"more than tensors; loading it could run code): refused")
    assert not marker.exists()


@pytest.mark.parametrize("field, value, named", [
    ("vision_cfg", {"timm_model_name": "vit_small_patch16_224", "timm_model_pretrained": True},
     "vision_cfg.timm_model_name"),
    ("text_cfg", {"hf_model_name": "roberta-base"}, "text_cfg.hf_model_name"),
    ("pretrained_image_path", "x.pt", "pretrained_image_path"),
    ("jit", True, "jit"),
])
def test_open_clip_overrides_outside_the_allow_list(field, value, named):
    ie = default_config()["model"]["image_encoder"]
    cfg = ImageEncoderConfig(**dict(ie, overrides={**ie["overrides"], field: value}))
    with pytest.raises(ConfigError, match=rf"^model\.image_encoder\.overrides\.{named}: not an allowed field$"):
        create_open_clip(cfg)


def test_open_clip_model_name_must_be_built_in(tmp_path):
    """'local-dir:' / 'hf-hub:' take the architecture (and weights) from elsewhere, past the allow-list."""
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 32, "text_cfg": {
        "hf_model_name": "roberta-base"}, "vision_cfg": {}}}))
    for name in (f"local-dir:{folder}", "hf-hub:org/repo"):
        with pytest.raises(ConfigError, match=r"^model\.image_encoder\.model_name: .* not a built-in open_clip"):
            create_open_clip(ImageEncoderConfig(model_name=name))


def test_fit_refuses_checkpoint_whose_hyper_parameters_unlock_pickles(tmp_path, state, synthetic_shards, capsys):
    marker = tmp_path / "MARKER"
    planted = plant(tmp_path / "clip.pt", marker)
    ckpt = tmp_path / "evil.ckpt"
    hparams = tiny_hparams(image_encoder=evil_image_encoder(planted))
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "hyper_parameters": hparams}, ckpt)
    config = run_config(tmp_path, synthetic_shards)
    msg = one_line_error(capsys, ["fit", "--config", str(config), "--ckpt_path", str(ckpt)])
    assert msg == f"ib: error: --ckpt_path {ckpt}: model.image_encoder.overrides.weights_only: not an allowed field"
    assert not marker.exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("field, value, named", [
    ("model.image_encoder.overrides.weights_only", False, "model.image_encoder.overrides.weights_only"),
    ("model.ldm.text_encoder.attn_implementation", "kernels-community/x", "model.ldm.text_encoder.attn_implementation"),
])
def test_fit_config_outside_the_allow_lists(tmp_path, synthetic_shards, field, value, named, capsys):
    """The same allow-lists for a config file as for a stored config."""
    config = edit_config(run_config(tmp_path, synthetic_shards), {field: value})
    assert one_line_error(capsys, ["fit", "--config", str(config)]) == f"ib: error: {named}: not an allowed field"
    assert not (tmp_path / "run").exists()


def test_toy_base_module_refuses_unknown_ldm_fields(tmp_path):
    from experiments.toy.base_module import ToyBaseModule
    with pytest.raises(ConfigError, match=r"^model\.ldm\.unet2: not an allowed field$"):
        ToyBaseModule({"unet2": {}}, str(tmp_path / "out"))


def test_export_refuses_checkpoint_whose_hyper_parameters_unlock_pickles(tmp_path, state, capsys):
    marker = tmp_path / "MARKER"
    planted = plant(tmp_path / "clip.pt", marker)
    ckpt = tmp_path / "evil.ckpt"
    hparams = tiny_hparams(image_encoder=evil_image_encoder(planted))
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "hyper_parameters": hparams}, ckpt)
    out = tmp_path / "out.safetensors"
    msg = one_line_error(capsys, ["export", "--ckpt", str(ckpt), "--out", str(out)])
    assert msg == f"ib: error: --ckpt {ckpt}: model.image_encoder.overrides.weights_only: not an allowed field"
    assert not marker.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["clip.pt", "evil.ckpt"]


@pytest.mark.skipif(not DREAMBENCH.is_dir(), reason="no DreamBench folder next to the repository")
def test_evaluate_refuses_export_whose_config_unlocks_pickles(tmp_path, state, capsys):
    marker = tmp_path / "MARKER"
    planted = plant(tmp_path / "clip.pt", marker)
    weights = write_weights(state, v1(tiny_hparams(image_encoder=evil_image_encoder(planted))),
                            tmp_path / "evil.safetensors")
    msg = one_line_error(capsys, ["evaluate", "--weights", str(weights), "--data", str(DREAMBENCH), "--out",
                                  str(tmp_path / "eval"), "--backbones", str(ROOT / "conf" / "metrics" / "tiny.yaml")])
    assert msg == f"ib: error: --weights {weights}: model.image_encoder.overrides.weights_only: not an allowed field"
    assert not marker.exists() and not (tmp_path / "eval").exists()


def test_metric_backbones_refuse_unlocking_overrides(tmp_path, capsys):
    """CLIP through the same allow-list (also `ib evaluate --backbones`); DINO's timm overrides too."""
    marker = tmp_path / "MARKER"
    planted = plant(tmp_path / "clip.pt", marker)
    tiny = yaml.safe_load((ROOT / "conf" / "metrics" / "tiny.yaml").read_text())
    clip = dict(tiny["clip"], pretrained=str(planted), overrides={**tiny["clip"]["overrides"], "weights_only": False})
    with pytest.raises(ConfigError, match=r"^clip\.overrides\.weights_only: not an allowed field$"):
        ClipBackbone(ClipBackboneConfig(**clip))
    for key, value in (("checkpoint_path", str(planted)), ("pretrained_cfg_overlay", {"file": str(planted)}),
                       ("pretrained", True)):
        dino = dict(tiny["dino"], overrides={**tiny["dino"]["overrides"], key: value})
        with pytest.raises(ConfigError, match=rf"^dino\.overrides\.{key}: not an allowed field$"):
            DinoBackbone(DinoBackboneConfig(**dino))
    with pytest.raises(ConfigError, match=r"^dino\.model_name: 'local-dir:/x' is not a timm architecture$"):
        DinoBackbone(DinoBackboneConfig(model_name="local-dir:/x"))
    assert not marker.exists()


@pytest.fixture(scope="module")
def tiny_ldm_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ldm") / "sd"
    built = FrozenLDM.from_config(LDMConfig(**default_config()["model"]["ldm"]))
    built.save_pretrained(folder)
    return folder, built


PICKLE_FILES = {"unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
                "text_encoder": ("model.safetensors", "pytorch_model.bin")}


def _copy_with_bin(tiny_ldm_folder, tmp_path, part, content):
    import shutil
    folder, built = tiny_ldm_folder
    copy = tmp_path / "sd"
    shutil.copytree(folder, copy)
    safetensors_name, bin_name = PICKLE_FILES[part]
    (copy / part / safetensors_name).unlink()
    torch.save(content, copy / part / bin_name)
    return copy


@pytest.mark.parametrize("fmt", [1, 2])
@pytest.mark.parametrize("part", sorted(PICKLE_FILES))
def test_diffusers_folder_with_a_pickle_bin_is_refused(tmp_path, tiny_ldm_folder, tiny, state, photo, part, fmt, capsys):
    marker = tmp_path / "MARKER"
    folder = _copy_with_bin(tiny_ldm_folder, tmp_path, part, {"w": Planted(marker)})
    weights = stored(fmt, tiny, state, tiny_hparams(ldm={"pretrained": str(folder)}), tmp_path / "w.safetensors")
    msg = one_line_error(capsys, generate_args(weights, photo, tmp_path / "out"))
    assert msg.startswith(f"ib: error: model.ldm.pretrained: cannot load '{folder}'")
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("part", sorted(PICKLE_FILES))
def test_diffusers_folder_with_a_plain_bin_still_loads(tmp_path, tiny_ldm_folder, part):
    """A .bin that holds tensors only loads weights-only: older diffusers folders keep working."""
    built = tiny_ldm_folder[1]
    folder = _copy_with_bin(tiny_ldm_folder, tmp_path, part, getattr(built, part).state_dict())
    loaded = FrozenLDM.from_config(LDMConfig(pretrained=str(folder)))
    a, b = getattr(built, part).state_dict(), getattr(loaded, part).state_dict()
    assert a.keys() <= b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("part, key", [("unet", "foo"), ("vae", "from_pretrained"), ("scheduler", "foo"),
                                       ("text_encoder", "attn_implementation")])
def test_ldm_architecture_fields_outside_the_allow_list(part, key):
    ldm = yaml.safe_load((ROOT / "conf" / "toy_base.yaml").read_text())["model"]["ldm"]  # architecture dicts
    cfg = LDMConfig(**dict(ldm, **{part: {**ldm[part], key: "x"}}))
    with pytest.raises(ConfigError, match=rf"^model\.ldm\.{part}\.{key}: not an allowed field$"):
        FrozenLDM.from_config(cfg)


@pytest.mark.parametrize("conf", ["default.yaml", "sd15.yaml", "toy_base.yaml"])
def test_shipped_configs_are_inside_the_allow_lists(conf):
    m = yaml.safe_load((ROOT / "conf" / conf).read_text())["model"]
    LDMConfig(**m["ldm"]).check()
    if "image_encoder" in m:
        ImageEncoderConfig(**m["image_encoder"]).check()
    tiny = yaml.safe_load((ROOT / "conf" / "metrics" / "tiny.yaml").read_text())
    for cfg in (default_config()["identity_eval"]["init_args"], tiny):
        ImageEncoderConfig(cfg["clip"]["model_name"], cfg["clip"]["pretrained"], cfg["clip"]["overrides"]).check("clip")
        DinoBackboneConfig(**cfg["dino"]).check("dino")


# --- stored hyper-parameters: one line, not a traceback --------------------------------------------------------

def _raw_export(path, state, meta):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("meta, reason", [
    ("{not json", f"'{CONFIG_KEY}' metadata is not JSON"),
    ("[1, 2]", f"'{CONFIG_KEY}' metadata is not a mapping"),
    (json.dumps({"image_encoder": {}}), f"'{CONFIG_KEY}' metadata has no 'ldm'"),
    (json.dumps({"ldm": {}}), f"'{CONFIG_KEY}' metadata has no 'image_encoder'"),
    (json.dumps({"ldm": [], "image_encoder": {}}), "model.ldm: must be a mapping, got list"),
    (json.dumps({"ldm": {"unet2": {}}, "image_encoder": {}}), "model.ldm.unet2: not an allowed field"),
    (json.dumps({"ldm": {}, "image_encoder": {}, "sampling": {"stepz": 3}}), "model.sampling.stepz: not an allowed field"),
])
def test_broken_export_metadata_is_one_line(tmp_path, state, photo, meta, reason, capsys):
    weights = _raw_export(tmp_path / "w.safetensors", state, {CONFIG_KEY: meta})
    msg = one_line_error(capsys, generate_args(weights, photo, tmp_path / "out"))
    assert msg == f"ib: error: --weights {weights}: {reason}"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, reason", [
    ({"format_version": "3"}, "format version '3'; this ib reads 2"),
    ({"base_model": "{not json"}, "'base_model' metadata is not JSON"),
    ({"base_model": json.dumps({"unet2": {}})}, "model.ldm.unet2: not an allowed field"),
    ({"image_encoder": None}, "has no 'image_encoder' metadata"),
    ({"sampling": json.dumps({"stepz": 3})}, "model.sampling.stepz: not an allowed field"),
])
def test_broken_format_2_metadata_is_one_line(tmp_path, tiny, state, photo, change, reason, capsys):
    meta = {k: v for k, v in dict(export_metadata(tiny), **change).items() if v is not None}
    weights = _raw_export(tmp_path / "w.safetensors", tiny.to_diffusers_names(state), meta)
    msg = one_line_error(capsys, generate_args(weights, photo, tmp_path / "out"))
    assert msg == f"ib: error: --weights {weights}: {reason}"
    assert not (tmp_path / "out").exists()


def test_checkpoint_hyper_parameters_without_ldm(tmp_path, state, capsys):
    ckpt = tmp_path / "x.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "hyper_parameters": {"image_encoder": {}}}, ckpt)
    msg = one_line_error(capsys, ["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "o.safetensors")])
    assert msg == f"ib: error: --ckpt {ckpt}: 'hyper_parameters' has no 'ldm'"


# --- non-finite weights ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", [1, 2])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_generate_refuses_non_finite_weights(tmp_path, tiny, state, photo, bad, fmt, capsys):
    key = sorted(state)[0]
    poisoned = dict(state, **{key: state[key].clone().fill_(bad)})
    weights = stored(fmt, tiny, poisoned, tiny_hparams(), tmp_path / "nan.safetensors")
    stored_key = key if fmt == 1 else next(iter(tiny.to_diffusers_names({key: None})))  # as named in the file
    msg = one_line_error(capsys, generate_args(weights, photo, tmp_path / "out"))
    assert msg == f"ib: error: --weights {weights}: non-finite values in {stored_key}"
    assert not (tmp_path / "out").exists()


def test_export_refuses_non_finite_checkpoint_and_fp16_overflow(tmp_path, tiny, state, capsys):
    key = sorted(state)[-1]
    ckpt = tmp_path / "x.ckpt"
    poisoned = dict(state, **{key: state[key].clone().fill_(float("nan"))})
    torch.save({"state_dict": {f"model.{k}": v for k, v in poisoned.items()}, "hyper_parameters": tiny_hparams()}, ckpt)
    out = tmp_path / "o.safetensors"
    assert one_line_error(capsys, ["export", "--ckpt", str(ckpt), "--out", str(out)]) == \
        f"ib: error: --ckpt {ckpt}: non-finite values in {key}"
    assert not out.exists()

    big = dict(state, **{key: state[key].clone().fill_(1e6)})  # finite in fp32, inf in fp16
    torch.save({"state_dict": {f"model.{k}": v for k, v in big.items()}, "hyper_parameters": tiny_hparams()}, ckpt)
    exported_key = next(iter(tiny.to_diffusers_names({key: None})))  # named as in the file it would write
    assert one_line_error(capsys, ["export", "--ckpt", str(ckpt), "--out", str(out), "--dtype", "fp16"]) == \
        f"ib: error: --dtype fp16: {exported_key} does not fit fp16 (values overflow to inf)"
    assert not out.exists()
    assert main(["export", "--ckpt", str(ckpt), "--out", str(out), "--dtype", "bf16"]) == 0


# --- exported files -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_exported_file_gets_the_usual_mode(tmp_path, state, umask):
    old = os.umask(umask)
    try:
        out = write_weights(state, v1(tiny_hparams()), tmp_path / "e.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["e.safetensors"]
    assert read_weights(out)[0] == json.loads(json.dumps(tiny_hparams()))


def test_failed_export_leaves_nothing(tmp_path, state):
    out = tmp_path / "e.safetensors"
    shared = torch.zeros(4)
    with pytest.raises(Exception):
        write_weights({"a": shared, "b": shared}, v1(tiny_hparams()), out)  # safetensors refuses shared storage
    assert list(tmp_path.iterdir()) == []
    write_weights(state, v1(tiny_hparams()), out)
    with pytest.raises(Exception):
        write_weights({"a": shared, "b": shared}, v1(tiny_hparams()), out)
    assert [p.name for p in tmp_path.iterdir()] == ["e.safetensors"] and set(load_file(str(out))) == set(state)

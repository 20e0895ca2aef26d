"""Bad input and conflicting options of `ib fit|generate|evaluate|export`: one line naming the field or flag,
exit 2, and nothing written (no run folder, no tensorboard/ or checkpoints/, no output folder)."""
import subprocess
import sys

import pytest
import torch

from ib.cli import main
from ib.models.instantbooth import InstantBooth
from ib.weights import export_weights
from tests.conftest import ROOT, build_tiny_model, default_config, edit_config, run_config, subprocess_env
from tests.test_dreambench import write_layout

# case -> (CLI overrides, the field the message must start with). The embedded default's VAE downsamples 4x.
FIT_CASES = {
    "scheduler_beta_end_above_1": (["--model.ldm.scheduler.beta_end", "2.0"], "model.ldm.scheduler.beta_end"),
    "scheduler_beta_start_zero": (["--model.ldm.scheduler.beta_start", "0"], "model.ldm.scheduler.beta_start"),
    "scheduler_betas_swapped": (["--model.ldm.scheduler.beta_start", "0.02"], "model.ldm.scheduler.beta_start"),
    "scheduler_unknown_schedule": (["--model.ldm.scheduler.beta_schedule", "cosine"], "model.ldm.scheduler.beta_schedule"),
    "scheduler_unknown_prediction": (["--model.ldm.scheduler.prediction_type", "x0"], "model.ldm.scheduler.prediction_type"),
    "scheduler_no_timesteps": (["--model.ldm.scheduler.num_train_timesteps", "0"], "model.ldm.scheduler.num_train_timesteps"),
    "scheduler_unknown_key": (["--model.ldm.scheduler.beta_ends", "0.02"], "model.ldm.scheduler.beta_ends"),
    "scheduler_beta_not_a_number": (["--model.ldm.scheduler.beta_end", "abc"], "model.ldm.scheduler.beta_end"),
    "sampling_unknown_scheduler": (["--model.sampling.scheduler", "heun9"], "model.sampling.scheduler"),
    "sampling_height_not_a_vae_multiple": (["--model.sampling.height", "30"], "model.sampling.height"),
    "image_size_not_a_vae_multiple": (["--data.image_size", "66"], "data.image_size"),
    "bf16_frozen_parts_without_autocast": (["--model.speed.frozen_dtype", "bfloat16"], "model.speed.frozen_dtype"),
    "cuda_graphs_on_cpu": (["--trainer.accelerator", "cpu", "--model.speed.cuda_graphs_sampling", "true"],
                           "model.speed.cuda_graphs_sampling"),
    "unknown_compile_scope": (["--model.speed.compile_scope", "unet"], "model.speed.compile_scope"),
    "cpu_devices_zero": (["--trainer.accelerator", "cpu", "--trainer.devices", "0"], "trainer.devices"),
}
NO_GPU_CASES = {
    "accelerator_gpu": (["--trainer.accelerator", "gpu"], "trainer.accelerator"),
    "accelerator_cuda": (["--trainer.accelerator", "cuda"], "trainer.accelerator"),
}
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")


@pytest.fixture
def no_model_build(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the frozen model was built before the config was checked")
    monkeypatch.setattr(InstantBooth, "from_config", refuse)


def _refused_before_any_work(tmp_path, shards, overrides, field, capsys):
    config = run_config(tmp_path, shards, random_ldm=True)  # the noise schedule is the config's, not a folder's
    assert main(["fit", "--config", str(config), *overrides]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"ib: error: {field}:"), last
    assert not (tmp_path / "run").exists()  # no tensorboard/, no checkpoints/


@pytest.mark.parametrize("case", sorted(FIT_CASES))
def test_fit_refuses_before_any_work(case, tmp_path, synthetic_shards, no_model_build, capsys):
    _refused_before_any_work(tmp_path, synthetic_shards, *FIT_CASES[case], capsys)


@no_gpu
@pytest.mark.parametrize("case", sorted(NO_GPU_CASES))
def test_fit_refuses_a_gpu_accelerator_without_one(case, tmp_path, synthetic_shards, no_model_build, capsys):
    _refused_before_any_work(tmp_path, synthetic_shards, *NO_GPU_CASES[case], capsys)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_fit_refuses_more_gpus_than_the_machine_has(tmp_path, synthetic_shards, no_model_build, capsys):
    devices = str(torch.cuda.device_count() + 1)
    _refused_before_any_work(tmp_path, synthetic_shards, ["--trainer.accelerator", "gpu", "--trainer.devices", devices],
                             "trainer.devices", capsys)


def test_fit_refuses_betas_above_1_from_the_config_file(tmp_path, synthetic_shards, no_model_build, capsys):
    """Betas > 1 make every loss NaN; from a YAML file they arrive as floats."""
    config = edit_config(run_config(tmp_path, synthetic_shards, random_ldm=True), {"model.ldm.scheduler.beta_end": 1.5})
    assert main(["fit", "--config", str(config)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("ib: error: model.ldm.scheduler.beta_end:"), last
    assert not (tmp_path / "run").exists()


def test_image_size_checked_against_a_pretrained_folders_vae(tmp_path, synthetic_shards, no_model_build, capsys):
    """The VAE factor of a diffusers folder comes from its vae/config.json, read without building anything."""
    from ib.models.frozen_ldm import FrozenLDM, LDMConfig
    folder = tmp_path / "ldm"
    FrozenLDM.from_config(LDMConfig(**default_config()["model"]["ldm"])).save_pretrained(folder)
    config = run_config(tmp_path, synthetic_shards)
    args = ["fit", "--config", str(config), "--model.ldm.pretrained", str(folder), "--data.image_size"]
    assert main([*args, "66"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "ib: error: data.image_size: must be a multiple of 4 (the VAE's downsampling factor), got 66")
    (folder / "vae" / "config.json").write_text("{broken")
    assert main([*args, "64"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("ib: error: model.ldm.pretrained: cannot read") and "config.json" in last, last
    assert not (tmp_path / "run").exists()


def test_dict_fields_on_the_command_line_are_yaml_scalars(tmp_path, synthetic_shards):
    """`--model.ldm.scheduler.beta_end 0.02` is the float 0.02 (jsonargparse hands plain-dict values over as
    strings), and the model is built with it."""
    from ib.fit_cli import InstantBoothCLI
    from ib.data.datamodule import InstantBoothDataModule
    from ib.lit_module import InstantBoothModule

    cli = InstantBoothCLI(InstantBoothModule, InstantBoothDataModule, run=False,
                          args=["--config", str(run_config(tmp_path, synthetic_shards, random_ldm=True)),
                                "--model.ldm.scheduler.beta_end", "0.02", "--model.ldm.scheduler.clip_sample", "false",
                                "--model.ldm.unet.layers_per_block", "2"])
    ldm = cli.model.model.ldm
    assert ldm.noise_scheduler.config.beta_end == 0.02 and ldm.noise_scheduler.config.clip_sample is False
    assert ldm.unet.config.layers_per_block == 2


@no_gpu
@pytest.mark.slow
def test_fit_gpu_without_one_real_process(tmp_path, synthetic_shards):
    """Was a MisconfigurationException traceback with exit 1."""
    config = run_config(tmp_path, synthetic_shards)
    r = subprocess.run([sys.executable, "-m", "ib.cli", "fit", "--config", str(config), "--trainer.accelerator", "gpu"],
                       cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("ib: error: trainer.accelerator: gpu"), r.stderr[-2000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_fit_at_an_image_size_other_than_the_unet_native_size(tmp_path, synthetic_shards):
    """data.image_size 128 on the 32 px embedded UNet trains, and validation (image grid, identity metrics)
    samples at the sampler's size with the target shown at that size: it crashed in torch.stack before."""
    config = run_config(tmp_path, synthetic_shards, max_steps=2)
    assert main(["fit", "--config", str(config), "--data.image_size", "128"]) == 0
    run = tmp_path / "run"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    (grid,) = (run / "tensorboard" / "images").glob("reference_target_generated_step*.png")
    from PIL import Image
    assert Image.open(grid).size == (3 * 32 + 4 * 2, 2 * 32 + 3 * 2)  # make_grid: 3 columns, 2 rows, padding 2


# --- ib generate / ib export / ib evaluate --------------------------------------------------------------------
@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    m = default_config()["model"]
    return export_weights(build_tiny_model(), tmp_path_factory.mktemp("w") / "ib.safetensors",
                          sampling=dict(m["sampling"], steps=1))


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    from PIL import Image
    path = tmp_path_factory.mktemp("photo") / "ref.jpg"
    Image.new("RGB", (48, 48), (200, 30, 30)).save(path)
    return str(path)


def _one_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ib: error: "), err
    return err[0]


GENERATE_CASES = {  # flags -> the flag the message must start with
    "batch_size_zero": (["--batch-size", "0"], "--batch-size"),
    "batch_size_negative": (["--batch-size", "-1"], "--batch-size"),
    "height_not_a_vae_multiple": (["--height", "30"], "--height"),
    "width_zero": (["--width", "0"], "--width"),
    "steps_zero": (["--steps", "0"], "--steps"),
    "negative_guidance": (["--guidance-scale", "-1"], "--guidance-scale"),
    "unknown_scheduler": (["--scheduler", "heun9"], "--scheduler"),
    "not_an_int": (["--num-images", "two"], "--num-images"),
    "beta_above_1": (["--beta", "2"], "--beta: must be in [0, 1], got 2.0"),
    "alpha_not_a_number": (["--alpha", "strong"], "--alpha: expected float"),
}


@pytest.mark.parametrize("case", sorted(GENERATE_CASES))
def test_generate_refuses_bad_flags(case, tmp_path, weights, photo, capsys):
    flags, flag = GENERATE_CASES[case]
    out = tmp_path / "out"
    msg = _one_line(capsys, ["generate", "--weights", str(weights), "--ref", photo, "--prompt", "a sks dog",
                             "--out", str(out), *flags])
    assert msg.startswith(f"ib: error: {flag}"), msg
    assert not out.exists()


def test_generate_missing_flag_is_one_line(tmp_path, photo, capsys):
    msg = _one_line(capsys, ["generate", "--ref", photo, "--prompt", "a sks dog", "--out", str(tmp_path / "o")])
    assert "--weights" in msg


def test_generate_out_under_a_file_refused_before_sampling(tmp_path, weights, photo, capsys, monkeypatch):
    """Was a NotADirectoryError raised after every image had been sampled."""
    import ib.generate
    monkeypatch.setattr(ib.generate, "load_pipeline", lambda *a: pytest.fail("the model was loaded"))
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        msg = _one_line(capsys, ["generate", "--weights", str(weights), "--ref", photo, "--prompt", "a sks dog",
                                 "--out", str(out)])
        assert msg.startswith("ib: error: --out:") and str(tmp_path / "file") in msg, msg
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("flags", [["--device", "gpu"], ["--device", "cuda:99"], ["--speed", "graphs", "--device", "cpu"]])
def test_generate_device_refused_before_the_model_loads(flags, tmp_path, weights, photo, capsys, monkeypatch):
    import ib.generate
    monkeypatch.setattr(ib.generate, "load_pipeline", lambda *a: pytest.fail("the model was loaded"))
    msg = _one_line(capsys, ["generate", "--weights", str(weights), "--ref", photo, "--prompt", "a sks dog",
                             "--out", str(tmp_path / "o"), *flags])
    assert msg.startswith(f"ib: error: {flags[0]}"), msg
    assert not (tmp_path / "o").exists()


def test_generate_negative_seed_and_odd_batch(tmp_path, weights, photo):
    """Negative seeds are valid generator seeds; a last batch smaller than --batch-size is fine."""
    out = tmp_path / "out"
    assert main(["generate", "--weights", str(weights), "--ref", photo, "--prompt", "a sks dog", "--out", str(out),
                 "--seed", "-2", "--num-images", "3", "--batch-size", "2", "--height", "32", "--width", "48"]) == 0
    from PIL import Image
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 3 and Image.open(pngs[0]).size == (48, 32)


def test_export_out_under_a_file(tmp_path, weights, capsys):
    (tmp_path / "file").write_text("x")
    msg = _one_line(capsys, ["export", "--ckpt", str(weights), "--out", str(tmp_path / "file" / "w.safetensors")])
    assert msg.startswith("ib: error: --out:") and str(tmp_path / "file") in msg, msg
    assert "--dtype" in _one_line(capsys, ["export", "--ckpt", str(weights), "--out", str(tmp_path / "w.safetensors"),
                                           "--dtype", "int8"])


def test_evaluate_out_is_a_file(tmp_path, weights, capsys):
    """Was a FileExistsError traceback after the model and the metric backbones were built."""
    data = write_layout(tmp_path / "bench")
    (tmp_path / "file").write_text("x")
    backbones = str(ROOT / "conf" / "metrics" / "tiny.yaml")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        msg = _one_line(capsys, ["evaluate", "--weights", str(weights), "--data", str(data), "--out", str(out),
                                 "--backbones", backbones, "--steps", "1"])
        assert msg.startswith("ib: error: --out:") and str(tmp_path / "file") in msg, msg
    for flags, flag in ((["--scheduler", "heun9"], "--scheduler"), (["--beta", "2"], "--beta"),
                        (["--guidance-scale", "-1"], "--guidance-scale")):
        msg = _one_line(capsys, ["evaluate", "--weights", str(weights), "--data", str(data), "--out",
                                 str(tmp_path / "o"), "--backbones", backbones, *flags])
        assert msg.startswith(f"ib: error: {flag}"), msg
    assert not (tmp_path / "o").exists()


# --- the command list ------------------------------------------------------------------------------------------

def _commands_listed(text: str) -> list[str]:
    return [line.split()[0] for line in text.split("commands:", 1)[1].splitlines() if line.strip()]


def test_help_and_no_command_list_every_command(capsys):
    from ib.cli import COMMANDS, FIT_COMMANDS

    every = [*FIT_COMMANDS, *COMMANDS]
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert _commands_listed(out) == every
    assert main([]) == 2  # no command: the same list, on stderr
    assert _commands_listed(capsys.readouterr().err) == every


@pytest.mark.parametrize("command", ["bogus", "test", "predict"])
def test_unknown_command_is_one_line_naming_the_commands(capsys, command):
    assert main([command, "--config", "conf/default.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ib: error: unknown command '{command}'; commands: fit, validate, generate, export, evaluate "
                   "(ib --help)"]


def test_help_imports_no_framework():
    """`ib --help` answers from the command list alone: no torch, Lightning or diffusers import (those take
    seconds of CPU, minutes on a loaded machine)."""
    code = ("import sys; from ib.cli import main; code = main(['--help']); "
            "print(code, sorted(m for m in ('torch', 'lightning', 'diffusers', 'open_clip') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip().splitlines()[-1] == "0 []", r.stdout + r.stderr

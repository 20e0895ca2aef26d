"""Bad input is refused before any work: one line naming the field or file, exit 2, no run folder, and the
frozen model is never built."""
import subprocess
import sys

import pytest
import yaml

from ib.cli import main
from ib.models.instantbooth import InstantBooth
from tests.conftest import ROOT, run_config, subprocess_env

# case -> (CLI overrides, the field the message must name)
CASES = {
    "missing_model_folder": (["--model.ldm.pretrained", "{tmp}/no_such_model"], "model.ldm.pretrained"),
    "missing_clip_file": (["--model.image_encoder.pretrained", "{tmp}/clip.pt"], "model.image_encoder.pretrained"),
    "missing_train_shards": (["--data.train_shards", "{tmp}/no_shards"], "data.train_shards"),
    "missing_val_shards": (["--data.val_shards", "{tmp}/no_val/*.tar"], "data.val_shards"),
    "alpha_out_of_range": (["--model.sampling.alpha", "1.5"], "model.sampling.alpha"),
    "beta_out_of_range": (["--model.sampling.beta", "-0.1"], "model.sampling.beta"),
    "beta_train_zero": (["--model.beta_train", "0"], "model.beta_train"),
    "lr_heads_typo": (["--model.optim.lr_heads", "1e4"], "model.optim.lr_heads"),
    "lr_adapters_zero": (["--model.optim.lr_adapters", "0"], "model.optim.lr_adapters"),
    "lr_not_a_number": (["--model.optim.lr_heads", "fast"], "model.optim.lr_heads"),
    "batch_size_zero": (["--data.batch_size", "0"], "data.batch_size"),
    "max_nonfinite_zero": (["--model.max_nonfinite_steps", "0"], "model.max_nonfinite_steps"),
    "unknown_cli_key": (["--model.no_such_key", "1"], "no_such_key"),
    # Ranges declared on the fields of the nested configs and of the callback (ib/ranges.py).
    "cond_dropout_one": (["--model.cond_dropout", "1.0"], "model.cond_dropout"),
    "warmup_negative": (["--model.optim.warmup_steps", "-1"], "model.optim.warmup_steps"),
    "sampling_steps_zero": (["--model.sampling.steps", "0"], "model.sampling.steps"),
    "augment_hflip_above_1": (["--data.augment.hflip", "1.5"], "data.augment.hflip"),
    "augment_fill_above_255": (["--data.augment.fill", "300"], "data.augment.fill"),
    "loader_prefetch_zero": (["--data.loader.prefetch_factor", "0"], "data.loader.prefetch_factor"),
    "val_batches_zero": (["--data.val_batches", "0"], "data.val_batches"),
    "identity_eval_concepts_zero": (["--identity_eval.concepts", "0"], "identity_eval.concepts"),
    "adapter_blocks_misspelt": (["--model.adapter_blocks", "[midblock]"], "model.adapter_blocks"),
    "adapter_gate_init_saturated": (["--model.adapter_gate_init", "4"], "model.adapter_gate_init"),
    "snr_gamma_zero": (["--model.snr_gamma", "0"], "model.snr_gamma"),
}


@pytest.fixture
def no_model_build(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the frozen model was built before the config was checked")
    monkeypatch.setattr(InstantBooth, "from_config", refuse)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_value_refused_before_any_work(case, tmp_path, synthetic_shards, no_model_build, capsys):
    config = run_config(tmp_path, synthetic_shards)
    overrides, field = CASES[case]
    assert main(["fit", "--config", str(config), *[o.format(tmp=tmp_path) for o in overrides]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ib: error:") and field in err[-1], err[-5:]
    assert not (tmp_path / "run").exists()


def test_a_value_of_the_wrong_type_is_one_line_naming_the_field(tmp_path, synthetic_shards, no_model_build, capsys):
    """jsonargparse's report spans lines; nested configs are plain dataclass fields, so it names the full key."""
    config = run_config(tmp_path, synthetic_shards)
    assert main(["fit", "--config", str(config), "--model.sampling.steps", "many"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ib: error:") and '"model.sampling.steps"' in err[-1] and "many" in err[-1], err[-3:]


def test_unknown_key_in_config_file(tmp_path, synthetic_shards, no_model_build, capsys):
    config = run_config(tmp_path, synthetic_shards)
    cfg = yaml.safe_load(config.read_text())
    cfg["model"]["optim"]["lr_head"] = 1e-4  # typo of lr_heads
    config.write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--config", str(config)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("ib: error:") and "lr_head" in last, last
    assert not (tmp_path / "run").exists()


def test_unreadable_or_absent_config_file(tmp_path, capsys):
    unreadable = tmp_path / "unreadable.yaml"
    unreadable.write_text("model: [unclosed")
    for path in (unreadable, tmp_path / "absent.yaml"):
        assert main(["fit", "--config", str(path)]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("ib: error: --config:") and path.name in last, last


@pytest.mark.slow
def test_real_process_exit_code_and_single_line(tmp_path, synthetic_shards):
    config = run_config(tmp_path, synthetic_shards)
    r = subprocess.run([sys.executable, "-m", "ib.cli", "fit", "--config", str(config), "--model.optim.lr_heads", "5"],
                       cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == "ib: error: model.optim.lr_heads: must be in (0, 1], got 5.0"
    assert not (tmp_path / "run").exists()

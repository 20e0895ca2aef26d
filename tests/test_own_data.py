"""README "Train on your own data", step by step at tiny scale: captioned photos -> build_shards -> the
`make train RUN=... DATA=...` command -> a run folder with TensorBoard events and last.ckpt, nothing elsewhere."""
import shlex
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from data_tools.build_shards import main as build_shards
from tests.conftest import ROOT, subprocess_env
from tests.test_masks import object_photo

# Tiny scale: the test's only additions to the README's commands.
TINY = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
        "--data.batch_size", "2", "--data.batches_per_epoch", "2", "--data.val_batches", "1",
        "--data.loader.num_workers", "0", "--model.sampling.steps", "2", "--checkpoint.every_n_train_steps", "2",
        "--trainer.enable_progress_bar", "false"]


def photos(folder, n: int, seed: int):
    """n photos of an object with a caption naming its class, as a user's folder would hold them."""
    folder.mkdir(parents=True)
    for i in range(n):
        image, _ = object_photo(size=256, seed=seed + i)  # build_shards keeps photos of >= 256 px
        Image.fromarray(image).save(folder / f"toy{i}.jpg")
        (folder / f"toy{i}.txt").write_text("a photo of a toy on a table")


def make_train_command(run, data) -> list[str]:
    """The `ib fit` command `make train RUN=run DATA=data ARGS=...` runs (make -n prints it)."""
    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    out = subprocess.run(["make", "-n", "--no-print-directory", "train", f"RUN={run}", f"DATA={data}",
                          f"ARGS={shlex.join(TINY)}"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    line = next(l for l in out.replace("\\\n", " ").splitlines() if "/ib fit " in l)
    argv = shlex.split(line)
    assert argv[0] == ".venv/bin/ib"
    return [sys.executable, "-m", "ib.cli", *argv[1:]]


def test_readme_own_data_steps(tmp_path):
    photos(tmp_path / "my_photos", 6, seed=0)
    photos(tmp_path / "my_val", 3, seed=100)
    data, run = tmp_path / "data" / "mine", tmp_path / "runs" / "mine"
    for src, split in (("my_photos", "train"), ("my_val", "val")):
        # `python -m data_tools.build_shards ...`, here in this process (its entry point: test_build_shards.py)
        assert build_shards(["--input", str(tmp_path / src), "--output", str(data / split), "--classes", "toy",
                             "--workers", "1"]) == 0
    default_run = ROOT / "runs" / "default"
    before = sorted(default_run.rglob("*")) if default_run.exists() else None

    result = subprocess.run(make_train_command(run, data), cwd=ROOT, env=subprocess_env(OMP_NUM_THREADS="1"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "config.yaml").is_file()
    after = sorted(default_run.rglob("*")) if default_run.exists() else None
    assert after == before  # nothing written to the config's own run folder

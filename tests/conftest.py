"""Shared fixtures: the embedded default config shrunk for tests, synthetic shards in a temp dir."""
import copy
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# Test runs share small machines: one compute thread per process unless the caller chose (ib/threads.py);
# `ib fit` subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import lightning.pytorch  # noqa: E402,F401  (its log handlers bind to stderr now, not to one test's capsys stream)
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "conf" / "default.yaml"


def default_config() -> dict:
    return yaml.safe_load(DEFAULT_CONFIG.read_text())


def build_tiny_model(**kwargs):
    """The embedded default InstantBooth (tiny random parts), built through the same config code."""
    from ib.models.frozen_ldm import LDMConfig
    from ib.models.image_encoder import ImageEncoderConfig
    from ib.models.instantbooth import InstantBooth

    m = default_config()["model"]
    torch.manual_seed(0)
    return InstantBooth.from_config(LDMConfig(**m["ldm"]), ImageEncoderConfig(**m["image_encoder"]), **kwargs)


def build_family_model(overlay: Path, seed: int = 0):
    """The tiny model of a family (conf/tiny_sd21.yaml, conf/tiny_sdxl.yaml): its frozen parts, the default's image
    encoder."""
    from ib.models.frozen_ldm import LDMConfig
    from ib.models.image_encoder import ImageEncoderConfig
    from ib.models.instantbooth import InstantBooth

    ldm = yaml.safe_load(overlay.read_text())["model"]["ldm"]
    torch.manual_seed(seed)
    return InstantBooth.from_config(LDMConfig(**ldm), ImageEncoderConfig(**default_config()["model"]["image_encoder"]))


@pytest.fixture(scope="session")
def photo_refs() -> list[torch.Tensor]:
    """Two uint8 reference photos of another size than the encoder's."""
    g = torch.Generator().manual_seed(1)
    return [(torch.rand(3, 40, 30, generator=g) * 255).byte() for _ in range(2)]


@pytest.fixture
def tiny_model():
    return build_tiny_model()


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> Path:
    """A small synthetic world written as real WebDataset shards: 6 train + 3 val concepts."""
    from data_tools.synthetic_world import build

    out = tmp_path_factory.mktemp("world") / "synthetic"
    build(out, concepts=6, val_concepts=3, images_per_concept=4, size=64, shard_size=8, seed=0)
    return out


def random_parts() -> dict:
    """`model.ldm` with the toy base's architecture (conf/toy_base.yaml) and random weights: what the config
    checks of the frozen parts' own fields (the noise schedule, the allow-lists) act on."""
    return yaml.safe_load((ROOT / "conf" / "toy_base.yaml").read_text())["model"]["ldm"]


def wider_parts(width: int = 48) -> dict:
    """random_parts() of another, consistent architecture: text states and cross-attention `width` wide."""
    ldm = random_parts()
    return dict(ldm, unet=dict(ldm["unet"], cross_attention_dim=width),
                text_encoder=dict(ldm["text_encoder"], hidden_size=width))


def run_config(tmp_path: Path, shards: Path, random_ldm: bool = False, **trainer_overrides) -> Path:
    """conf/default.yaml with every path pointed into tmp_path and a few-step trainer; returns its path.
    random_ldm: the frozen base built from random_parts() instead of loaded from assets/toy-base."""
    cfg = copy.deepcopy(default_config())
    if random_ldm:
        cfg["model"]["ldm"] = random_parts()
    run = tmp_path / "run"
    t = cfg["trainer"]
    # The run folder names the logger's and the checkpoints' folders too (ib/run_cli.py).
    t.update(default_root_dir=str(run), max_steps=4, val_check_interval=2, limit_val_batches=1)
    cfg["checkpoint"]["every_n_train_steps"] = 2
    t.update(trainer_overrides)
    cfg["model"]["sampling"]["steps"] = 2
    cfg["data"].update(train_shards=str(shards / "train"), val_shards=str(shards / "val"), batch_size=2,
                       batches_per_epoch=3, val_batches=1)
    cfg["data"]["loader"]["num_workers"] = 0
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def edit_config(path: Path, fields: dict | None = None, callbacks: list[dict] = (), checkpoint: dict | None = None,
                out: Path | None = None) -> Path:
    """A copy of config `path` (written to `out`, default: in place) with dotted `fields` set
    ("model.optim.lr_heads": 5), extra trainer `callbacks` ({"class_path": ..., "init_args": ...}, after the
    config's own and the shared ones) and RunCheckpoint's `checkpoint` arguments updated."""
    cfg = yaml.safe_load(path.read_text())
    for key, value in (fields or {}).items():
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    if callbacks:
        cfg["trainer"]["callbacks+"] = cfg["trainer"].get("callbacks+", []) + list(callbacks)
    if checkpoint:
        cfg.setdefault("checkpoint", {}).update(checkpoint)
    out = out or path
    out.write_text(yaml.safe_dump(cfg))
    return out


def start_fit(args: list[str], env: dict | None = None) -> subprocess.Popen:
    """`python -m ib.cli fit ARGS` in a new process group (a test can signal every rank at once); stderr piped.
    `env`: extra environment variables."""
    return subprocess.Popen([sys.executable, "-m", "ib.cli", "fit", *args], cwd=ROOT, env=subprocess_env(**(env or {})),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_step(proc: subprocess.Popen, marker: Path, step: int, timeout: float) -> None:
    """Until tests.helpers.StepMarker's file says `step` or later; fails with the stderr if the run ends first."""
    deadline = time.monotonic() + timeout
    while not (marker.exists() and int(marker.read_text()) >= step):
        assert proc.poll() is None, proc.stderr.read()[-4000:]
        assert time.monotonic() < deadline, f"training did not reach step {step} in {timeout:.0f} s"
        time.sleep(0.2)


def subprocess_env(**extra: str) -> dict:
    """Environment for `python -m ib.cli` subprocesses: this checkout's code, offline, plus `extra`."""
    return dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                NO_ALBUMENTATIONS_UPDATE="1", PYTHONUNBUFFERED="1", **extra)


@pytest.fixture(autouse=True)
def autograd_left_on():
    """A test (or code it calls in-process, e.g. a script's main) must not leave autograd off: the tests after
    it in the same process would fail far from the cause."""
    yield
    assert torch.is_grad_enabled(), "this test left torch.set_grad_enabled(False) behind"


def pytest_collection_modifyitems(items):
    """Longest first (`slow(minutes=N)`, then the other slow ones): with `--dist worksteal` (Makefile) a long
    test then starts at once, and the other process works through the rest, instead of one long test running
    alone at the end."""
    def order(item):
        slow = item.get_closest_marker("slow")
        return (slow is None, -(slow.kwargs.get("minutes", 0) if slow else 0))
    items.sort(key=order)

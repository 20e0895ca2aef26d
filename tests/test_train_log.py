"""What a real `ib fit` prints: plain progress lines into a file, a sane bar on a terminal, and no warnings or
adverts on a normal first run and its resume."""
import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading

import pytest
import yaml

from tests.conftest import ROOT, run_config, subprocess_env

pytestmark = pytest.mark.slow


def _config(tmp_path, shards, every_n_steps: int):
    config = run_config(tmp_path, shards)  # 4 steps, validation and checkpoints every 2
    cfg = yaml.safe_load(config.read_text())
    # The shared layer's callbacks (conf/trainer/default.yaml), with TrainProgress's interval changed: a run
    # config's `callbacks:` replaces that list.
    shared = yaml.safe_load((ROOT / "conf" / "trainer" / "default.yaml").read_text())["trainer"]["callbacks"]
    for cb in shared:
        if cb["class_path"].endswith("TrainProgress"):
            cb["init_args"] = {"every_n_steps": every_n_steps}
    cfg["trainer"]["callbacks"] = shared + cfg["trainer"].pop("callbacks+", [])
    config.write_text(yaml.safe_dump(cfg))
    return config


def _fit(config, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ib.cli", "fit", "--config", str(config), "--ckpt_path", "last",
                           *args], cwd=ROOT, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)


# Lines a normal run used to print: Python warnings ("file.py:123: message"), Lightning's adverts, its
# progress bar drawn into a file.
NOISE = [re.compile(p) for p in (r"\.py:\d+: ", r"Tip:", r"litlogger|litmodels", r"v_num", r"/-\d", "\r",
                                 r"Traceback")]


def _noise(text: str) -> list[str]:
    return [line for line in text.splitlines(keepends=True) if any(p.search(line) for p in NOISE)]


def test_fit_and_resume_into_a_file_print_plain_lines_and_no_warnings(tmp_path, synthetic_shards):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    config = _config(tmp_path, synthetic_shards, every_n_steps=1)
    first = _fit(config)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = _fit(config, "--trainer.max_steps", "6")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for run in (first, resumed):
        assert _noise(run.stdout + run.stderr) == []

    lines = first.stdout.splitlines()
    steps = [l for l in lines if l.startswith("step ")]
    assert [l.split()[1] for l in steps] == ["1/4", "2/4", "3/4", "4/4"]
    assert re.fullmatch(r"step 2/4 \(50%\)  epoch 0  train/loss \d\.\d+  \d+\.\d samples/s  elapsed 0:00:\d\d  "
                        r"ETA 0:00:\d\d", steps[1]), steps[1]
    validations = [l for l in lines if l.startswith("validation")]
    assert [re.match(r"validation at step (\d) \(\d+\.\d s\): .*val/loss_own \d", l)[1] for l in validations] == ["2", "4"]
    again = [l.split()[1] for l in resumed.stdout.splitlines() if l.startswith("step ")]
    assert again == ["5/6", "6/6"]
    assert "resuming at step 4" in resumed.stdout

    # TensorBoard: the runs' curves, no hp_metric=-1 placeholder per run.
    tags = set()
    for f in (tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"):
        tags |= {v.tag for event in EventFileLoader(str(f)).Load() for v in event.summary.value}
    assert "val/loss_own" in tags and "hp_metric" not in tags


def test_terminal_shows_one_bar_over_the_steps(tmp_path, synthetic_shards):
    config = _config(tmp_path, synthetic_shards, every_n_steps=1)
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "ib.cli", "fit", "--config", str(config)], cwd=ROOT,
                            env=subprocess_env(OMP_NUM_THREADS="1"), stdout=child, stderr=subprocess.PIPE)
    os.close(child)
    chunks = []

    def read():
        while True:
            try:
                data = os.read(main, 65536)
            except OSError:  # EIO: the child side is closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read)
    reader.start()
    _, err = proc.communicate(timeout=600)
    reader.join(timeout=30)
    os.close(main)
    assert proc.returncode == 0, err.decode()[-3000:]
    screen = b"".join(chunks).decode(errors="replace")
    frames = [f for f in re.split(r"[\r\n]", screen) if f.startswith("train:")]
    assert frames and all(re.search(r"\| [0-4]/4 \[", f) for f in frames), frames
    assert re.search(r"\| 4/4 \[.*epoch \d+  train/loss \d", frames[-1]), frames[-1]
    assert re.search(r"^validation at step 4 \(\d+\.\d s\): .*val/loss_own", screen, re.M)
    assert not re.search(r"^step \d", screen, re.M)  # no plain lines beside the bar
    assert _noise(screen.replace("\r", "") + err.decode()) == []

"""The DreamBench reader: the real folder, a small folder in the same layout, and its bad-input messages."""
import shutil

import numpy as np
import pytest
from PIL import Image

from ib.data.dreambench import PROMPTS_FILE, load_image, read_dreambench
from ib.data.references import prepare_references
from ib.evaluate import main as evaluate_main
from tests.conftest import ROOT

DREAMBENCH = ROOT.parent / "shared" / "dreambench"

PROMPTS = """Classes

subject_name,class
red_box,box
grey_cat,cat

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} wearing a red hat'.format(unique_token, class_token),
]
"""


def write_layout(root):
    root.mkdir()
    (root / PROMPTS_FILE).write_text(PROMPTS)
    for name, colour in (("red_box", (200, 30, 30)), ("grey_cat", (120, 120, 120))):
        (root / name).mkdir()
        for i in range(2):
            Image.new("RGB", (40, 30), colour).save(root / name / f"{i:02d}.jpg")
    (root / "red_box" / "notes.txt").write_text("not an image")
    return root


def test_reads_subjects_classes_and_prompts(tmp_path):
    bench = read_dreambench(write_layout(tmp_path / "bench"))
    assert [(s.name, s.class_noun, s.live, [p.name for p in s.images]) for s in bench.subjects] == [
        ("red_box", "box", False, ["00.jpg", "01.jpg"]), ("grey_cat", "cat", True, ["00.jpg", "01.jpg"])]
    box, cat = bench.subjects
    assert bench.prompts(box, "sks") == ["a sks box in the jungle", "a red sks box"]
    assert bench.prompts(cat, "sks") == ["a sks cat wearing a red hat"]


@pytest.mark.skipif(not DREAMBENCH.is_dir(), reason="no DreamBench folder next to the repository")
def test_reads_the_shared_dreambench():
    bench = read_dreambench(DREAMBENCH)
    assert len(bench.subjects) == 20 and len(bench.object_prompts) == len(bench.live_prompts) == 25
    by_name = {s.name: s for s in bench.subjects}
    assert by_name["bear_plushie"].class_noun == "stuffed animal" and not by_name["bear_plushie"].live
    assert by_name["dog"].live and by_name["cat"].live and not by_name["backpack_dog"].live
    assert all(4 <= len(s.images) <= 6 for s in bench.subjects)
    assert bench.prompts(by_name["dog"], "sks")[10] == "a sks dog wearing a red hat"
    assert bench.prompts(by_name["can"], "sks")[-1] == "a cube shaped sks can"


def test_references_are_whole_images_or_masked_crops(tmp_path):
    image = np.zeros((30, 40, 3), np.uint8)
    image[10:20, 5:15] = 200
    whole = prepare_references([image], size=20)
    assert whole.shape == (1, 3, 20, 20) and whole.min() == 0  # black background kept, padded to square
    crop = prepare_references([image], lambda im: im[..., 0] > 100, size=20)  # a mask function (as a backend)
    assert crop.shape == (1, 3, 20, 20) and ((crop - 200 / 255).abs() < 1e-6).all()  # just the object


def _error(argv, capsys) -> str:
    assert evaluate_main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ib: error: "), lines
    return lines[0]


def test_bad_dreambench_folders_give_one_line_errors(tmp_path, capsys):
    (tmp_path / "w.safetensors").write_bytes(b"")  # exists; the folder is checked before it is read
    args = ["--weights", str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "out"), "--data"]

    root = write_layout(tmp_path / "no_folder")
    shutil.rmtree(root / "grey_cat")
    message = _error(args + [str(root)], capsys)
    assert "subject folder missing" in message and "grey_cat" in message

    root = write_layout(tmp_path / "empty")
    for p in (root / "red_box").glob("*.jpg"):
        p.unlink()
    message = _error(args + [str(root)], capsys)
    assert "no images in" in message and "red_box" in message

    root = write_layout(tmp_path / "no_prompts")
    (root / PROMPTS_FILE).unlink()
    message = _error(args + [str(root)], capsys)
    assert message.startswith("ib: error: --data: cannot read") and PROMPTS_FILE in message

    root = write_layout(tmp_path / "binary_prompts")
    (root / PROMPTS_FILE).write_bytes(b"\xff\xfe\x00garbage")
    assert PROMPTS_FILE in _error(args + [str(root)], capsys)

    assert not (tmp_path / "out").exists()
    assert "--weights" in _error(["--data", str(tmp_path)], capsys)  # argparse errors: one line too


def test_load_image_is_rgb_uint8(tmp_path):
    Image.new("L", (5, 4), 77).save(tmp_path / "g.png")
    image = load_image(tmp_path / "g.png")
    assert image.shape == (4, 5, 3) and image.dtype == np.uint8 and (image == 77).all()

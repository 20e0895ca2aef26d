"""Image files of every bit depth and mode, read the same way by training shards, reference photos, DreamBench
and masks (ib/data/images.py): 16-bit and float pixels scaled (not clipped white), transparency flattened,
EXIF orientation applied, decompression bombs refused with a reason naming the file."""
import io
import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from ib.cli import main
from ib.data.dreambench import load_image
from ib.data.shards import BadSample, decode_sample
from ib.errors import ConfigError
from ib.data.references import prepare_references
from tests.test_generate_cli import weights  # noqa: F401 — the exported tiny model fixture

RAMP16 = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (32, 1))  # (32, 64), the full 16-bit range
RAMP8 = np.rint(RAMP16 / 257).astype(np.uint8)


def encode(image: Image.Image | np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buf, format=fmt, **kw)
    return buf.getvalue()


def cv2_encode(array: np.ndarray, ext: str) -> bytes:
    ok, data = cv2.imencode(ext, array)
    assert ok
    return data.tobytes()


def bomb_png(path):
    """A real 20000 x 20000 PNG (1-bit, 48 KB): over PIL's decompression bomb limit."""
    Image.new("1", (20000, 20000)).save(path)
    return path


def sample(image: bytes, mask: bytes | None = None) -> dict:
    shape = Image.open(io.BytesIO(image)).size[::-1]
    return {"__key__": "k", "jpg": image, "png": mask or encode(np.full(shape, 255, np.uint8), "PNG"),
            "txt": b"a sks dog", "json": json.dumps({"class": "dog"}).encode()}


def rgba() -> np.ndarray:
    """Black RGB, fully transparent on the right half: read as white there."""
    array = np.zeros((32, 64, 4), np.uint8)
    array[..., :3] = 40
    array[:, :32, 3] = 255
    return array


WHITE_RIGHT = np.where(np.arange(64)[None, :, None] < 32, 40, 255).repeat(32, 0).repeat(3, 2).astype(np.uint8)


def palette_with_transparency() -> bytes:
    im = Image.fromarray(np.where(np.arange(64)[None, :] < 32, 0, 1).repeat(32, 0).astype(np.uint8), "P")
    im.putpalette([40, 40, 40, 0, 0, 0])
    return encode(im, "PNG", transparency=1)


GREY_CASES = {  # name: (encoded bytes, expected (H, W, 3) uint8)
    "I;16 png": (lambda: encode(RAMP16, "PNG"), RAMP8),
    "I;16 tiff": (lambda: encode(RAMP16, "TIFF"), RAMP8),
    "I;16B tiff": (lambda: encode(RAMP16.astype(">u2"), "TIFF"), RAMP8),
    "I 32-bit tiff": (lambda: encode(RAMP16.astype(np.int32), "TIFF"), RAMP8),
    "I 16-bit pgm": (lambda: cv2_encode(RAMP16, ".pgm"), RAMP8),
    "F tiff": (lambda: encode(RAMP16.astype(np.float32) / 65535, "TIFF"), RAMP8),
    "RGB 16-bit png": (lambda: cv2_encode(np.dstack([RAMP16] * 3), ".png"), RAMP8),
    "RGBA png": (lambda: encode(rgba(), "PNG"), WHITE_RIGHT),
    "RGBA 16-bit png": (lambda: cv2_encode(rgba().astype(np.uint16) * 257, ".png"), WHITE_RIGHT),
    "LA png": (lambda: encode(Image.fromarray(rgba()).convert("LA"), "PNG"), WHITE_RIGHT),
    "P png with a transparent colour": (palette_with_transparency, WHITE_RIGHT),
}


@pytest.mark.parametrize("name", GREY_CASES)
def test_high_bit_depth_and_transparent_images_in_shards_and_dreambench(name, tmp_path):
    make, expected = GREY_CASES[name]
    data = make()
    if expected.ndim == 2:
        expected = np.repeat(expected[..., None], 3, axis=2)
    image = decode_sample(sample(data))["image"]
    assert image.dtype == np.uint8 and image.shape == expected.shape
    assert np.abs(image.astype(int) - expected).max() <= 1, (name, image.mean(), expected.mean())
    path = tmp_path / "photo.img"
    path.write_bytes(data)
    assert np.array_equal(load_image(path), image)


def test_cmyk_and_exif_orientation(tmp_path):
    cmyk = Image.new("CMYK", (40, 20), (0, 255, 255, 0))  # red
    red = decode_sample(sample(encode(cmyk, "JPEG", quality=95)))["image"]
    assert red.shape == (20, 40, 3) and (np.abs(red.astype(int) - (255, 0, 0)) <= 3).all()

    array = np.zeros((20, 40, 3), np.uint8)
    array[:, :20] = 255  # white on the left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: white on top
    data = encode(array, "JPEG", quality=95, exif=exif)
    shown = decode_sample(sample(data, encode(np.full((40, 20), 255, np.uint8), "PNG")))["image"]
    assert shown.shape == (40, 20, 3) and shown[:18].min() > 200 and shown[22:].max() < 50
    (tmp_path / "phone.jpg").write_bytes(data)
    assert np.array_equal(load_image(tmp_path / "phone.jpg"), shown)


@pytest.mark.parametrize("array, reason", [
    (np.full((8, 8), 2.0, np.float32), "float pixels outside 0..1"),
    (np.full((8, 8), np.nan, np.float32), "float pixels outside 0..1"),
    (np.full((8, 8), -5, np.int32), "32-bit integer pixels outside the 16-bit range"),
    (np.full((8, 8), 70000, np.int32), "32-bit integer pixels outside the 16-bit range"),
])
def test_pixels_without_a_known_range_are_refused_with_a_reason(array, reason, tmp_path):
    data = encode(array, "TIFF")
    with pytest.raises(BadSample, match=f"k: cannot decode: {reason}"):
        decode_sample(sample(data))
    (tmp_path / "odd.tif").write_bytes(data)
    with pytest.raises(ConfigError, match=f"--data: cannot read image {tmp_path / 'odd.tif'}: {reason}"):
        load_image(tmp_path / "odd.tif")


def test_16bit_reference_and_mask_read_like_their_8bit_versions(tmp_path):
    rng = np.random.default_rng(0)
    photo16 = rng.integers(0, 65536, (40, 30), dtype=np.uint16)
    mask16 = np.zeros((40, 30), np.uint16)
    mask16[5:35, 5:25] = 40000  # over half the full range: object
    mask16[0:5] = 32767         # under half: background
    Image.fromarray(photo16).save(tmp_path / "ref16.png")
    Image.fromarray(mask16).save(tmp_path / "mask16.png")
    Image.fromarray(np.rint(photo16 / 257).astype(np.uint8)).save(tmp_path / "ref8.png")
    Image.fromarray(np.where(mask16 >= 32768, 255, 0).astype(np.uint8)).save(tmp_path / "mask8.png")
    refs16 = prepare_references([str(tmp_path / "ref16.png")], [str(tmp_path / "mask16.png")], size=16)
    refs8 = prepare_references([str(tmp_path / "ref8.png")], [str(tmp_path / "mask8.png")], size=16)
    assert refs16.shape == (1, 3, 16, 16) and torch.equal(refs16, refs8)
    assert refs16.mean() < 0.9  # not the white a clipped 16-bit photo gives


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    return bomb_png(tmp_path_factory.mktemp("bomb") / "huge.png")


def test_decompression_bomb_is_a_bad_sample_or_a_config_error(bomb):
    with pytest.raises(BadSample, match="k: cannot decode: too many pixels to decode safely: Image size "
                                        r"\(400000000 pixels\)"):
        decode_sample({**sample(encode(np.zeros((4, 4), np.uint8), "PNG")), "jpg": bomb.read_bytes()})
    with pytest.raises(ConfigError, match=f"--ref: cannot read image {bomb}: too many pixels"):
        prepare_references([str(bomb)], None, size=16, field="--ref")
    with pytest.raises(ConfigError, match=f"--data: cannot read image {bomb}: too many pixels"):
        load_image(bomb)


def test_generate_refuses_a_huge_reference_with_one_line_and_writes_nothing(bomb, weights, tmp_path,  # noqa: F811
                                                                            capsys):
    out = tmp_path / "out"
    rc = main(["generate", "--weights", str(weights), "--ref", str(bomb), "--prompt", "a sks dog", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"ib: error: --ref: cannot read image {bomb}: too many pixels"), err
    assert not out.exists()

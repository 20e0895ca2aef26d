"""Mask backends (ib/data/masks.py): GrabCut with no weights, the registry, provided masks, a model backend."""
import io

import cv2
import numpy as np
import pytest
from PIL import Image

from ib.data.masks import (GrabCut, MaskError, get_mask_backend, load_mask, mask_backend_names, mask_bbox,
                           split_objects)


def object_photo(size: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A red disc on a noisy green-grey background, and its true mask."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    truth = np.hypot(x - size * 0.55, y - size * 0.5) < size * 0.27
    bg = np.clip(rng.normal((90, 120, 90), 12, (size, size, 3)), 0, 255)
    fg = np.clip(rng.normal((200, 40, 40), 12, (size, size, 3)), 0, 255)
    return np.where(truth[..., None], fg, bg).astype(np.uint8), truth


def center_square(**options):
    """A model backend stand-in, plugged in by import path (`tests.test_masks:center_square`)."""
    def backend(image, box=None, prompt=None):
        h, w = image.shape[:2]
        mask = np.zeros((h, w), bool)
        mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = True
        return mask
    return backend


def test_grabcut_finds_the_object_without_weights():
    image, truth = object_photo()
    for backend in (get_mask_backend("grabcut"), GrabCut(work_size=48)):  # at full size and downscaled
        mask = backend(image)
        assert mask.shape == truth.shape and mask.dtype == bool
        assert (mask & truth).sum() / (mask | truth).sum() > 0.85
    box = mask_bbox(truth)
    assert (GrabCut()(image, box=box) & truth).sum() / truth.sum() > 0.9


def test_registry_names_and_import_paths():
    assert {"grabcut", "clipseg"} <= set(mask_backend_names())
    with pytest.raises(MaskError, match="unknown mask backend 'sam'.*grabcut"):
        get_mask_backend("sam")
    with pytest.raises(MaskError, match="cannot import"):
        get_mask_backend("no_such_module:factory")
    mask = get_mask_backend("tests.test_masks:center_square")(np.zeros((8, 8, 3), np.uint8))
    assert mask.sum() == 16


def test_model_backend_without_weights_is_a_clear_error_not_a_crash():
    with pytest.raises(MaskError, match="needs a model"):
        get_mask_backend("clipseg")


def test_provided_masks_are_checked():
    png = io.BytesIO()
    Image.fromarray(np.full((10, 20), 255, np.uint8)).save(png, format="PNG")
    assert load_mask(png.getvalue(), (10, 20)).all()
    with pytest.raises(MaskError, match=r"does not match image \(20, 10\)"):
        load_mask(png.getvalue(), (20, 10))
    with pytest.raises(MaskError, match="cannot decode"):
        load_mask(b"garbage", (10, 20))


def test_split_objects_erases_specks_and_counts_objects():
    mask = np.zeros((100, 100), bool)
    mask[10:40, 10:40] = True      # 9 % of the frame
    mask[90:92, 90:92] = True      # a speck
    cleaned, n = split_objects(mask, min_fraction=0.02)
    assert n == 1 and cleaned.sum() == 900
    mask[60:80, 60:80] = True      # a second object, 4 %
    assert split_objects(mask, 0.02)[1] == 2


@pytest.mark.slow
def test_clipseg_backend_loads_a_checkpoint_folder(tmp_path):
    """A tiny random CLIPSeg saved to disk and loaded through the backend's own loading code."""
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, ViTImageProcessor

    from ib.models.tokenizer import offline_clip_tokenizer

    cfg = CLIPSegConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16, extract_layers=[0, 1, 2], reduce_dim=16, decoder_intermediate_size=32)
    CLIPSegForImageSegmentation(cfg).save_pretrained(tmp_path)
    CLIPSegProcessor(image_processor=ViTImageProcessor(size={"height": 32, "width": 32}),
                     tokenizer=offline_clip_tokenizer()).save_pretrained(tmp_path)
    backend = get_mask_backend("clipseg", model=str(tmp_path), threshold=0.5)
    image, _ = object_photo(size=50)
    mask = backend(image[:, :40], prompt="ball")
    assert mask.shape == (50, 40) and mask.dtype == bool
    with pytest.raises(MaskError, match="needs a prompt"):
        backend(image)
    with pytest.raises(MaskError, match="cannot load"):
        get_mask_backend("clipseg", model=str(tmp_path / "absent"))


def test_16bit_mask_is_object_from_half_the_full_range():
    """A 16-bit mask (cv2.imwrite of uint16, PIL's I;16): at least 32768 = object, as >127 is for 8 bits."""
    values = np.tile(np.arange(0, 65536, 64, dtype=np.uint16), (4, 1))  # (4, 1024): each value band equally
    ok, png = cv2.imencode(".png", values)
    mask = load_mask(png.tobytes(), values.shape)
    assert mask.mean() == 0.5 and np.array_equal(mask, values >= 32768)
    ok, png = cv2.imencode(".png", np.where(values >= 32768, 65535, 0).astype(np.uint16))
    assert np.array_equal(load_mask(png.tobytes(), values.shape), mask)

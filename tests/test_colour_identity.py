"""The colour identity metric of the embedded default and the toy experiment, on drawn images."""
import torch

from ib.lit_module import other_concept
from ib.metrics.colour_identity import ColourIdentity, colour_identity, foreground_pixels


def _scene(background, obj, size=32):
    image = torch.empty(3, size, size, dtype=torch.uint8)
    image[:] = torch.tensor(background, dtype=torch.uint8)[:, None, None]
    image[:, 8:24, 8:24] = torch.tensor(obj, dtype=torch.uint8)[:, None, None]
    return image


RED, BLUE, SAND = (220, 40, 40), (40, 70, 220), (225, 200, 150)


def test_foreground_is_what_differs_from_the_border():
    image = _scene(SAND, RED)
    fg = foreground_pixels(image, threshold=60.0)
    assert len(fg) == 16 * 16 and (fg == torch.tensor(RED, dtype=torch.uint8)).all()


def test_same_colours_score_one_other_colours_zero_no_object_zero():
    red_pixels = torch.tensor([RED] * 10, dtype=torch.uint8)
    assert colour_identity(_scene(SAND, RED), red_pixels) == 1.0
    assert colour_identity(_scene(SAND, BLUE), red_pixels) == 0.0
    assert colour_identity(_scene(SAND, SAND), red_pixels) == 0.0
    half = torch.tensor([RED] * 5 + [BLUE] * 5, dtype=torch.uint8)
    assert colour_identity(_scene(SAND, RED).float() / 255, half) == 0.5  # float images in [0, 1] too


def test_metric_is_the_mean_over_images():
    metric = ColourIdentity()
    assert metric.compute().isnan()
    images = torch.stack([_scene(SAND, RED), _scene(SAND, BLUE)])
    metric.update(images, torch.tensor([RED], dtype=torch.uint8))
    assert metric.compute().item() == 0.5


def test_shuffled_partner_is_the_next_sample_of_another_concept():
    assert other_concept(["a", "a", "b", "b"]).tolist() == [2, 2, 0, 0]
    assert other_concept(["a", "b", "c"]).tolist() == [1, 2, 0]
    assert other_concept(["a", "a"]) is None

"""The model shapes the benchmarks measure, with random weights: `tiny` is the embedded default (the toy base's
architecture from conf/toy_base.yaml, the image encoder of conf/default.yaml), `sd15` the paper's scale."""
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"tiny": ROOT / "conf" / "default.yaml", "sd15": ROOT / "conf" / "sd15.yaml"}
ARCHITECTURES = {"tiny": ROOT / "conf" / "toy_base.yaml", "sd15": ROOT / "conf" / "sd15.yaml"}


def model_config(scale: str) -> dict:
    """The scale's `model:` section, its frozen parts described by architecture (pretrained: null)."""
    model = yaml.safe_load(CONFIGS[scale].read_text())["model"]
    ldm = yaml.safe_load(ARCHITECTURES[scale].read_text())["model"]["ldm"]
    model["ldm"] = dict(ldm, pretrained=None)
    model["image_encoder"] = dict(model["image_encoder"], pretrained=None)
    return model

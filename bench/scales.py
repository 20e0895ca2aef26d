"""The model shapes the benchmarks measure, with random weights: `tiny` is the embedded default (the toy base's
architecture from conf/toy_base.yaml, the image encoder of conf/default.yaml), `sd15` the paper's scale, `sd21`
Stable Diffusion 2.1's (conf/sd21.yaml, an overlay on conf/sd15.yaml), `sdxl` SDXL base 1.0's (conf/sdxl.yaml, an
overlay on conf/sd15.yaml), `tiny_sd21` and `tiny_sdxl` the tests' tiny models of those families
(conf/tiny_sd21.yaml, conf/tiny_sdxl.yaml)."""
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# scale -> its config files, later ones laid over earlier ones as `ib fit --config A --config B` does
CONFIGS = {"tiny": [CONF / "default.yaml"], "tiny_sd21": [CONF / "default.yaml", CONF / "tiny_sd21.yaml"],
           "tiny_sdxl": [CONF / "default.yaml", CONF / "tiny_sdxl.yaml"],
           "sd15": [CONF / "sd15.yaml"], "sd21": [CONF / "sd15.yaml", CONF / "sd21.yaml"],
           "sdxl": [CONF / "sd15.yaml", CONF / "sdxl.yaml"]}
ARCHITECTURES = {"tiny": [CONF / "toy_base.yaml"], "tiny_sd21": [CONF / "tiny_sd21.yaml"],
                 "tiny_sdxl": [CONF / "tiny_sdxl.yaml"], "sd15": [CONF / "sd15.yaml"],
                 "sd21": [CONF / "sd15.yaml", CONF / "sd21.yaml"], "sdxl": [CONF / "sd15.yaml", CONF / "sdxl.yaml"]}


def _merged(files: list[Path]) -> dict:
    def merge(base: dict, over: dict) -> dict:
        return {**base, **{k: merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                           for k, v in over.items()}}
    out: dict = {}
    for f in files:
        out = merge(out, yaml.safe_load(f.read_text()))
    return out


def model_config(scale: str) -> dict:
    """The scale's `model:` section, its frozen parts described by architecture (pretrained: null)."""
    model = _merged(CONFIGS[scale])["model"]
    ldm = _merged(ARCHITECTURES[scale])["model"]["ldm"]
    model["ldm"] = dict(ldm, pretrained=None)
    model["image_encoder"] = dict(model["image_encoder"], pretrained=None)
    return model

"""CLIP-I, CLIP-T and DINO: exact values on known embeddings, identity, identifier removal, DDP reduction,
and loading real-format backbone files through the same code the callback and `ib evaluate` use."""
import argparse
import json
import math
import socket

import open_clip
import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file
from torch import nn

from ib.errors import ConfigError
from ib.metrics.backbones import ClipBackbone, ClipBackboneConfig, DinoBackbone, DinoBackboneConfig
from ib.metrics.clip_i import CLIPImageSimilarity
from ib.metrics.dino import DINOSimilarity
from ib.metrics.identity import identity_metrics
from tests.conftest import ROOT

TINY = yaml.safe_load((ROOT / "conf" / "metrics" / "tiny.yaml").read_text())


def tiny_clip_cfg(**kw) -> ClipBackboneConfig:
    return ClipBackboneConfig(**{**TINY["clip"], **kw})


def tiny_dino_cfg(**kw) -> DinoBackboneConfig:
    return DinoBackboneConfig(**{**TINY["dino"], **kw})


def tiny_metrics() -> dict:
    return identity_metrics(tiny_clip_cfg(), tiny_dino_cfg(), "sks")  # random towers from their config seed


class FixedEmbeddings(nn.Module):
    """A backbone whose embedding of a (3, 1, 1) image is its three pixel values: cosines by hand."""

    def encode_images(self, images):
        return torch.stack(list(images)).flatten(1).float()


def vecs(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).view(len(rows), 3, 1, 1)


def test_hand_computed_cosines_raw_not_scaled_or_clipped():
    for metric_cls in (CLIPImageSimilarity, DINOSimilarity):
        m = metric_cls(FixedEmbeddings())
        generated = vecs([1, 0, 0], [1, 1, 0], [-2, 0, 0])
        real = vecs([3, 0, 0], [0, 0, 5])
        m.update(generated, real)
        # per image: mean over reals of cos -> (1 + 0)/2, (1/√2 + 0)/2, (-1 + 0)/2
        expected = ((1 + 0) / 2 + (1 / math.sqrt(2)) / 2 + (-1 + 0) / 2) / 3
        assert m.compute().item() == pytest.approx(expected, abs=1e-6)
        m.update(vecs([0, 1, 0]), real)  # a second update: every scored image counts once
        assert m.compute().item() == pytest.approx((3 * expected + 0) / 4, abs=1e-6)

        m.reset()
        m.update(vecs([1, 0, 0], [1, 1, 0], [0, 0, 1]))  # real vs real, self-pairs skipped
        expected = ((1 / math.sqrt(2) + 0) / 2 + (1 / math.sqrt(2) + 0) / 2 + 0) / 3
        assert m.compute().item() == pytest.approx(expected, abs=1e-6)
        m.reset()
        assert math.isnan(m.compute().item())


def test_identical_images_score_one():
    metrics = tiny_metrics()
    torch.manual_seed(1)
    images = torch.rand(3, 3, 80, 72)
    for name in ("clip_i", "dino"):
        m = metrics[name]
        m.update(images[:1], images[:1])
        m.update(images[1:2], list(images[1:2]))  # a batch, or a list of images of any sizes
        m.update((images[2] * 255).byte()[None], (images[2] * 255).byte()[None])  # uint8 input
        assert m.compute().item() == pytest.approx(1.0, abs=1e-5), name
        m.reset()
        m.update(torch.stack([images[0]] * 3))  # real vs real on copies of one photo
        assert m.compute().item() == pytest.approx(1.0, abs=1e-5), name


def test_clip_t_scores_the_prompt_without_identifier():
    metrics = tiny_metrics()
    clip_t, backbone = metrics["clip_t"], metrics["clip_t"].backbone
    assert backbone is metrics["clip_i"].backbone  # one CLIP model for both
    torch.manual_seed(2)
    images = torch.rand(2, 3, 64, 64)
    clip_t.update(images, ["a sks ball on the beach", "a photo of a Sks box in the snow"])

    def cos(prompts):
        img = F.normalize(backbone.encode_images(images), dim=-1)
        txt = F.normalize(backbone.encode_text(prompts), dim=-1)
        return (img * txt).sum(-1).mean().item()

    assert clip_t.compute().item() == pytest.approx(cos(["a ball on the beach", "a photo of a box in the snow"]), abs=1e-6)
    assert abs(clip_t.compute().item() - cos(["a sks ball on the beach", "a photo of a Sks box in the snow"])) > 1e-4


def _ddp_worker(rank: int, world: int, port: int, updates: list, out_dir: str):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        metrics = tiny_metrics()
        for k, (gen, real, prompts) in enumerate(updates):
            if k % world == rank:
                _update(metrics, gen, real, prompts)
        values = {name: m.compute().item() for name, m in metrics.items()}  # compute() syncs the states
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(values, f)
    finally:
        dist.destroy_process_group()


def _update(metrics, gen, real, prompts):
    metrics["clip_i"].update(gen, real)
    metrics["dino"].update(gen, real)
    metrics["clip_t"].update(gen, prompts)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo_equals_one_process_over_union(tmp_path):
    torch.manual_seed(3)
    # Three updates of different sizes: rank 0 gets two, rank 1 one, so a mean of means would differ.
    updates = [(torch.rand(n, 3, 48, 48), torch.rand(m, 3, 56, 56), [f"a sks ball {w}" for w in "abcd"[:n]])
               for n, m in ((1, 2), (3, 4), (2, 1))]
    mp.spawn(_ddp_worker, args=(2, _free_port(), updates, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    single = tiny_metrics()
    for gen, real, prompts in updates:
        _update(single, gen, real, prompts)
    expected = {name: m.compute().item() for name, m in single.items()}
    rank0_only = tiny_metrics()
    for gen, real, prompts in updates[::2]:
        _update(rank0_only, gen, real, prompts)
    for values in ranks:
        for name in expected:
            assert values[name] == pytest.approx(expected[name], abs=1e-6), name
            assert values[name] != pytest.approx(rank0_only[name].compute().item(), abs=1e-6), name


def _tiny_vit(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(TINY["dino"]["model_name"], pretrained=False, num_classes=0,
                             **TINY["dino"]["overrides"]).eval()


def test_dino_loads_original_and_timm_formats(tmp_path):
    source = _tiny_vit(seed=7)
    state = source.state_dict()
    assert "cls_token" in state and "blocks.0.attn.qkv.weight" in state  # the names DINO's own ViT uses
    head = {"head.mlp.0.weight": torch.zeros(8, 32), "head.last_layer.weight_g": torch.ones(16, 1)}
    files = {
        "dino_deitsmall16_pretrain.pth": state,  # the released backbone file
        "ddp.pth": {f"module.{k}": v for k, v in state.items()},
        # a DINO training checkpoint: student/teacher with backbone + projection head, and argparse args
        "checkpoint.pth": {"teacher": {**{f"backbone.{k}": v for k, v in state.items()}, **head},
                           "student": {f"module.backbone.{k}": torch.zeros_like(v) for k, v in state.items()},
                           "epoch": 100, "args": argparse.Namespace(arch="vit_small")},
    }
    for name, content in files.items():
        torch.save(content, tmp_path / name)
    save_file(state, str(tmp_path / "timm.safetensors"))

    torch.manual_seed(5)
    images = torch.rand(2, 3, 60, 60)
    reference = DinoBackbone(tiny_dino_cfg(weights=str(tmp_path / "dino_deitsmall16_pretrain.pth")))
    expected = source(reference.preprocess(images, "cpu"))
    for name in [*files, "timm.safetensors"]:
        backbone = DinoBackbone(tiny_dino_cfg(weights=str(tmp_path / name)))
        torch.testing.assert_close(backbone.encode_images(images), expected, msg=name)
    assert not torch.allclose(DinoBackbone(tiny_dino_cfg()).encode_images(images), expected)  # random differs

    other = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=32,
                              embed_dim=48, depth=2, num_heads=2)
    torch.save(other.state_dict(), tmp_path / "other.pth")
    with pytest.raises(ConfigError, match=r"^dino\.weights: .*other\.pth does not fit"):
        DinoBackbone(tiny_dino_cfg(weights=str(tmp_path / "other.pth")))


def test_dino_preprocessing_follows_the_protocol():
    pre = DinoBackbone(DinoBackboneConfig(overrides={"embed_dim": 32, "depth": 1, "num_heads": 2})).preprocess
    assert (pre.resize, pre.crop) == (256, 224)  # ViT-S/16: shorter side 256, centre crop 224
    assert pre.mean == pytest.approx([0.485, 0.456, 0.406]) and pre.std == pytest.approx([0.229, 0.224, 0.225])
    tiny = DinoBackbone(tiny_dino_cfg()).preprocess
    assert (tiny.resize, tiny.crop) == (37, 32)  # tiny tower: its own input size, same crop fraction


def test_clip_loads_a_local_checkpoint_file(tmp_path):
    torch.manual_seed(11)
    source = open_clip.create_model("ViT-B-32", pretrained=None, **TINY["clip"]["overrides"]).eval()
    path = tmp_path / "tiny_clip.pt"
    torch.save(source.state_dict(), path)
    backbone = ClipBackbone(tiny_clip_cfg(pretrained=str(path)))
    assert (backbone.preprocess.crop, backbone.preprocess.mean) == (64, list(open_clip.OPENAI_DATASET_MEAN))
    images = torch.rand(2, 3, 64, 64)
    expected = source.encode_image(backbone.preprocess(images, "cpu"))
    torch.testing.assert_close(backbone.encode_images(images), expected)
    torch.testing.assert_close(backbone.encode_text(["a ball"]), source.encode_text(open_clip.tokenize(["a ball"])))


def test_missing_backbone_files_name_the_field(tmp_path):
    missing = str(tmp_path / "nope.pth")
    with pytest.raises(ConfigError, match=r"^IdentityEval\.dino\.weights: file not found: .*nope\.pth$"):
        identity_metrics(tiny_clip_cfg(), tiny_dino_cfg(weights=missing), "sks", "IdentityEval")
    with pytest.raises(ConfigError, match=r"^clip\.pretrained: file not found: .*nope\.pth$"):
        identity_metrics(tiny_clip_cfg(pretrained=missing), tiny_dino_cfg(), "sks")


"""`model.adapter_blocks`: adapters in some of the UNet's transformer blocks only (a smaller GPU's choice)."""
import pytest
import torch
import yaml
from safetensors import safe_open

from ib.cli import main
from ib.errors import ConfigError
from ib.models.adapter import GatedSelfAttentionAdapter, NoAdapter, adapters_removed
from ib.pipeline import InstantBoothPipeline, seeded
from ib.weights import export_weights, load_model
from tests.conftest import build_tiny_model, run_config
from tests.test_adapters import assert_zero_init_is_the_frozen_unet
from tests.test_pipeline import PROMPT, trained_like

BLOCKS = ["mid_block", "up_blocks.1"]  # of the tiny UNet's 7 transformer blocks: 1 + 2


def _fusers(model) -> dict[str, type]:
    return {path: type(block.fuser) for path, block in model.ldm.unet.named_modules() if hasattr(block, "fuser")}


def test_only_the_named_blocks_get_adapters_and_the_rest_pass_through():
    everywhere, some = build_tiny_model(), build_tiny_model(adapter_blocks=BLOCKS)
    assert len(everywhere.adapters) == 7 and len(some.adapters) == 3
    fusers = _fusers(some)
    adapted = sorted(path for path, kind in fusers.items() if kind is GatedSelfAttentionAdapter)
    assert adapted and all(path.startswith(("mid_block.", "up_blocks.1.")) for path in adapted)
    assert all(kind is NoAdapter for path, kind in fusers.items() if path not in adapted)
    trainable = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert trainable(some) < trainable(everywhere)


def test_zero_init_is_still_the_frozen_unet_and_the_pass_through_slots_are_removed_with_the_adapters():
    model = build_tiny_model(adapter_blocks=BLOCKS)
    assert_zero_init_is_the_frozen_unet(model)
    unet = model.ldm.unet
    with adapters_removed(unet):  # the plain UNet saved as a base has no slot filled, pass-through ones included
        assert not any(hasattr(block, "fuser") for block in unet.modules())
    assert sum(isinstance(block.fuser, NoAdapter) for block in unet.modules() if hasattr(block, "fuser")) == 4


@pytest.mark.parametrize("blocks, message", [
    (["down_blocks.9"], "model.adapter_blocks: 'down_blocks.9' holds no transformer block of this UNet "
                        "(those that do: down_blocks.0, down_blocks.1, mid_block, up_blocks.0, up_blocks.1)"),
    ([], "model.adapter_blocks: empty; null puts an adapter in every transformer block"),
])
def test_a_selection_that_names_no_block_is_one_line(blocks, message):
    with pytest.raises(ConfigError) as e:
        build_tiny_model(adapter_blocks=blocks)
    assert str(e.value) == message


def test_export_records_the_blocks_and_loads_the_same_model(tmp_path):
    model = trained_like(build_tiny_model(adapter_blocks=BLOCKS))
    path = export_weights(model, tmp_path / "ib.safetensors")
    with safe_open(str(path), "pt") as f:
        assert yaml.safe_load(f.metadata()["adapter_blocks"]) == BLOCKS
        assert sum(".fuser." in k for k in f.keys()) > 0
    loaded = InstantBoothPipeline.from_weights(path)
    assert loaded.model.adapter_blocks == BLOCKS and len(loaded.model.adapters) == 3
    refs = [torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    images = [p(PROMPT, refs, num_inference_steps=2, beta=1.0, generator=seeded([1]), output_type="pt").images
              for p in (loaded, InstantBoothPipeline.from_model(model))]
    assert torch.equal(*images)
    # A file of a model with adapters everywhere records nothing: the files written before the option.
    with safe_open(str(export_weights(build_tiny_model(), tmp_path / "all.safetensors")), "pt") as f:
        assert "adapter_blocks" not in f.metadata()


@pytest.mark.slow
def test_fit_with_a_block_list_and_load_its_checkpoint(tmp_path, synthetic_shards):
    config = run_config(tmp_path, synthetic_shards, max_steps=2)
    assert main(["fit", "--config", str(config), "--model.adapter_blocks", "[mid_block]"]) == 0
    model, hparams = load_model(str(tmp_path / "run" / "checkpoints" / "last.ckpt"))
    assert hparams["adapter_blocks"] == ["mid_block"] and len(model.adapters) == 1

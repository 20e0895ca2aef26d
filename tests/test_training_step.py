"""Only the heads and adapters train; every frozen parameter stays bit-identical."""
import torch

from ib.lit_module import InstantBoothModule
from tests.conftest import default_config


def _module() -> InstantBoothModule:
    m = default_config()["model"]
    torch.manual_seed(0)
    return InstantBoothModule(ldm=m["ldm"], image_encoder=m["image_encoder"], optim=m["optim"], cond_dropout=0.0)


def test_optimizer_steps_touch_only_trainable_parameters():
    module = _module()
    model = module.model
    parts = [model.concept_head, model.patch_head, model.adapters]
    trainable = {id(p) for part in parts for p in part.parameters()}
    assert trainable == {id(p) for p in model.parameters() if p.requires_grad}
    trainable_ptrs = {p.data_ptr() for part in parts for p in part.parameters()}
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if v.data_ptr() not in trainable_ptrs}
    assert len(frozen_before) > 100  # the whole LDM and the image backbone
    trainable_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    opt = module.configure_optimizers()["optimizer"]
    grouped = {id(p) for g in opt.param_groups for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
    assert [g["lr"] for g in opt.param_groups] != [0, 0]

    torch.manual_seed(0)
    images, refs = torch.rand(2, 3, 32, 32), torch.rand(2, 1, 3, 32, 32)
    captions = ["a photo of a sks ball on the grass", "a sks box in the snow"]
    module.train()
    for _ in range(2):  # the gates start at 0, so the adapters' inner weights get signal from step 2
        opt.zero_grad()
        model.training_loss(images, refs, captions).backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == (id(p) in trainable), n
        opt.step()

    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad.abs().sum() > 0, f"no gradient reached {n}"
            assert not torch.equal(p.detach(), trainable_before[n]), f"{n} did not move"
    for k, v in model.state_dict().items():
        if k in frozen_before:
            assert torch.equal(v, frozen_before[k]), f"frozen {k} changed"
    assert not model.ldm.training and not model.image_encoder.training


def test_checkpoint_state_holds_trainable_weights_only():
    module = _module()
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    keys = set(ckpt["state_dict"])
    assert keys == {f"model.{k}" for k in module.model.trainable_state_dict()}
    assert not any(k.startswith(("model.ldm.", "model.image_encoder.")) for k in keys)

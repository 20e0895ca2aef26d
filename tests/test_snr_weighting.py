"""model.snr_gamma: Min-SNR-γ weighting of the training loss; validation losses stay unweighted."""
import pytest
import torch

from ib.lit_module import InstantBoothModule
from tests.conftest import build_tiny_model, default_config

CAPTIONS = ["a photo of a sks ball on the grass", "a sks box in the snow", "a sks cup on the beach",
            "a photo of a sks ring"]


def _inputs():
    torch.manual_seed(1)
    return torch.rand(4, 3, 32, 32), torch.rand(4, 2, 3, 32, 32)


def _snr(sched, t=None) -> torch.Tensor:
    """The noise schedule's signal-to-noise ratio at timesteps t (all of them when None), computed here on its own."""
    alpha_bar = sched.alphas_cumprod if t is None else sched.alphas_cumprod[t]
    return alpha_bar / (1 - alpha_bar)


def _loss_and_parts(model, monkeypatch, **kwargs):
    """training_loss at seed 0, with the timesteps, noise and prediction it used."""
    seen = {}
    sched = model.ldm.noise_scheduler
    add_noise, predict = sched.add_noise, model.predict_noise

    def spy_add_noise(latents, noise, t):
        seen.update(latents=latents, noise=noise, t=t)
        return add_noise(latents, noise, t)

    def spy_predict(*args, **kw):
        seen["pred"] = predict(*args, **kw)
        return seen["pred"]

    monkeypatch.setattr(sched, "add_noise", spy_add_noise)
    monkeypatch.setattr(model, "predict_noise", spy_predict)
    images, refs = _inputs()
    torch.manual_seed(0)
    with torch.no_grad():
        loss = model.training_loss(images, refs, CAPTIONS, **kwargs)
    monkeypatch.undo()
    return loss, seen


@pytest.mark.parametrize("gamma", [0.1, 0.25])  # each splits the 4 drawn timesteps' SNRs (0.06-0.34)
def test_each_sample_is_weighted_by_min_snr_over_snr(gamma, monkeypatch):
    model = build_tiny_model()
    plain, _ = _loss_and_parts(model, monkeypatch)
    weighted, seen = _loss_and_parts(model, monkeypatch, snr_gamma=gamma)
    assert model.ldm.noise_scheduler.config.prediction_type == "epsilon"
    snr = _snr(model.ldm.noise_scheduler, seen["t"])
    per_sample = ((seen["pred"] - seen["noise"]) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(weighted, (per_sample * torch.minimum(snr, torch.tensor(gamma)) / snr).mean())
    torch.testing.assert_close(plain, per_sample.mean())  # the same draw: only the weights differ
    # every weight is at most 1, and below 1 exactly for the samples whose SNR is above γ
    assert (snr > gamma).any() and (snr < gamma).any() and weighted < plain


def test_a_gamma_above_every_snr_is_the_plain_loss(monkeypatch):
    model = build_tiny_model()
    plain, _ = _loss_and_parts(model, monkeypatch)
    top = float(_snr(model.ldm.noise_scheduler).max())
    torch.testing.assert_close(_loss_and_parts(model, monkeypatch, snr_gamma=2 * top)[0], plain)


def test_v_prediction_weights_by_min_snr_over_snr_plus_one(monkeypatch):
    model = build_tiny_model()
    sched = model.ldm.noise_scheduler
    sched.register_to_config(prediction_type="v_prediction")
    weighted, seen = _loss_and_parts(model, monkeypatch, snr_gamma=1.0)
    snr = _snr(sched, seen["t"])
    velocity = sched.get_velocity(seen["latents"], seen["noise"], seen["t"])
    per_sample = ((seen["pred"] - velocity) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(weighted, (per_sample * torch.clamp(snr, max=1.0) / (snr + 1)).mean())


def test_training_is_weighted_and_validation_is_not():
    m = default_config()["model"]
    modules = {}
    for g in (None, 0.1):
        torch.manual_seed(0)  # the same trainable init
        modules[g] = InstantBoothModule(ldm=m["ldm"], image_encoder=m["image_encoder"], snr_gamma=g)
    images, refs = _inputs()
    batch = {"image": images, "refs": refs, "caption": CAPTIONS}
    losses = {}
    for g, module in modules.items():
        module.log = lambda *a, **k: None
        torch.manual_seed(0)
        with torch.no_grad():
            losses[g] = (module.training_step(batch, 0), module._fixed_noise_loss(batch, refs, 0))
    assert modules[0.1].hparams.snr_gamma == 0.1
    assert losses[0.1][0] < losses[None][0]
    assert torch.equal(losses[0.1][1], losses[None][1])

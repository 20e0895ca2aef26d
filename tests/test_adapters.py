"""The adapters ride diffusers' GLIGEN extension point; pin that internal behaviour here."""
import torch
from diffusers.models.attention import BasicTransformerBlock

from ib.models.adapter import adapter_kwargs


def _unet_inputs(model, batch=2, tokens=5):
    unet = model.ldm.unet
    torch.manual_seed(1)
    x = torch.randn(batch, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    t = torch.tensor([10, 500])[:batch]
    text = torch.randn(batch, 77, unet.config.cross_attention_dim)
    visual = torch.randn(batch, tokens, unet.config.cross_attention_dim)
    return x, t, text, visual


@torch.no_grad()
def assert_zero_init_is_the_frozen_unet(model) -> None:
    """Freshly built adapters leave the UNet bitwise the frozen one; once a gate opens they do not. (SDXL's UNet
    also gets its added conditioning: a pooled embedding and size/crop ids.)"""
    unet = model.ldm.unet
    x, t, text, visual = _unet_inputs(model)
    size = (x.shape[-2] * model.ldm.vae_scale_factor, x.shape[-1] * model.ldm.vae_scale_factor)
    added = model.encode_added(["a photo of a dog", "a red ball"], size)
    frozen = lambda **kw: unet(x, t, encoder_hidden_states=text, added_cond_kwargs=added, **kw).sample
    plain = frozen()
    assert torch.equal(frozen(cross_attention_kwargs=adapter_kwargs(visual, 1.0)), plain)
    model.adapters[0].gate.fill_(0.5)  # the equality above can fail
    assert not torch.allclose(frozen(cross_attention_kwargs=adapter_kwargs(visual, 1.0)), plain)


@torch.no_grad()
def test_zero_gate_adapters_equal_plain_unet(tiny_model):
    x, t, text, visual = _unet_inputs(tiny_model)
    unet = tiny_model.ldm.unet
    plain = unet(x, t, encoder_hidden_states=text).sample
    with_adapters = unet(x, t, encoder_hidden_states=text, cross_attention_kwargs=adapter_kwargs(visual, 1.0)).sample
    assert torch.equal(plain, with_adapters)

    # The same call is not a no-op once a gate opens: the test above can fail.
    tiny_model.adapters[0].gate.fill_(0.5)
    opened = unet(x, t, encoder_hidden_states=text, cross_attention_kwargs=adapter_kwargs(visual, 1.0)).sample
    assert not torch.allclose(plain, opened)
    # ... and β = 0 switches the adapters off again, exactly.
    off = unet(x, t, encoder_hidden_states=text, cross_attention_kwargs=adapter_kwargs(visual, 0.0)).sample
    assert torch.equal(plain, off)


@torch.no_grad()
def test_one_adapter_per_transformer_block_called_once_each(tiny_model):
    unet = tiny_model.ldm.unet
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    assert len(blocks) == len(tiny_model.adapters) > 0
    assert all(b.fuser is a for b, a in zip(blocks, tiny_model.adapters))
    calls = []
    hooks = [a.register_forward_hook(lambda m, i, o: calls.append(m)) for a in tiny_model.adapters]
    x, t, text, visual = _unet_inputs(tiny_model)
    unet(x, t, encoder_hidden_states=text, cross_attention_kwargs=adapter_kwargs(visual, 1.0))
    for h in hooks:
        h.remove()
    assert sorted(map(id, calls)) == sorted(map(id, tiny_model.adapters))


def test_adapter_matches_formula(tiny_model):
    """y + β·tanh(γ)·SelfAttn(LN([y; f_p]))[:, :len(y)], with the attention computed over the full concat."""
    from ib.models.adapter import AdapterContext

    a = tiny_model.adapters[0]
    with torch.no_grad():
        a.gate.fill_(0.7)
    y = torch.randn(2, 9, a.norm.normalized_shape[0])
    fp = torch.randn(2, 4, a.proj.in_features)
    got = a(y, AdapterContext(fp, 0.3))
    full = a.norm(torch.cat([y, a.proj(fp)], 1))
    want = y + 0.3 * torch.tanh(torch.tensor(0.7)) * a.attn(full)[:, :9]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_skipped_rows_are_the_frozen_model_and_the_others_as_with_per_sample_beta(tiny_model):
    """skip_rows (guidance's unconditional half without adapters) gives what a per-sample β of 0 gives for those
    rows, without running the adapters on them; cached visual keys/values for the other rows agree too."""
    for a in tiny_model.adapters:
        a.gate.fill_(0.5)
    x, t, text, visual = _unet_inputs(tiny_model)
    unet = tiny_model.ldm.unet
    plain = unet(x, t, encoder_hidden_states=text).sample
    beta = torch.tensor([0.0, 0.8]).view(-1, 1, 1)
    per_sample = unet(x, t, encoder_hidden_states=text, cross_attention_kwargs=adapter_kwargs(visual, beta)).sample

    rows = []
    hook = tiny_model.adapters[0].attn.to_q.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    skipped = unet(x, t, encoder_hidden_states=text, cross_attention_kwargs=adapter_kwargs(visual[1:], 0.8, skip_rows=1)).sample
    kv = tuple(a.visual_kv(visual[1:]) for a in tiny_model.adapters)
    cached = unet(x, t, encoder_hidden_states=text,
                  cross_attention_kwargs=adapter_kwargs(visual[1:], 0.8, kv, skip_rows=1)).sample
    hook.remove()

    assert rows == [1, 1]  # the adapters computed the second row only
    torch.testing.assert_close(skipped[:1], plain[:1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(skipped, per_sample, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached, skipped, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(skipped[1:], plain[1:])  # the adapters did act on the other row


@torch.no_grad()
def test_gate_init_opens_every_gate_from_the_start_and_a_checkpoint_keeps_its_own():
    """model.adapter_gate_init: every γ starts there (0, the paper's, is the frozen UNet exactly); the trained
    gates of a checkpoint replace it."""
    from tests.conftest import build_tiny_model
    model = build_tiny_model(gate_init=0.5)
    assert [float(a.gate) for a in model.adapters] == [0.5] * len(model.adapters)
    x, t, text, visual = _unet_inputs(model)
    unet = model.ldm.unet
    plain = unet(x, t, encoder_hidden_states=text).sample
    assert not torch.allclose(unet(x, t, encoder_hidden_states=text, cross_attention_kwargs=adapter_kwargs(visual, 1.0)).sample, plain)
    trained = build_tiny_model()
    trained.adapters[0].gate.fill_(-0.25)
    model.load_state_dict(trained.state_dict())
    assert float(model.adapters[0].gate) == -0.25 and float(model.adapters[1].gate) == 0.0

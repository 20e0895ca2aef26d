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

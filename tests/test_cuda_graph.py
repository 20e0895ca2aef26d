"""The CUDA-graph replay of the sampler's UNet call (ib/models/cuda_graph.py). Capture itself needs a GPU
(the bench checks graphed against eager images there); here a stand-in capture that, like a graph, reads
only the static input buffers and writes only the static output checks the bookkeeping: new inputs reach
the replay, one graph per input shape, outputs are not aliased to the static buffer."""
import torch

from ib.models.cuda_graph import CUDAGraphCache
from ib.models.sampler import SamplingConfig
from ib.pipeline import InstantBoothPipeline, generate
from tests.conftest import build_tiny_model


def fake_capture(fn, args, warmup):
    for _ in range(warmup):
        fn(*args)
    output = fn(*args)
    return output, lambda: output.copy_(fn(*args))  # replays read the static buffers `args` only


def _model():
    model = build_tiny_model()
    with torch.no_grad():
        for a in model.adapters:
            a.gate.fill_(0.3)
    return model


@torch.no_grad()
def test_replays_see_new_inputs_and_one_graph_per_shape():
    model = _model()
    graphed = CUDAGraphCache(model.predict_noise, capture=fake_capture)
    text = model.encode_prompts(["a sks ball", "a sks box"])
    outs = []
    for seed, n_refs in ((0, 1), (1, 1), (2, 3), (3, 1)):
        torch.manual_seed(seed)
        x, t = torch.randn(2, 4, 8, 8), torch.tensor(500 + seed)
        _, visual = model.encode_references(torch.rand(2, n_refs, 3, 32, 32))
        got = graphed(x, t, text, visual, 0.7, None)
        torch.testing.assert_close(got, model.predict_noise(x, t, text, visual, 0.7))
        outs.append(got)
    assert len(graphed.graphs) == 2  # 1 and 3 references: two token counts, two graphs
    assert sorted(g.calls for g in graphed.graphs.values()) == [1, 3]
    assert not torch.equal(outs[0], outs[1])  # returned copies, not the static output overwritten later
    graphed(torch.randn(2, 4, 8, 8), torch.tensor(10), text, visual, 0.2, None)
    assert len(graphed.graphs) == 3  # beta is a Python float baked into the graph: part of the key


@torch.no_grad()
def test_sampling_through_graph_replay_gives_the_same_images():
    model = _model()
    refs, prompts, cfg = torch.rand(2, 2, 3, 32, 32), ["a sks ball", "a sks box"], SamplingConfig(steps=4)
    pipe = InstantBoothPipeline.from_model(model, cfg.scheduler)
    want = generate(pipe, refs, prompts, cfg, seeds=[0, 1])
    model._graphed_predict_noise = graphed = CUDAGraphCache(model.predict_noise, capture=fake_capture)  # test seam
    got = generate(pipe, refs, prompts, cfg, seeds=[0, 1])
    torch.testing.assert_close(got, want)
    (g,) = graphed.graphs.values()
    assert g.calls == cfg.steps  # every denoising step went through the replay


@torch.no_grad()
def test_inputs_that_stay_the_same_tensor_are_copied_once():
    """Across the steps of a run only the latents and the timestep change; text and visual tokens are the same
    tensors and are copied into the static buffers once. A tensor changed in place is copied again."""
    model = _model()
    graphed = CUDAGraphCache(model.predict_noise, capture=fake_capture)
    text = model.encode_prompts(["a sks ball", "a sks box"])
    _, visual = model.encode_references(torch.rand(2, 2, 3, 32, 32))
    for step in range(4):
        x, t = torch.randn(2, 4, 8, 8), torch.tensor(900 - 100 * step)
        torch.testing.assert_close(graphed(x, t, text, visual, 0.7, None), model.predict_noise(x, t, text, visual, 0.7))
    (g,) = graphed.graphs.values()
    assert g.copies == 4 + 3 * 2  # step 1: x, t, text, visual; then x and t only
    visual.mul_(2)  # same tensor, new contents
    x, t = torch.randn(2, 4, 8, 8), torch.tensor(5)
    torch.testing.assert_close(graphed(x, t, text, visual, 0.7, None), model.predict_noise(x, t, text, visual, 0.7))
    assert g.copies == 4 + 3 * 2 + 3
    text2 = text.clone()  # equal values, another tensor: copied (identity, not values, decides)
    graphed(x, t, text2, visual, 0.7, None)
    assert g.copies == 4 + 3 * 2 + 3 + 1  # x and t are the previous call's tensors too


def test_inference_mode_tensors_are_always_copied():
    """Lightning validates under torch.inference_mode: such tensors have no version counter to trust."""
    model = _model()
    graphed = CUDAGraphCache(model.predict_noise, capture=fake_capture)
    with torch.inference_mode():
        text = model.encode_prompts(["a sks ball", "a sks box"])
        _, visual = model.encode_references(torch.rand(2, 1, 3, 32, 32))
        x, t = torch.randn(2, 4, 8, 8), torch.tensor(3)
        for _ in range(2):
            torch.testing.assert_close(graphed(x, t, text, visual, 0.7, None), model.predict_noise(x, t, text, visual, 0.7))
    (g,) = graphed.graphs.values()
    assert g.copies == 8

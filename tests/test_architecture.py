"""The networks against the paper's Figure 6 as docs/NOPROP_SPEC.md §6 writes it: layer order,
widths, dropout, and where batch norm is (DT) and is not (CT/FM)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from noprop_exp.models.backbones import BitsDropout, MaxPool2x2, PaperCNN, ResNet
from noprop_exp.models.ct_net import CTNetwork
from noprop_exp.models.dt_block import DTBlock

# §6, one token per layer; "+" is the residual addition, which is no module. Each max-pool runs
# before its ReLU rather than after (the same function: see the test below).
FIGURE_6_IMAGE_BRANCH = (
    "conv32 relu pool drop0.2 conv64 relu drop0.2 conv128 relu pool drop0.2 fc256"
)
IMAGE_BRANCH = "conv32 pool relu drop0.2 conv64 relu drop0.2 conv128 pool relu drop0.2 fc256"
DT_BLOCK = {
    "label_stem": "fc256 bn relu",
    "label_residual": "fc256 bn relu fc256 bn",
    "image_branch": f"{IMAGE_BRANCH} bn",
    "head": "fc256 bn relu fc128 bn relu fc10",
}
CT_NETWORK = {
    "image_branch": f"{IMAGE_BRANCH} relu",
    "label_branch": "fc256 relu",
    "time_branch": "fc256 relu",
    "head": "fc256 relu fc128 relu fc10",
}


def token(layer: nn.Module) -> str | None:
    kinds = {
        nn.Conv2d: lambda m: f"conv{m.out_channels}" * (m.kernel_size == (3, 3)),
        nn.Linear: lambda m: f"fc{m.out_features}",
        nn.BatchNorm1d: lambda m: "bn",
        nn.ReLU: lambda m: "relu",
        nn.MaxPool2d: lambda m: "pool" * (m.kernel_size == 2),
        nn.Dropout: lambda m: f"drop{m.p}",
    }
    for kind, name in kinds.items():
        if isinstance(layer, kind):
            return name(layer) or f"unexpected {layer}"
    return None if isinstance(layer, nn.Flatten | nn.Identity) else f"unexpected {layer}"


def layers_run(network: nn.Module, *inputs: torch.Tensor) -> dict[str, str]:
    """Per top-level part of `network`, its layers in the order a forward pass runs them."""
    seen: dict[str, list[str]] = {}
    hooks = []
    for part_name, part in network.named_children():
        for layer in part.modules():
            if next(layer.children(), None) is None:
                hooks.append(
                    layer.register_forward_hook(
                        lambda m, *_, p=part_name: seen.setdefault(p, []).append(token(m))
                    )
                )
    network.train()
    network(*inputs)
    for hook in hooks:
        hook.remove()
    return {part: " ".join(t for t in tokens if t) for part, tokens in seen.items()}


def test_dt_block_is_figure_6():
    block = DTBlock(PaperCNN, (1, 28, 28), (10,), 10)
    assert layers_run(block, torch.randn(4, 10), torch.randn(4, 1, 28, 28)) == DT_BLOCK
    convs = [m for m in block.image_branch.modules() if isinstance(m, nn.Conv2d)]
    assert [c.padding for c in convs] == [(1, 1)] * 3  # (ours): padding 1
    assert block.image_branch.fc.in_features == 128 * 7 * 7


def test_ct_network_is_figure_6_without_batch_norm():
    network = CTNetwork(PaperCNN, (3, 32, 32), (10,), 10)
    logits = network(torch.randn(4, 10), torch.randn(4, 3, 32, 32), torch.rand(4))
    assert logits.shape == (4, 10)
    assert layers_run(network, torch.randn(4, 10), torch.randn(4, 3, 32, 32), torch.rand(4)) == (
        CT_NETWORK
    )
    assert network.time_branch[0].in_features == 64  # the sinusoidal embedding's width
    assert network.head[0].in_features == 3 * 256


@pytest.mark.parametrize(("stem", "side"), [("small", 28), ("imagenet", 7)])
def test_resnet_stems_small_keeps_the_image_size_imagenet_is_torchvisions(stem, side):
    """backbone.stem: the first residual stage sees 28x28 maps (small) or 7x7 (torchvision's
    7x7 stride-2 conv and 3x3 stride-2 max-pool)."""
    net = ResNet((1, 28, 28), depth=18, stem=stem)
    seen = []
    net.net.layer1.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0].shape))
    net.eval()
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 256)
    assert seen == [(2, 64, side, side)]
    assert net.net.conv1.kernel_size == ((7, 7) if stem == "imagenet" else (3, 3))
    with pytest.raises(ValueError, match=r"backbone\.stem=.cifar. is not one of"):
        ResNet((1, 28, 28), stem="cifar")


def test_the_image_branch_computes_figure_6s_conv_relu_pool_exactly():
    """The same layers in Figure 6's order (ReLU before each pool) give the same features and
    the same gradients."""
    torch.manual_seed(0)
    cnn = PaperCNN((1, 28, 28)).eval()  # eval: without dropout's random masks
    layers = list(cnn.features)
    our_order = [type(m).__name__ for m in layers]
    assert our_order[1:3] == ["MaxPool2x2", "ReLU"] and our_order[8:10] == our_order[1:3]
    layers[1], layers[2], layers[8], layers[9] = layers[2], layers[1], layers[9], layers[8]
    as_drawn = nn.Sequential(*layers)
    assert " ".join(filter(None, map(token, [*as_drawn, cnn.fc]))) == FIGURE_6_IMAGE_BRANCH
    x = torch.randn(8, 1, 28, 28, dtype=torch.float64)
    cnn.double()
    ours, drawn = cnn.features(x), as_drawn(x)
    assert torch.equal(ours, drawn)
    weights = [cnn.features[0].weight, cnn.features[7].weight]
    torch.testing.assert_close(
        torch.autograd.grad(ours.square().sum(), weights),
        torch.autograd.grad(drawn.square().sum(), weights),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape", [(3, 4, 28, 28), (2, 3, 7, 9)])
def test_the_inference_max_pool_gives_max_pool2ds_values_without_running_it(
    monkeypatch, shape, layout, dtype
):
    """Without a graph (inference), the strided maxima equal F.max_pool2d(x, 2) bit for bit,
    odd edges dropped as floor mode does; with one, it is F.max_pool2d, gradients included."""
    x = torch.randn(shape).to(dtype).contiguous(memory_format=layout)
    expected = F.max_pool2d(x, 2)
    pool = MaxPool2x2()
    with monkeypatch.context() as patched:
        patched.setattr(F, "max_pool2d", lambda *_: pytest.fail("ran the indexed max-pool"))
        with torch.no_grad():
            assert torch.equal(pool(x.requires_grad_()), expected)
        x.requires_grad_(False)
        assert torch.equal(pool(x), expected)
    # Small integers tie often: a max-pool sends a tie's gradient to one input, maxima split it.
    leaf = torch.randint(0, 3, shape, dtype=torch.float64).requires_grad_()
    (ours,) = torch.autograd.grad(pool(leaf).square().sum(), leaf)
    (theirs,) = torch.autograd.grad(F.max_pool2d(leaf, 2).square().sum(), leaf)
    assert torch.equal(ours, theirs)


def dropped(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """BitsDropout(p) of `x` in training mode, and the keep mask read off its output."""
    out = BitsDropout(p).train()(x)
    return out, out != 0


@pytest.mark.parametrize("p", [0.2, 0.5])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_bits_dropout_drops_each_element_independently_with_probability_p(p, layout):
    """Bernoulli(p) drops, i.i.d.: the drop rate overall and per channel, and the two 32-bit
    halves of each 64-bit draw (neighbours in memory) dropped together at rate p^2."""
    torch.manual_seed(0)
    x = torch.ones(64, 32, 32, 32).contiguous(memory_format=layout)  # 2M elements
    out, keep = dropped(x, p)
    assert out.is_contiguous(memory_format=layout)
    torch.testing.assert_close(out.unique(), torch.tensor([0.0, 1 / (1 - p)]))  # kept: scaled
    n = keep.numel()
    rate = 1 - keep.float().mean().item()
    assert abs(rate - p) < 5 * (p * (1 - p) / n) ** 0.5
    per_channel = 1 - keep.float().mean((0, 2, 3))
    assert (per_channel - p).abs().max() < 5 * (p * (1 - p) / (n / 32)) ** 0.5
    in_memory = keep.permute(0, 2, 3, 1) if layout == torch.channels_last else keep
    pairs = in_memory.reshape(-1, 2)  # the two halves of one 64-bit draw
    both = (~pairs).all(1).float().mean().item()
    assert abs(both - p * p) < 5 * (p * p * (1 - p * p) / (n / 2)) ** 0.5


def test_bits_dropout_is_a_mask_times_scale_seeded_by_torch_and_nn_dropout_elsewhere():
    x = torch.randn(16, 8, 6, 6, dtype=torch.bfloat16).requires_grad_()
    torch.manual_seed(3)
    out, keep = dropped(x, 0.2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, x * keep / 0.8, rtol=0, atol=0)
    (grad,) = torch.autograd.grad(out.float().sum(), x)
    torch.testing.assert_close(grad, (keep / 0.8).to(torch.bfloat16), rtol=0, atol=0)
    torch.manual_seed(3)
    assert torch.equal(dropped(x, 0.2)[0], out)  # the global seed decides the masks
    assert not torch.equal(dropped(x, 0.2)[0], out)  # and each call draws anew
    strided = x.detach().transpose(1, 3)  # neither layout: made dense first, same shape
    assert dropped(strided, 0.2)[0].shape == strided.shape
    assert torch.equal(BitsDropout(0.2).eval()(x), x)  # evaluation: the identity
    assert torch.equal(BitsDropout(0.0).train()(x), x)


def test_dropout_masks_switch_picks_the_dropout_and_names_its_choices():
    kinds = {type(m) for m in PaperCNN((1, 28, 28), dropout_masks="bernoulli").modules()}
    assert nn.Dropout in kinds and BitsDropout not in kinds
    assert BitsDropout in {type(m) for m in PaperCNN((1, 28, 28)).modules()}
    with pytest.raises(ValueError, match=r"dropout_masks must be one of \['bits', 'bernoulli'\]"):
        PaperCNN((1, 28, 28), dropout_masks="philox")


@pytest.mark.parametrize("final", ["batchnorm", "relu"])
def test_cpu_inference_runs_the_image_branch_in_chunks_with_the_same_values(final):
    torch.manual_seed(0)
    chunked = PaperCNN((1, 28, 28), final=final, inference_chunk=64).double().eval()
    whole = PaperCNN((1, 28, 28), final=final, inference_chunk=0).double().eval()
    whole.load_state_dict(chunked.state_dict())
    if final == "batchnorm":  # running statistics of their own, so that they matter
        chunked.final.running_mean.uniform_(-1, 1)
        chunked.final.running_var.uniform_(0.5, 2)
        whole.load_state_dict(chunked.state_dict())
    passes = []
    chunked.features.register_forward_hook(lambda _m, inputs, _o: passes.append(len(inputs[0])))
    x = torch.randn(150, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(chunked(x), whole(x))
    assert passes == [64, 64, 22]
    passes.clear()
    chunked(x)  # a graph is recorded (training-time use): the batch in one pass
    with torch.no_grad():
        chunked.train()(x)  # training mode: dropout's masks and batch statistics, one pass
    assert passes == [150, 150]
    with pytest.raises(ValueError, match="inference_chunk must be >= 0"):
        PaperCNN((1, 28, 28), inference_chunk=-1)

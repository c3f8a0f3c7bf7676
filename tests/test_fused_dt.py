"""Fused NoProp-DT (`variant.method.fused=true`): one DTStack computes what T DTBlocks compute.

The reference is always the sequential model (T separate `DTBlock`s called one after the other)
built from the same seed, which gives it the same weights as the fused one (checked).
"""

from __future__ import annotations

import pytest
import torch

from noprop_exp.assemble import assemble
from noprop_exp.models.backbones import PaperCNN
from noprop_exp.models.dt_block import DTBlock
from noprop_exp.models.dt_stack import DTStack
from noprop_exp.train import make_optimizer, train_step

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
# Small and deterministic: dropout masks are drawn per block in the sequential model but for all
# blocks at once in the stack, so with dropout > 0 they cannot coincide; with p = 0 dropout is
# the identity and everything else is a function of the weights, the batch and the q noise.
PAIR = ["variant.method.num_blocks=3", "backbone.dropout=0.0", "variant.method.head_updates=2"]


def per_block_state(fused_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A fused DT's state dict under the sequential model's keys: the stack's `blocks.<name>`
    holds block t's `blocks.<t>.<name>` at index t."""
    state = {}
    for key, value in fused_state.items():
        if key.startswith("blocks."):
            name = key.removeprefix("blocks.")
            state |= {f"blocks.{t}.{name}": value[t] for t in range(len(value))}
        else:
            state[key] = value
    return state


def sequential_and_fused(tiny_config, device: str, *overrides: str, dtype=torch.float32):
    """The same DT twice, sequential and fused, from the same seed, and its config/data.

    Fusing keeps every random draw of building the model, so the weights agree exactly."""
    built = []
    for fused in ("false", "true"):
        cfg, _ = tiny_config(*PAIR, f"variant.method.fused={fused}", *overrides)
        torch.manual_seed(0)
        built.append(assemble(cfg, torch.device(device)))
    sequential, fused = (b.method.to(dtype) for b in built)
    fused_state, state = per_block_state(fused.state_dict()), sequential.state_dict()
    assert fused_state.keys() == state.keys()
    for name, value in state.items():
        assert torch.equal(fused_state[name], value), name
    return cfg, built[0], sequential, fused


@pytest.mark.parametrize("device", DEVICES)
def test_fused_step_gives_the_sequential_parameter_update(tiny_config, device):
    """One full training step (block step + head step, AdamW) from identical weights, the same
    minibatch and the same noise (seeded alike; both draw all z_{t-1} in one call) must leave
    identical parameters and BatchNorm running statistics.

    In float64: Adam's first step is lr * g / (|g| + eps), about lr * sign(g), so a parameter
    whose true gradient is zero (a bias just before a batch norm) moves by its rounding noise
    scaled up to as much as lr, and that noise differs between the two summation orders. In
    float32 such moves are O(lr) apart; in float64 the noise is ~1e-13 (gradients reach ~1e2
    here), so they stay within lr * 1e-13 / eps = 1e-8. The tolerance, 1e-7 = lr / 1e4, is far
    below the lr-sized move that any wrongly computed gradient entry would cause.
    """
    cfg, parts, sequential, fused = sequential_and_fused(
        tiny_config, device, "embedding=learned", dtype=torch.float64
    )
    x, y = parts.data.train_x[:32].double(), parts.data.train_y[:32]
    before = {k: v.clone() for k, v in sequential.state_dict().items()}
    losses = []
    for method in (sequential, fused):
        optimizer = make_optimizer(cfg.train, method)
        torch.manual_seed(1)
        losses.append(train_step(method, optimizer, x, y, "fp32")[0])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-10, atol=0)

    after = sequential.state_dict()
    fused_after = per_block_state(fused.state_dict())
    assert fused_after.keys() == after.keys()
    for name, value in after.items():
        torch.testing.assert_close(fused_after[name], value, rtol=0, atol=1e-7, msg=name)
    # The comparison has teeth: the step moved every block's weights and its running stats.
    for t in range(3):
        for name in (f"blocks.{t}.head.6.weight", f"blocks.{t}.head.1.running_mean"):
            assert (before[name] - after[name]).abs().max() > 1e-4, name
    assert after["blocks.0.head.1.num_batches_tracked"] == 1
    assert not torch.equal(before["embedding.weight"], after["embedding.weight"])


def test_each_term_reaches_only_its_own_slice_of_the_stack(tiny_config):
    _, parts, _, fused = sequential_and_fused(tiny_config, "cpu", "embedding=learned")
    fused.train()
    terms = fused.block_losses(parts.data.train_x[:16], parts.data.train_y[:16])
    stacked = list(fused.blocks.parameters())
    for t, term in enumerate(terms):
        grads = torch.autograd.grad(term, stacked, retain_graph=True)
        reached = torch.stack([g.flatten(1).abs().sum(1) > 0 for g in grads]).any(0)
        assert reached.tolist() == [b == t for b in range(3)], f"term {t + 1} reached {reached}"


@pytest.mark.parametrize("embedding", ["onehot", "prototype"])
def test_fused_losses_and_inference_match_the_sequential_model(tiny_config, embedding):
    """Training losses (train-mode batch norm) and inference (eval mode, through the per-block
    views of the stack) agree; `prototype` makes z image-shaped (grouped convs on z too)."""
    _, parts, sequential, fused = sequential_and_fused(tiny_config, "cpu", f"embedding={embedding}")
    x, y = parts.data.train_x[:16], parts.data.train_y[:16]
    losses = []
    for method in (sequential, fused):
        method.train()
        torch.manual_seed(3)
        losses.append(method.block_losses(x, y))
    torch.testing.assert_close(losses[0], losses[1])

    scores = []
    for method in (sequential, fused):
        method.eval()
        generator = torch.Generator().manual_seed(5)
        scores.append(method.trajectory(parts.data.test_x[:8], 3, parts.solver, generator))
    assert scores[0].shape == (4, 8, parts.data.num_classes)
    torch.testing.assert_close(scores[0], scores[1])


def test_stack_holds_the_blocks_weights_stacked():
    torch.manual_seed(0)
    blocks = [DTBlock(PaperCNN, (1, 8, 8), (5,), 4) for _ in range(2)]
    stack = DTStack(blocks)
    assert len(stack) == 2 and [view.index for view in stack] == [0, 1]
    for name, value in stack.state_dict().items():
        assert torch.equal(value, torch.stack([b.state_dict()[name] for b in blocks])), name


def test_fused_refuses_other_backbones_clearly(tiny_config):
    cfg, _ = tiny_config(
        "variant.method.fused=true", "variant.method.num_blocks=2", "backbone=resnet18"
    )
    with pytest.raises(ValueError, match=r"backbone=cnn.*variant\.method\.fused=false"):
        assemble(cfg, torch.device("cpu"))

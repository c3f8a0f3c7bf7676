"""NoProp-DT: each block learns by its own term alone, and inference never reads the label."""

from __future__ import annotations

import pytest
import torch

from noprop_exp.assemble import assemble
from noprop_exp.variants.dt import NoPropDT


@pytest.fixture
def dt(tiny_config):
    torch.manual_seed(0)
    cfg, _ = tiny_config("variant.method.num_blocks=4", "embedding=learned")
    return assemble(cfg, torch.device("cpu"))


def block_params(method: NoPropDT, index: int) -> list[torch.nn.Parameter]:
    return list(method.blocks[index].parameters())


def test_each_block_term_reaches_only_its_own_block(dt):
    method, data = dt.method, dt.data
    method.train()
    terms = method.block_losses(data.train_x[:32], data.train_y[:32])
    assert terms.shape == (4,)
    for t, term in enumerate(terms):
        for b in range(4):
            grads = torch.autograd.grad(
                term, block_params(method, b), retain_graph=True, allow_unused=True
            )
            reached = any(g is not None and g.abs().sum() > 0 for g in grads)
            assert reached == (b == t), f"term {t + 1} reached block {b + 1}: {reached}"


def test_no_block_consumes_another_blocks_output(dt):
    """The z fed to each block during training depends on no block's parameters."""
    method, data = dt.method, dt.data
    inputs = []
    hooks = [
        block.register_forward_pre_hook(lambda _, args: inputs.append(args[0]))
        for block in method.blocks
    ]
    method.train()
    next(iter(method.update_losses(data.train_x[:16], data.train_y[:16])))
    for hook in hooks:
        hook.remove()
    assert len(inputs) == 4
    every_block_param = [p for block in method.blocks for p in block.parameters()]
    for z in inputs:
        if not z.requires_grad:
            continue  # a fixed embedding: z is plain sampled noise around u_y
        grads = torch.autograd.grad(
            z.sum(), every_block_param, allow_unused=True, retain_graph=True
        )
        assert all(g is None for g in grads)


def test_fused_step_updates_every_block_and_the_head(dt):
    method, data = dt.method, dt.data
    before = {name: p.detach().clone() for name, p in method.named_parameters()}
    optimizer = torch.optim.AdamW(method.parameters(), lr=1e-3)
    losses = list(method.update_losses(data.train_x[:32], data.train_y[:32]))
    assert len(losses) == method.head_updates
    loss, diagnostics = losses[0]
    assert {f"loss/block_{t}" for t in range(1, 5)} <= diagnostics.keys()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    for b in range(4):
        name = f"blocks.{b}.head.6.weight"
        assert not torch.equal(before[name], dict(method.named_parameters())[name])
    assert not torch.equal(before["head.weight"], method.head.weight)


def test_head_steps_touch_only_the_head_and_embedding(dt):
    method, data = dt.method, dt.data
    losses = method.update_losses(data.train_x[:8], data.train_y[:8])
    next(losses)
    head_loss, _ = next(losses)
    head_loss.backward()
    for name, p in method.named_parameters():
        touched = p.grad is not None and p.grad.abs().sum() > 0
        assert touched == (name.startswith("head") or name.startswith("embedding")), name


def test_block_weights_are_positive_snr_increments(dt):
    """SNR must grow along the chain; a reversed schedule would make blocks ascend the loss."""
    weights = dt.method.block_weights
    ab = dt.method.alpha_bars.double()
    snr = ab / (1 - ab)
    expected = 4 / 2 * 0.1 * (snr[1:] - snr[:-1])
    assert torch.all(weights > 0)
    torch.testing.assert_close(weights.double(), expected, rtol=1e-5, atol=0)


def test_inference_never_reads_the_label(dt, monkeypatch):
    method, data = dt.method, dt.data

    def forbidden(*_args, **_kwargs):
        raise AssertionError("inference looked up a label's embedding")

    monkeypatch.setattr(method.embedding, "forward", forbidden)
    method.eval()
    generator = torch.Generator().manual_seed(0)
    scores = method.predict(data.test_x[:16], 4, dt.solver, generator)
    assert scores.shape == (16, data.num_classes)


def test_trajectory_has_one_readout_per_block(dt):
    method, data = dt.method, dt.data
    method.eval()
    trajectory = method.trajectory(data.test_x[:5], 4, dt.solver)
    assert trajectory.shape == (5, 5, data.num_classes)


def test_wrong_step_count_and_learned_schedule_are_rejected(dt, tiny_config):
    with pytest.raises(ValueError, match=r"eval\.steps"):
        dt.method.predict(dt.data.test_x[:2], 7, dt.solver)
    cfg, _ = tiny_config("noise_schedule=learned")
    with pytest.raises(ValueError, match="fixed noise schedule"):
        assemble(cfg, torch.device("cpu"))


class SavedActivations:
    """The bytes autograd holds for backward at once, at most: each saved tensor counts from
    when its op saves it until its graph is freed (by backward, or by being dropped)."""

    def __init__(self) -> None:
        self.alive = self.peak = 0

    def pack(self, tensor: torch.Tensor) -> Saved:
        return Saved(self, tensor)

    def unpack(self, saved: Saved) -> torch.Tensor:
        return saved.tensor


class Saved:
    def __init__(self, counter: SavedActivations, tensor: torch.Tensor) -> None:
        self.counter, self.tensor = counter, tensor
        self.size = tensor.numel() * tensor.element_size()
        counter.alive += self.size
        counter.peak = max(counter.peak, counter.alive)

    def __del__(self) -> None:
        self.counter.alive -= self.size


def main_step_gradients(method: NoPropDT, x, y) -> tuple[dict, dict, int]:
    """The gradients, diagnostics and peak of saved activations of the minibatch's main step,
    backpropagated as the training loop does."""
    from noprop_exp.distributed import ONE_PROCESS, SingleProcess
    from noprop_exp.train import backward

    method.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    counter = SavedActivations()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        loss, diagnostics = next(method.update_losses(x, y))
        total = backward(loss, SingleProcess(ONE_PROCESS, method), "fp32", x.device)
    grads = {name: p.grad.clone() for name, p in method.named_parameters() if p.grad is not None}
    return grads, {"total": total, **diagnostics}, counter.peak


def test_a_backward_per_block_gives_the_joint_gradients_and_holds_one_block_at_a_time(
    tiny_config,
):
    torch.manual_seed(0)
    cfg, _ = tiny_config("variant.method.num_blocks=6", "embedding=learned")
    parts = assemble(cfg, torch.device("cpu"))
    method, data = parts.method, parts.data
    x, y = data.train_x[:64], data.train_y[:64]
    method.train()
    joint_grads, joint_logged, joint_peak = main_step_gradients(method, x, y)
    method.backward = "per_block"
    grads, logged, peak = main_step_gradients(method, x, y)
    assert grads.keys() == joint_grads.keys()  # every block, the head and W
    for name in grads:
        torch.testing.assert_close(grads[name], joint_grads[name], rtol=1e-5, atol=1e-7)
    assert logged.keys() == joint_logged.keys()
    for name in logged:
        torch.testing.assert_close(logged[name], joint_logged[name])
    # Six blocks' activations at once against one block's (and the head's, which is tiny).
    assert peak < joint_peak / 4, (peak, joint_peak)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["variant.method.backward=blockwise"], "must be joint or per_block"),
        (["variant.method.backward=per_block", "variant.method.fused=true"], "fused=false"),
    ],
)
def test_a_backward_mode_that_cannot_work_is_refused(tiny_config, overrides, message):
    cfg, _ = tiny_config(*overrides)
    with pytest.raises(ValueError, match=message):
        assemble(cfg, torch.device("cpu"))

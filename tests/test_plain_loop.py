"""The plain PyTorch loops that `noprop-bench --vs-plain` measures the suite against: the same
maths as the suite's step, so the speed comparison compares like with like."""

from __future__ import annotations

import functools

import pytest
import torch

from noprop_exp import train
from noprop_exp.assemble import assemble, make_parts
from noprop_exp.bench import plain

CPU = torch.device("cpu")


def constant_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every Gaussian draw 0.5 and every uniform t a fixed spread over [0, 1): the suite and the
    plain loop draw in different orders and shapes, so only draws that do not depend on either
    make their steps comparable."""

    def normal(*shape, **kwargs):
        shape = shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape
        options = {k: kwargs[k] for k in ("device", "dtype") if k in kwargs}
        return torch.full(tuple(shape), 0.5, **options)

    def uniform(*shape, requires_grad=False, **kwargs):
        shape = shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape
        count = torch.Size(shape).numel()
        return (torch.arange(count) / count + 0.3 / count).view(shape).requires_grad_(requires_grad)

    monkeypatch.setattr(torch, "randn", normal)
    monkeypatch.setattr(torch, "randn_like", lambda like, **_: torch.full_like(like, 0.5))
    monkeypatch.setattr(torch, "rand", uniform)


def linear_adam(monkeypatch: pytest.MonkeyPatch) -> None:
    """Adam(W) with eps = 1: the update is then smooth in the gradient (with the default eps,
    Adam's first steps are about lr * sign(g), which turns last-bit differences of near-zero
    gradients into whole steps), so equal updates mean equal gradients."""
    for name in ("Adam", "AdamW"):
        monkeypatch.setattr(
            torch.optim, name, functools.partial(getattr(torch.optim, name), eps=1.0)
        )


@pytest.mark.parametrize("variant", ["dt", "ct", "fm"])
@pytest.mark.parametrize("embedding", ["onehot", "learned"])
def test_plain_step_is_the_suites_step(tiny_config, monkeypatch, variant, embedding):
    """From the same weights and draws, one plain step and one suite step (every optimiser step
    of the minibatch) give the same loss and the same weights after."""
    cfg, _ = tiny_config(
        f"variant={variant}",
        f"embedding={embedding}",
        "backbone.dropout=0",  # dropout's masks are drawn too
        "train.precision=fp32",
        "train.channels_last=false",
        "variant.method.head_updates=3" if variant != "fm" else "variant.method.loss_bins=1",
    )
    torch.manual_seed(0)
    linear_adam(monkeypatch)
    suite = assemble(cfg, CPU)
    loop = plain.plain_loop(cfg, make_parts(cfg, suite.data), CPU)
    missing, _ = loop.modules.load_state_dict(suite.method.state_dict(), strict=False)
    assert missing == []
    x, y = suite.data.train_x[:32], suite.data.train_y[:32]
    constant_draws(monkeypatch)
    before = {name: value.clone() for name, value in suite.method.state_dict().items()}

    suite.method.train()
    optimizer = train.make_optimizer(cfg.train, suite.method)
    suite_loss, _ = train.train_step(suite.method, optimizer, x, y, "fp32")
    plain_loss = loop.step(x, y)

    # rtol: the plain SNR is ab / (1 - ab), the suite's exp(-gamma) (exact near t = 1)
    torch.testing.assert_close(plain_loss, suite_loss, rtol=1e-4, atol=1e-6)
    updated = suite.method.state_dict()
    for name, value in loop.modules.state_dict().items():
        if value.is_floating_point():
            suite_update, plain_update = updated[name] - before[name], value - before[name]
            # 0.1% of the largest update, or a few ulps of the weights (what rounding leaves)
            ulps = 4 * torch.finfo(value.dtype).eps * before[name].abs().max().item()
            tolerance = 1e-3 * suite_update.abs().max().item() + ulps
            torch.testing.assert_close(plain_update, suite_update, rtol=0, atol=tolerance, msg=name)


def test_plain_loop_refuses_other_maths(tiny_config):
    cfg, _ = tiny_config("variant=ct", "variant.method.loss_weight=uniform")
    suite = assemble(cfg, CPU)
    with pytest.raises(ValueError, match="loss_weight"):
        plain.plain_loop(cfg, make_parts(cfg, suite.data), CPU)
    cfg, _ = tiny_config("variant=backprop")
    with pytest.raises(ValueError, match="no plain loop"):
        plain.plain_loop(cfg, make_parts(cfg, suite.data), CPU)

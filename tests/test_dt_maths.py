"""NoProp-DT against docs/NOPROP_SPEC.md §2, each formula recomputed here from the spec's text
(the cosine schedule, the Gaussian KL, the posterior step), not from the code's own buffers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from noprop_exp.assemble import assemble

T = 4
ALPHA_MIN, ALPHA_MAX, DELTA = 1e-4, 0.9999, 0.008


def spec_alpha_bar(k: int) -> float:
    """The spec's cosine schedule at s = k / T, clamped as conf/noise_schedule/cosine.yaml."""
    s = k / T
    value = math.cos((1 - s + DELTA) / (1 + DELTA) * math.pi / 2) ** 2
    return min(max(value, ALPHA_MIN), ALPHA_MAX)


@pytest.fixture
def dt(tiny_config):
    torch.manual_seed(0)
    cfg, _ = tiny_config(
        f"variant.method.num_blocks={T}",
        "variant.method.fused=false",
        "embedding=learned",
        "noise_schedule=cosine",
    )
    return assemble(cfg, torch.device("cpu"))


def test_block_t_learns_from_z_drawn_at_alpha_bar_of_t_minus_1(tiny_config):
    # One-hot rows: the component of z along u_y has mean sqrt(ab) and the others variance
    # 1 - ab, so each block's input tells which alpha_bar it was drawn at.
    torch.manual_seed(0)
    cfg, _ = tiny_config(f"variant.method.num_blocks={T}", "variant.method.fused=false")
    method, data = (part := assemble(cfg, torch.device("cpu"))).method, part.data
    inputs: list[torch.Tensor] = []
    hooks = [
        b.register_forward_pre_hook(lambda _, args: inputs.append(args[0])) for b in method.blocks
    ]
    n = 4096
    x = data.train_x[:1].expand(n, *data.train_x.shape[1:])
    y = torch.randint(0, data.num_classes, (n,))
    with torch.no_grad():
        method.block_losses(x, y)
    for hook in hooks:
        hook.remove()
    u_y = F.one_hot(y, data.num_classes).float()
    for t, z in enumerate(inputs, 1):
        signal = (z * u_y).sum(1)
        off_label_var = (z * (1 - u_y)).pow(2).sum(1).mean() / (data.num_classes - 1)
        ab = spec_alpha_bar(t - 1)
        assert signal.mean().item() == pytest.approx(math.sqrt(ab), abs=0.05), t
        assert off_label_var.item() == pytest.approx(1 - ab, rel=0.1), t


def test_head_loss_is_cross_entropy_at_z_T_plus_the_kl_at_z_0(dt):
    method, data = dt.method, dt.data
    y = data.train_y[:64]
    torch.manual_seed(7)
    got = method.head_loss(y)
    torch.manual_seed(7)  # the one draw head_loss makes: z_T's noise
    u_y = method.embedding(y)
    ab_T, ab_0 = spec_alpha_bar(T), spec_alpha_bar(0)
    z_T = math.sqrt(ab_T) * u_y + math.sqrt(1 - ab_T) * torch.randn(u_y.shape)
    logits = method.head(z_T)
    cross_entropy = -(logits.log_softmax(1).gather(1, y[:, None])).mean()
    # KL(N(m, s2 I) || N(0, I)) = 1/2 sum_i (s2 + m_i^2 - 1 - log s2), m = sqrt(ab_0) u_y.
    mean, var = math.sqrt(ab_0) * u_y, 1 - ab_0
    kl = 0.5 * (var + mean.pow(2) - 1 - math.log(var)).sum(1).mean()
    torch.testing.assert_close(got, cross_entropy + kl, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("deterministic", [True, False])
def test_inference_carries_z_t_minus_1_to_z_t_with_the_spec_posterior(
    dt, monkeypatch, deterministic
):
    """Each block's prediction u_hat is fixed here; z_t must then be the spec's posterior step
    a_t u_hat + b_t z_{t-1} (+ sqrt(c_t) noise) of (alpha_bar_{t-1}, alpha_bar_t)."""
    method, data = dt.method, dt.data
    dt.solver.deterministic = deterministic
    u_hat = torch.randn(method.embedding.z_shape)
    # Every block's softmax is mixed into W's rows: fixing the mix fixes each block's u_hat.
    z_shape = method.embedding.z_shape
    monkeypatch.setattr(method.embedding, "mix", lambda p: u_hat.expand(p.shape[0], *z_shape))
    latents: list[torch.Tensor] = []
    original_readout = method.readout
    monkeypatch.setattr(method, "readout", lambda z: latents.append(z) or original_readout(z))
    n = 20000
    method.eval()
    method.trajectory(data.test_x[:1].expand(n, *data.test_x.shape[1:]), T, dt.solver)
    assert len(latents) == T + 1  # z_0 .. z_T
    for t in range(1, T + 1):
        ab_prev, ab = spec_alpha_bar(t - 1), spec_alpha_bar(t)
        alpha_prev = ab_prev / ab
        a = math.sqrt(ab) * (1 - alpha_prev) / (1 - ab_prev)
        b = math.sqrt(alpha_prev) * (1 - ab) / (1 - ab_prev)
        c = (1 - ab) * (1 - alpha_prev) / (1 - ab_prev)
        residual = latents[t] - (a * u_hat + b * latents[t - 1])
        if deterministic:
            torch.testing.assert_close(residual, torch.zeros_like(residual), atol=1e-5, rtol=0)
        else:
            assert residual.mean().item() == pytest.approx(
                0, abs=4 * math.sqrt(c / residual.numel()) + 1e-6
            )
            assert residual.var().item() == pytest.approx(c, rel=0.05), t

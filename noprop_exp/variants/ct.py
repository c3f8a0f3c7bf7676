"""NoProp-CT (docs/NOPROP_SPEC.md §3): one network u_hat(z_t, x, t), trained at random t in
[0, 1]."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from noprop_exp.diffusion import (
    broadcast_time,
    kl_to_prior,
    probability_flow,
    sample_q,
    sample_times,
    snr,
    snr_prime,
    snr_range,
)
from noprop_exp.models.ct_net import CTNetwork
from noprop_exp.models.head import LinearHead
from noprop_exp.schedules import LearnedSchedule
from noprop_exp.solvers import Dynamics
from noprop_exp.variants.base import (
    ContinuousTimeMethod,
    Diagnostics,
    Parts,
    loss_by_time_bin,
    per_example_sq_error,
)

LOSS_WEIGHTS = ("snr_prime", "uniform")


class NoPropCT(ContinuousTimeMethod):
    """u_hat(z_t, x, t) = softmax(f(z_t, x, t)) @ W, a linear head p(y | z_1), the schedule and W.

    Loss per minibatch, with t drawn per example and z_t ~ q(z_t | y) (never a model output):
    (eta / 2) SNR'(t) ||u_hat - u_y||^2 + CE(head(z_1), y) + KL(q(z_0 | y) || N(0, I)).
    Every part (network, head, W, a learned schedule) is trained by this one loss; with
    `head_updates` > 1, head_updates - 1 further steps per minibatch train the head and W on the
    CE and KL terms alone, as NoProp-DT does (conf/variant/ct.yaml says why). Inference
    integrates from z_0 ~ N(0, I) with any solver (the PF-ODE gives euler/heun a velocity) and
    reads out argmax head(z_1).
    """

    name = "ct"

    def __init__(
        self,
        parts: Parts,
        eta: float = 1.0,
        head_updates: int = 10,
        t_sampling: str = "uniform",
        loss_weight: str = "snr_prime",
        loss_bins: int = 5,
        decay_schedule: bool = False,
        grad_norms: bool = False,
    ) -> None:
        super().__init__()
        if head_updates < 1:
            raise ValueError(f"variant.method.head_updates must be >= 1, got {head_updates}")
        if loss_bins < 1:
            raise ValueError(f"variant.method.loss_bins must be >= 1, got {loss_bins}")
        sample_times(1, t_sampling, torch.device("cpu"), parts.schedule)  # fail on a bad mode now
        if loss_weight not in LOSS_WEIGHTS:
            raise ValueError(
                f"variant.method.loss_weight must be one of {LOSS_WEIGHTS}, got {loss_weight!r}"
            )
        self.eta = eta
        self.loss_weight = loss_weight
        self.grad_norms = grad_norms
        self.head_updates = head_updates
        self.t_sampling = t_sampling
        self.loss_bins = loss_bins
        self.decay_schedule = decay_schedule
        self.embedding = parts.embedding
        self.schedule = parts.schedule
        self.z_shape = self.embedding.z_shape
        self.network = CTNetwork(parts.backbone, parts.image_shape, self.z_shape, parts.num_classes)
        self.head = LinearHead(self.embedding.dim, parts.num_classes)
        if isinstance(self.schedule, LearnedSchedule):
            # How far the schedule moves from where it started (diagnostics); not saved.
            initial = self.log_snr_on_grid(torch.device("cpu")).detach()
            self.register_buffer("initial_log_snr", initial, persistent=False)

    def log_snr_on_grid(self, device: torch.device) -> Tensor:
        """log SNR(t) at t = 0, 0.01, ..., 1."""
        return torch.log(snr(self.schedule, torch.linspace(0, 1, 101, device=device)))

    def denoise(self, z: Tensor, features: Tensor, t: Tensor) -> Tensor:
        """The predicted clean embedding: a convex mix of W's rows."""
        return self.embedding.mix(F.softmax(self.network.from_features(z, features, t), dim=1))

    def end_alpha_bars(self, device: torch.device) -> Tensor:
        """alpha_bar at t = 0 (for the KL term) and t = 1 (for the cross-entropy)."""
        return self.schedule.alpha_bar(torch.tensor([0.0, 1.0], device=device))

    def head_loss(self, y: Tensor, end_alpha_bars: Tensor) -> Tensor:
        """CE of the linear head on z_1 ~ q(z_1 | y), plus KL(q(z_0 | y) || N(0, I))."""
        u_y = self.embedding(y)
        z_1 = sample_q(u_y, end_alpha_bars[1])
        y, u_y, z_1 = self.own(y, u_y, z_1)
        return F.cross_entropy(self.readout(z_1), y) + kl_to_prior(u_y, end_alpha_bars[0]).mean()

    def optimizer_steps_per_minibatch(self) -> int:
        return self.head_updates

    def update_losses(self, x: Tensor, y: Tensor) -> Iterator[tuple[Tensor, Diagnostics]]:
        u_y = self.embedding(y)
        t = sample_times(len(y), self.t_sampling, x.device, self.schedule)
        z_t = sample_q(u_y, broadcast_time(self.schedule.alpha_bar(t), u_y))
        x, u_y, t, z_t = self.own(x, u_y, t, z_t)
        u_hat = self.denoise(z_t, self.network.image_features(x), t)
        weighted = self.eta / 2 * self.weight(t) * per_example_sq_error(u_hat, u_y)
        denoising = weighted.mean()
        head = self.head_loss(y, self.end_alpha_bars(x.device))
        diagnostics = {
            "loss/denoise": denoising.detach(),
            "loss/head": head.detach(),
            **loss_by_time_bin(t, weighted, self.loss_bins),
        }
        if self.grad_norms:
            diagnostics |= self.gradient_norms({"denoise": denoising, "head": head})
        yield denoising + head, diagnostics
        # Extra head steps (like DT's) train the head and W; the schedule's endpoints are held
        # fixed in them, so the schedule still sees the loss's own balance of its three terms.
        for _ in range(self.head_updates - 1):
            with torch.no_grad():
                end_alpha_bars = self.end_alpha_bars(x.device)
            yield self.head_loss(y, end_alpha_bars), {}

    def weight(self, t: Tensor) -> Tensor:
        """The denoising term's weight at the drawn t: SNR'(t) (the paper's; with importance-
        sampled t, divided by t's density), or 1 (`loss_weight: uniform`, ours: every t counts
        alike, as in FM). SNR' keeps its graph to a learned schedule's parameters: the weight
        trains it."""
        if self.loss_weight == "uniform":
            return torch.ones_like(t)
        weight = snr_prime(self.schedule, t)
        if self.t_sampling == "importance":
            density = weight.detach() / snr_range(self.schedule, t.device).detach()
            weight = weight / density
        return weight

    def gradient_norms(self, terms: dict[str, Tensor]) -> Diagnostics:
        """`grad_norm/<term>`: the norm of each loss term's gradient over every parameter, and
        over the learned schedule's alone (`grad_norm/<term>_schedule`). Costs a backward pass
        per term: for studies (`grad_norms: true`), not for speed."""
        params = [p for p in self.parameters() if p.requires_grad]
        on_schedule = {id(p) for p in self.schedule.parameters()}
        norms = {}
        for name, term in terms.items():
            grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
            squares = {
                id(p): g.detach().pow(2).sum()
                for g, p in zip(grads, params, strict=True)
                if g is not None
            }
            norms[f"grad_norm/{name}"] = torch.stack(list(squares.values())).sum().sqrt()
            if on_schedule:
                scheduled = [s for key, s in squares.items() if key in on_schedule]
                norms[f"grad_norm/{name}_schedule"] = sum(scheduled, torch.zeros(())).sqrt()
        return norms

    def dynamics(self, x: Tensor) -> Dynamics:
        features = self.network.image_features(x)

        def denoise(z: Tensor, t: Tensor) -> Tensor:
            return self.denoise(z, features, t)

        return Dynamics(
            velocity=probability_flow(denoise, self.schedule),
            denoise=denoise,
            alpha_bar=self.schedule.alpha_bar,
            source="variant ct",
        )

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """Weight decay would pull a learned schedule's gamma_0, gamma_1 towards each other and
        towards 0 (a narrower SNR range), so unless `decay_schedule` its parameters are exempt."""
        schedule = list(self.schedule.parameters())
        if self.decay_schedule or not schedule:
            return super().parameter_groups(weight_decay)
        exempt = {id(p) for p in schedule}
        rest = [p for p in self.parameters() if id(p) not in exempt]
        return [
            {"params": rest, "weight_decay": weight_decay},
            {"params": schedule, "weight_decay": 0.0},
        ]

    def diagnostics(self) -> dict[str, float]:
        """A learned schedule's endpoints: log-SNR runs from -gamma_1 (t = 0) to -gamma_0."""
        if not isinstance(self.schedule, LearnedSchedule):
            return {}
        with torch.no_grad():
            now = self.log_snr_on_grid(self.initial_log_snr.device)
            shift = (now - self.initial_log_snr).abs().mean()
        return {
            "schedule/gamma_0": self.schedule.gamma_0.item(),
            "schedule/gamma_1": self.schedule.gamma_1.item(),
            "schedule/log_snr_shift": shift.item(),  # mean |change| of log SNR over t
        }

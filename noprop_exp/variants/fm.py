"""NoProp-FM (docs/NOPROP_SPEC.md §4): flow matching from noise to the label embedding, given
the image."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from noprop_exp.diffusion import broadcast_time, sample_times
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


class NoPropFM(ContinuousTimeMethod):
    """v_hat(z_t, x, t) = f(z_t, x, t) @ W, the logits used as unrestricted weights on W's rows.

    Path z_t = t u_y + (1 - t) z_0 (+ sigma noise), z_0 ~ N(0, I); loss ||v_hat - (u_y - z_0)||^2,
    plus, when W is trainable, the anchor CE(head(z_t + (1 - t) v_hat), y) that keeps the rows of
    W apart (without it, collapsing W would zero the loss). No noise schedule, no KL. Inference
    integrates dz/dt = v_hat (euler or heun) and predicts the class whose embedding is nearest
    to z_1; the class scores are minus the squared distances to W's rows.
    """

    name = "fm"

    def __init__(
        self,
        parts: Parts,
        sigma: float = 0.0,
        t_sampling: str = "uniform",
        loss_bins: int = 5,
    ) -> None:
        super().__init__()
        if isinstance(parts.schedule, LearnedSchedule):
            raise ValueError(
                "variant=fm has no noise schedule (its path t u_y + (1 - t) z_0 is fixed), so a "
                "learned one would never be trained: leave noise_schedule at its default"
            )
        if sigma < 0:
            raise ValueError(f"variant.method.sigma must be >= 0, got {sigma}")
        if loss_bins < 1:
            raise ValueError(f"variant.method.loss_bins must be >= 1, got {loss_bins}")
        sample_times(1, t_sampling, torch.device("cpu"))  # fail on a bad mode now
        self.sigma = sigma
        self.t_sampling = t_sampling
        self.loss_bins = loss_bins
        self.embedding = parts.embedding
        self.z_shape = self.embedding.z_shape
        self.network = CTNetwork(parts.backbone, parts.image_shape, self.z_shape, parts.num_classes)
        # The anchor's linear head exists only where it is used: with a trainable W.
        self.head = (
            LinearHead(self.embedding.dim, parts.num_classes) if self.embedding.trainable else None
        )

    def velocity(self, z: Tensor, features: Tensor, t: Tensor) -> Tensor:
        return self.embedding.mix(self.network.from_features(z, features, t))

    def update_losses(self, x: Tensor, y: Tensor) -> Iterator[tuple[Tensor, Diagnostics]]:
        u_y = self.embedding(y)
        t = sample_times(len(y), self.t_sampling, x.device)
        t_z = broadcast_time(t, u_y)
        z_0 = torch.randn(u_y.shape, device=u_y.device)
        z_t = t_z * u_y + (1 - t_z) * z_0
        if self.sigma > 0:
            z_t = z_t + self.sigma * torch.randn(u_y.shape, device=u_y.device)
        x, y, u_y, t, t_z, z_0, z_t = self.own(x, y, u_y, t, t_z, z_0, z_t)
        v_hat = self.velocity(z_t, self.network.image_features(x), t)
        per_example = per_example_sq_error(v_hat, u_y - z_0)
        loss = per_example.mean()
        diagnostics = {
            "loss/velocity": loss.detach(),
            **loss_by_time_bin(t, per_example, self.loss_bins),
        }
        if self.head is not None:
            z_1_hat = z_t + (1 - t_z) * v_hat  # one Euler step to t = 1
            anchor = F.cross_entropy(self.head(z_1_hat), y)
            diagnostics["loss/anchor"] = anchor.detach()
            loss = loss + anchor
        yield loss, diagnostics

    def dynamics(self, x: Tensor) -> Dynamics:
        features = self.network.image_features(x)
        return Dynamics(velocity=lambda z, t: self.velocity(z, features, t), source="variant fm")

    def readout(self, z: Tensor) -> Tensor:
        """Minus the squared Euclidean distance from z to each row of W: argmax = nearest."""
        weight = self.embedding.weight
        return -torch.cdist(z.flatten(1).to(weight.dtype), weight).square()

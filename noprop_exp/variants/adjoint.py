"""The adjoint baseline (docs/NOPROP_SPEC.md §7): a neural ODE trained by the adjoint
sensitivity method.

dz/dt = f(z, x, t) on t in [0, 1] with NoProp-CT's network and no noise schedule; a linear head
reads the class off z_1, and one cross-entropy on it trains everything. torchdiffeq's
`odeint_adjoint` integrates the ODE without keeping a graph and gets the gradients by solving the
adjoint ODE backwards, so memory does not grow with the number of steps (1000 in the paper).
Both directions use the same fixed-step scheme, and inference integrates with it too.

The field is f = l @ W with l the network's logits, as NoProp-FM's velocity (docs/NOPROP_SPEC.md
§4): with one-hot W (the paper's adjoint runs) it is the network's output itself, so the
baseline differs from NoProp-CT/FM in how it is trained, not in what the network computes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from noprop_exp.diffusion import time_grid
from noprop_exp.models.ct_net import CTNetwork
from noprop_exp.models.head import LinearHead
from noprop_exp.solvers import Solver
from noprop_exp.variants.base import Diagnostics, Method, Parts, check_start, initial_latent

# torchdiffeq's fixed-grid Runge-Kutta methods: the step count is then a config value.
FIXED_STEP_METHODS = ("euler", "midpoint", "rk4")

GridConstructor = Callable[[object, Tensor, Tensor], Tensor]


def require_torchdiffeq() -> ModuleType:
    """The torchdiffeq module, or an ImportError that says how to install it."""
    try:
        import torchdiffeq
    except ImportError as error:
        raise ImportError(
            "variant=adjoint needs torchdiffeq, an optional dependency: pip install -e '.[adjoint]'"
        ) from error
    return torchdiffeq


def uniform_grid(steps: int) -> GridConstructor:
    """A torchdiffeq grid constructor: `steps` equal steps between the first and last requested
    time, in either direction (the adjoint pass integrates from 1 back to 0). Built from the
    endpoints rather than with torchdiffeq's `step_size`, whose rounding can add a step."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"the number of ODE steps must be an integer >= 1, got {steps!r}")

    def construct(_func: object, _y0: Tensor, t: Tensor) -> Tensor:
        fractions = torch.arange(steps + 1, dtype=t.dtype, device=t.device) / steps
        grid = t[0] + (t[-1] - t[0]) * fractions
        grid[-1] = t[-1]
        return grid

    return construct


class AdjointODE(Method):
    """Neural ODE z_0 -> z_1 with CT's network as the field, a linear head on z_1."""

    name = "adjoint"

    def __init__(
        self, parts: Parts, train_steps: int = 1000, ode_method: str = "euler", z0: str = "noise"
    ) -> None:
        super().__init__()
        require_torchdiffeq()  # fail when the run is assembled, not at the first batch
        if ode_method not in FIXED_STEP_METHODS:
            raise ValueError(
                f"variant.method.ode_method must be a fixed-step method, one of "
                f"{list(FIXED_STEP_METHODS)}; got {ode_method!r}"
            )
        uniform_grid(train_steps)  # checks the step count
        check_start(z0)
        self.train_steps = train_steps
        self.ode_method = ode_method
        self.z0 = z0
        self.embedding = parts.embedding
        self.network = CTNetwork(
            parts.backbone, parts.image_shape, self.embedding.z_shape, parts.num_classes
        )
        self.head = LinearHead(self.embedding.dim, parts.num_classes)

    def default_steps(self) -> int:
        return self.train_steps

    def field(self, features: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
        """dz/dt = logits(z, x, t) @ W, given the image features of x (computed once per solve)."""

        def velocity(t: Tensor, z: Tensor) -> Tensor:
            return self.embedding.mix(self.network.from_features(z, features, t))

        return velocity

    def field_parameters(self) -> list[Tensor]:
        """The trainable tensors the field reads directly: every parameter except the image
        branch's (W too, when trainable).

        The image branch is reached through `features` instead, which is handed to the adjoint
        as a parameter of its own: the adjoint pass returns dL/dfeatures and autograd carries it
        through the image branch once. Listing the image branch's parameters here as well would
        count that gradient twice and back-propagate through the CNN at every adjoint step.
        """
        image = {id(p) for p in self.network.image_branch.parameters()}
        own = [*self.network.parameters(), *self.embedding.parameters()]
        return [p for p in own if id(p) not in image]

    def start(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """The image features of x (once per solve) and z_0."""
        features = self.network.image_features(x)
        z0 = initial_latent(self.z0, x.shape[0], self.embedding.z_shape, features, generator)
        return features, z0

    def solve(
        self, features: Tensor, z0: Tensor, t0: Tensor, t1: Tensor, steps: int, adjoint: bool
    ) -> Tensor:
        """z at t1 from z0 at t0, in `steps` fixed steps of `ode_method`.

        With `adjoint`, gradients come from torchdiffeq's adjoint pass; without, from plain
        back-propagation through the same solver's steps (when grad is enabled).
        """
        torchdiffeq = require_torchdiffeq()
        times = torch.stack([t0, t1])
        solver = dict(method=self.ode_method, options={"grid_constructor": uniform_grid(steps)})
        if adjoint:
            # Outside autocast, in the weights' dtype: the adjoint pass re-runs the field in
            # backward, where autocast is off, and its gradients must be the forward solve's.
            features, z0 = (tensor.to(self.head.weight.dtype) for tensor in (features, z0))
            params = (features, *self.field_parameters())
            with torch.autocast(z0.device.type, enabled=False):
                states = torchdiffeq.odeint_adjoint(
                    self.field(features), z0, times, adjoint_params=params, **solver
                )
        else:
            states = torchdiffeq.odeint(self.field(features), z0, times, **solver)
        return states[-1]

    def terminal_state(
        self,
        x: Tensor,
        steps: int,
        adjoint: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """z_1 for images x, with gradients to every parameter when grad is enabled."""
        features, z0 = self.start(x, generator)
        zero, one = time_grid(1, z0.device, z0.dtype)
        return self.solve(features, z0, zero, one, steps, adjoint)

    def update_losses(self, x: Tensor, y: Tensor) -> Iterator[tuple[Tensor, Diagnostics]]:
        features = self.network.image_features(*self.own(x))
        # z_0 for the whole minibatch, then this process's share: what one process would draw.
        whole = initial_latent(self.z0, len(x), self.embedding.z_shape, features)
        (z0,), (y,) = self.own(whole), self.own(y)
        zero, one = time_grid(1, z0.device, z0.dtype)
        z1 = self.solve(features, z0, zero, one, self.train_steps, adjoint=True)
        yield F.cross_entropy(self.readout(z1), y), {}

    @torch.no_grad()
    def trajectory(
        self, x: Tensor, steps: int, solver: Solver, generator: torch.Generator | None = None
    ) -> Tensor:
        """Scores at t_k = k/steps, the grid `predict` steps on. `solver` is unused: the ODE is
        integrated with the training scheme, `ode_method`. One solve per step, so only the scores
        are kept, not 1000 z's."""
        features, z = self.start(x, generator)
        scores = [self.readout(z)]
        for t0, t1 in itertools.pairwise(time_grid(steps, z.device, z.dtype)):
            z = self.solve(features, z, t0, t1, 1, adjoint=False)
            scores.append(self.readout(z))
        return torch.stack(scores)

    @torch.no_grad()
    def predict(
        self, x: Tensor, steps: int, solver: Solver, generator: torch.Generator | None = None
    ) -> Tensor:
        """Scores of z_1, in one solve (no read-out at every step, as `trajectory` does)."""
        return self.readout(self.terminal_state(x, steps, generator=generator))

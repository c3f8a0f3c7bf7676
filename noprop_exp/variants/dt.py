"""NoProp-DT (docs/NOPROP_SPEC.md §2): T blocks, each learning on its own to denoise a noisy
label."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from noprop_exp.diffusion import discrete_alpha_bars, kl_to_prior, sample_q, snr, time_grid
from noprop_exp.models.dt_block import DTBlock
from noprop_exp.models.dt_stack import DTStack
from noprop_exp.models.head import LinearHead
from noprop_exp.schedules import LearnedSchedule
from noprop_exp.solvers import Dynamics, Solver
from noprop_exp.variants.base import Diagnostics, Loss, Method, Parts


class NoPropDT(Method):
    """T independent blocks u_hat_t(z_{t-1}, x), a shared linear head p(y | z_T) and embedding W.

    One training step updates every block once on the same minibatch: block t sees only
    z_{t-1} ~ q(z_{t-1} | y), never another block's output, and its loss term involves its own
    parameters only, so summing the terms before `backward` trains each block by its own term.

    `fused`: the T blocks live in one `DTStack` and one forward computes all their logits
    (grouped convolutions, batched matmuls) instead of T block forwards in turn. Same maths, same
    random draws; backbone=cnn only. `blocks[t]` is then a view of block t of the stack.

    `backward`: `joint` backpropagates the sum of the T terms at once; `per_block` (ours) each
    block's term as soon as it is computed, so only one block's activations are held at a time
    and training memory does not grow with T (the paper's Table 2). Same gradients, same draws.
    """

    name = "dt"
    step_unit = "block"

    def __init__(
        self,
        parts: Parts,
        num_blocks: int = 10,
        eta: float = 0.1,
        head_updates: int = 10,
        fused: bool = False,
        backward: str = "joint",
    ) -> None:
        super().__init__()
        if backward not in ("joint", "per_block"):
            raise ValueError(
                f"variant.method.backward must be joint or per_block, got {backward!r}"
            )
        if fused and backward == "per_block":
            raise ValueError(
                "variant.method.backward=per_block computes the blocks one by one, which the "
                "fused stack exists to avoid: use variant.method.fused=false with it"
            )
        if isinstance(parts.schedule, LearnedSchedule):
            raise ValueError(
                "variant=dt uses a fixed noise schedule: choose noise_schedule=cosine or linear"
            )
        if head_updates < 1:
            raise ValueError(f"variant.head_updates must be >= 1, got {head_updates}")
        self.num_blocks = num_blocks
        self.eta = eta
        self.head_updates = head_updates
        self.embedding = parts.embedding
        self.schedule = parts.schedule
        self.fused = fused
        self.backward = backward
        blocks = [
            DTBlock(parts.backbone, parts.image_shape, self.embedding.z_shape, parts.num_classes)
            for _ in range(num_blocks)
        ]
        self.blocks = DTStack(blocks) if fused else nn.ModuleList(blocks)
        self.head = LinearHead(self.embedding.dim, parts.num_classes)
        alpha_bars = discrete_alpha_bars(parts.schedule, num_blocks).detach()
        self.register_buffer("alpha_bars", alpha_bars)
        snrs = snr(parts.schedule, time_grid(num_blocks, alpha_bars.device))
        # (T/2) * eta * (SNR(t) - SNR(t-1)) of Algorithm 1, one weight per block.
        self.register_buffer("block_weights", num_blocks / 2 * eta * (snrs[1:] - snrs[:-1]))
        # What this process trains: every block and the whole head loss, unless block-parallel
        # training (distributed.py) gives it a share (`own_blocks`).
        self.owned, self.head_share = range(num_blocks), 1.0

    def own_blocks(self, blocks: range, head_share: float) -> None:
        """Train only `blocks` (0-based) and `head_share` of the head loss (block-parallel)."""
        self.owned, self.head_share = blocks, head_share

    def shared_parameters(self) -> list[nn.Parameter]:
        """What every block's process trains: the head, and W when it is learned."""
        return [*self.head.parameters(), *self.embedding.parameters()]

    def default_steps(self) -> int:
        return self.num_blocks

    def block_noise(self, u_y: Tensor) -> Tensor:
        """The standard normal draws of z_{t-1} ~ q(z_{t-1} | y) for every block t, at once:
        (T, B, *z_shape); drawn for all T even when this process trains a share, so that all
        processes, and both backward modes, draw alike."""
        return torch.randn((self.num_blocks, *u_y.shape), device=u_y.device, dtype=u_y.dtype)

    def block_losses(self, x: Tensor, y: Tensor) -> Tensor:
        """The denoising terms of the blocks trained here (all T, unless block-parallel); term
        t depends on block t's parameters (and W) only."""
        u_y = self.embedding(y)
        alpha_bar = self.alpha_bars[:-1].view(-1, *[1] * u_y.dim())
        z_prev = sample_q(u_y, alpha_bar, noise=self.block_noise(u_y))
        if self.fused:
            logits = self.blocks(z_prev, x)
        else:
            z_prev = z_prev[self.owned.start : self.owned.stop]
            logits = torch.stack(
                [self.blocks[t](z, x) for t, z in zip(self.owned, z_prev, strict=True)]
            )
        u_hat = self.embedding.mix(F.softmax(logits, dim=-1).flatten(0, 1)).view_as(z_prev)
        errors = (u_hat - u_y).flatten(2).pow(2).sum(2)  # (T, B): ||u_hat_t - u_y||^2
        return self.block_weights[self.owned.start : self.owned.stop] * errors.mean(1)

    def block_terms(self, x: Tensor, y: Tensor, diagnostics: Diagnostics) -> Iterator[Tensor]:
        """`block_losses` one block at a time, then the head loss: the terms of the main loss
        for `backward=per_block`. Each term embeds y afresh, since the previous term's backward
        freed its graph; each is recorded in `diagnostics` as it is computed."""
        noise = self.block_noise(self.embedding(y).detach())
        for t in self.owned:
            u_y = self.embedding(y)
            z_prev = sample_q(u_y, self.alpha_bars[t], noise=noise[t])
            u_hat = self.embedding.mix(F.softmax(self.blocks[t](z_prev, x), dim=-1))
            term = self.block_weights[t] * (u_hat - u_y).flatten(1).pow(2).sum(1).mean()
            diagnostics[f"loss/block_{t + 1}"] = term.detach()
            yield term
        head = self.head_share * self.head_loss(y)
        diagnostics["loss/head"] = head.detach()
        yield head

    def head_loss(self, y: Tensor) -> Tensor:
        """Cross-entropy of the linear head on z_T ~ q(z_T | y), plus the KL term."""
        u_y = self.embedding(y)
        z_last = sample_q(u_y, self.alpha_bars[-1])
        cross_entropy = F.cross_entropy(self.readout(z_last), y)
        return cross_entropy + kl_to_prior(u_y, self.alpha_bars[0]).mean()

    def optimizer_steps_per_minibatch(self) -> int:
        return self.head_updates

    def update_losses(self, x: Tensor, y: Tensor) -> Iterator[tuple[Loss, Diagnostics]]:
        if self.backward == "per_block":
            diagnostics: Diagnostics = {}
            yield self.block_terms(x, y, diagnostics), diagnostics
        else:
            blocks = self.block_losses(x, y)
            head = self.head_share * self.head_loss(y)
            diagnostics = {
                f"loss/block_{t + 1}": term.detach()
                for t, term in zip(self.owned, blocks, strict=True)
            }
            diagnostics["loss/head"] = head.detach()
            yield blocks.sum() + head, diagnostics
        # Algorithm 1 updates the head with every block; these steps keep that ratio cheaply.
        for _ in range(self.head_updates - 1):
            yield self.head_share * self.head_loss(y), {}

    @torch.no_grad()
    def trajectory(
        self, x: Tensor, steps: int, solver: Solver, generator: torch.Generator | None = None
    ) -> Tensor:
        return self._chain(x, steps, solver, generator)

    def _chain(
        self,
        x: Tensor,
        steps: int,
        solver: Solver,
        generator: torch.Generator | None,
        observe: Callable[[int, Tensor, Tensor], None] | None = None,
    ) -> Tensor:
        """The inference chain's read-outs at every step. `observe(t, features, logits)`, when
        given, sees each call of block t (0-based): its image features and its logits."""
        if steps != self.num_blocks:
            raise ValueError(
                f"variant=dt infers with its {self.num_blocks} blocks: set eval.steps=null "
                f"or {self.num_blocks} (got {steps})"
            )
        grid = time_grid(steps, x.device)
        solver = solver.fresh()
        z = torch.randn((x.shape[0], *self.embedding.z_shape), device=x.device, generator=generator)
        scores = [self.readout(z)]
        for t, block in enumerate(self.blocks):
            features = block.image_features(x)

            def denoise(
                z: Tensor,
                _: Tensor,
                t: int = t,
                block: nn.Module = block,
                features: Tensor = features,
            ) -> Tensor:
                """Block t+1 predicts the clean embedding as a convex mix of W's rows."""
                logits = block.from_features(z, features)
                if observe is not None:
                    observe(t, features, logits)
                return self.embedding.mix(F.softmax(logits, dim=1))

            # Block t+1 carries z_t to z_{t+1}: the solver sees it as the denoiser of that step.
            dynamics = Dynamics(
                denoise=denoise, alpha_bar=self.schedule.alpha_bar, source="variant dt"
            )
            z = solver.step(dynamics, z, grid[t], grid[t + 1], generator)
            scores.append(self.readout(z))
        return torch.stack(scores)

    @torch.no_grad()
    def inference_diagnostics(
        self,
        x: Tensor,
        y: Tensor,
        steps: int,
        solver: Solver,
        generator: torch.Generator | None = None,
        check_generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The trajectory, and each block's own argmax (T, B) against y:
        `block_acc_chain` given z_{t-1} from the inference chain, `block_acc_q` given
        z_{t-1} ~ q(z_{t-1} | y) as in training, and `last_block_noise_acc` (1, B): block T given
        z ~ N(0, I) (is it a plain classifier of x?). The q draws use the labels: they check how
        each block was trained, not inference."""
        # The chain itself reports what each block saw, so the chain checked is exactly the one
        # `trajectory` runs, whatever the solver, and the checks reuse its image features (the
        # bulk of a block's cost).
        features: list[Tensor | None] = [None] * self.num_blocks
        calls: list[list[Tensor]] = [[] for _ in range(self.num_blocks)]

        def observe(t: int, block_features: Tensor, logits: Tensor) -> None:
            features[t] = block_features
            calls[t].append(logits)

        scores = self._chain(x, steps, solver, generator, observe)
        if any(len(c) != 1 for c in calls):
            raise RuntimeError(
                "the per-block checks expect each DT block to be called once per inference "
                f"step; calls per block were {[len(c) for c in calls]}"
            )
        u_y = self.embedding(y)
        chain = torch.stack([c[0].argmax(-1) == y for c in calls])
        q = torch.stack(
            [
                block.from_features(sample_q(u_y, self.alpha_bars[t], check_generator), features[t])
                .argmax(-1)
                .eq(y)
                for t, block in enumerate(self.blocks)
            ]
        )
        noise = torch.randn(u_y.shape, device=x.device, generator=check_generator)
        last_on_noise = self.blocks[-1].from_features(noise, features[-1]).argmax(-1) == y
        checks = {
            "block_acc_chain": chain,
            "block_acc_q": q,
            "last_block_noise_acc": last_on_noise.unsqueeze(0),
        }
        return scores, checks

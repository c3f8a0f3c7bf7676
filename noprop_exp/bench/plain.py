"""The yardstick of `noprop-bench --vs-plain`: each NoProp variant's training step as a
researcher would write it by hand in plain PyTorch, for the same model, batch and updates.

What "plain" means here: the suite's own networks (so the model is the same, parameter for
parameter), built from the same config; the step's maths written out inline from the spec
(docs/NOPROP_SPEC.md §2-4); fp32, PyTorch's default memory layout and optimiser implementation
(`torch.optim.Adam(W)` as constructed by default), no autocast, no compile, one Python loop over
DT's blocks. The loss is the paper's: one-hot or learned W, the config's schedule, `eta`,
`head_updates`, lr and weight decay. Diagnostics the suite logs (per-block and per-t-bin losses)
are not computed: a hand-written loop would not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from noprop_exp.models.ct_net import CTNetwork
from noprop_exp.models.dt_block import DTBlock
from noprop_exp.models.head import LinearHead
from noprop_exp.variants.base import Parts

VARIANTS = ("dt", "ct", "fm")


@dataclass
class PlainLoop:
    """`step(x, y)` trains `modules` on a minibatch and returns its main loss (detached).
    The modules are named as in the suite's method, so its state dict loads into them."""

    modules: nn.ModuleDict
    step: Callable[[Tensor, Tensor], Tensor]


def plain_loop(cfg: DictConfig, parts: Parts, device: torch.device) -> PlainLoop:
    """A training step of `cfg.variant.name` in plain PyTorch (see the module)."""
    builders = {"dt": _dt_loop, "ct": _ct_loop, "fm": _fm_loop}
    if cfg.variant.name not in builders:
        raise ValueError(f"no plain loop for variant={cfg.variant.name}; one of {list(VARIANTS)}")
    if len(parts.embedding.z_shape) != 1:
        raise ValueError("the plain loops take vector label embeddings (onehot, learned) only")
    method = cfg.variant.method
    paper = {"t_sampling": "uniform", "loss_weight": "snr_prime", "sigma": 0.0}
    changed = {k: method[k] for k, v in paper.items() if k in method and method[k] != v}
    if changed:
        raise ValueError(f"the plain loops do the paper's maths only; set back {changed}")
    return builders[cfg.variant.name](cfg, parts, device)


def _optimizer(cfg: DictConfig, modules: nn.ModuleDict) -> torch.optim.Optimizer:
    """Adam(W) as constructed by default; like the suite, no weight decay on a learned
    schedule (it would pull its endpoints together)."""
    kind = torch.optim.AdamW if cfg.train.optimizer == "adamw" else torch.optim.Adam
    schedule = list(modules["schedule"].parameters()) if "schedule" in modules else []
    rest = [p for name, m in modules.items() if name != "schedule" for p in m.parameters()]
    groups = [{"params": rest}, {"params": schedule, "weight_decay": 0.0}]
    return kind(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def _noisy(u_y: Tensor, alpha_bar: Tensor) -> Tensor:
    return alpha_bar.sqrt() * u_y + (1 - alpha_bar).sqrt() * torch.randn_like(u_y)


def _kl(u_y: Tensor, alpha_bar_0: Tensor) -> Tensor:
    d = u_y.shape[1]
    norm = u_y.pow(2).sum(1)
    return 0.5 * (alpha_bar_0 * norm - d * alpha_bar_0 - d * torch.log(1 - alpha_bar_0)).mean()


def _ct_network(parts: Parts) -> CTNetwork:
    return CTNetwork(parts.backbone, parts.image_shape, parts.embedding.z_shape, parts.num_classes)


def _dt_loop(cfg: DictConfig, parts: Parts, device: torch.device) -> PlainLoop:
    method = cfg.variant.method
    blocks = [
        DTBlock(parts.backbone, parts.image_shape, parts.embedding.z_shape, parts.num_classes)
        for _ in range(method.num_blocks)
    ]
    modules = nn.ModuleDict(
        {
            "blocks": nn.ModuleList(blocks),
            "head": LinearHead(parts.embedding.dim, parts.num_classes),
            "embedding": parts.embedding,
        }
    ).to(device)
    blocks, head, embedding = modules["blocks"], modules["head"], modules["embedding"]
    optimizer = _optimizer(cfg, modules)
    steps = method.num_blocks
    with torch.no_grad():
        times = torch.arange(steps + 1, device=device) / steps
        alpha_bar = parts.schedule.to(device).alpha_bar(times)
    snr = alpha_bar / (1 - alpha_bar)

    def head_loss(u_y: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(head(_noisy(u_y, alpha_bar[-1])), y) + _kl(u_y, alpha_bar[0])

    def step(x: Tensor, y: Tensor) -> Tensor:
        u_y = embedding(y)
        loss = head_loss(u_y, y)
        for t in range(1, steps + 1):
            z = _noisy(u_y, alpha_bar[t - 1])
            u_hat = F.softmax(blocks[t - 1](z, x), dim=1) @ embedding.weight
            weight = steps / 2 * method.eta * (snr[t] - snr[t - 1])
            loss = loss + weight * (u_hat - u_y).pow(2).sum(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for _ in range(method.head_updates - 1):
            optimizer.zero_grad()
            head_loss(embedding(y), y).backward()
            optimizer.step()
        return loss.detach()

    return PlainLoop(modules, step)


def _ct_loop(cfg: DictConfig, parts: Parts, device: torch.device) -> PlainLoop:
    method = cfg.variant.method
    modules = nn.ModuleDict(
        {
            "network": _ct_network(parts),
            "head": LinearHead(parts.embedding.dim, parts.num_classes),
            "embedding": parts.embedding,
            "schedule": parts.schedule,
        }
    ).to(device)
    network, head = modules["network"], modules["head"]
    embedding, schedule = modules["embedding"], modules["schedule"]
    optimizer = _optimizer(cfg, modules)
    ends = torch.tensor([0.0, 1.0], device=device)

    def head_loss(u_y: Tensor, y: Tensor, ends: Tensor) -> Tensor:
        return F.cross_entropy(head(_noisy(u_y, ends[1])), y) + _kl(u_y, ends[0])

    def step(x: Tensor, y: Tensor) -> Tensor:
        u_y = embedding(y)
        t = torch.rand(len(y), device=device, requires_grad=True)
        alpha_bar = schedule.alpha_bar(t)
        snr = alpha_bar / (1 - alpha_bar)
        (snr_prime,) = torch.autograd.grad(snr.sum(), t, create_graph=True)
        z_t = _noisy(u_y, alpha_bar[:, None])
        u_hat = F.softmax(network(z_t, x, t.detach()), dim=1) @ embedding.weight
        loss = (method.eta / 2 * snr_prime * (u_hat - u_y).pow(2).sum(1)).mean()
        loss = loss + head_loss(u_y, y, schedule.alpha_bar(ends))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for _ in range(method.head_updates - 1):  # the suite's extra head steps
            with torch.no_grad():  # which hold the schedule's endpoints fixed
                fixed_ends = schedule.alpha_bar(ends)
            optimizer.zero_grad()
            head_loss(embedding(y), y, fixed_ends).backward()
            optimizer.step()
        return loss.detach()

    return PlainLoop(modules, step)


def _fm_loop(cfg: DictConfig, parts: Parts, device: torch.device) -> PlainLoop:
    modules = nn.ModuleDict({"network": _ct_network(parts), "embedding": parts.embedding})
    if parts.embedding.trainable:  # the anchor CE that keeps a learned W's rows apart
        modules["head"] = LinearHead(parts.embedding.dim, parts.num_classes)
    modules.to(device)
    network, embedding = modules["network"], modules["embedding"]
    anchor = getattr(modules, "head", None)
    optimizer = _optimizer(cfg, modules)

    def step(x: Tensor, y: Tensor) -> Tensor:
        u_y = embedding(y)
        t = torch.rand(len(y), device=device)
        z_0 = torch.randn_like(u_y)
        z_t = t[:, None] * u_y + (1 - t[:, None]) * z_0
        v_hat = network(z_t, x, t) @ embedding.weight
        loss = (v_hat - (u_y - z_0)).pow(2).sum(1).mean()
        if anchor is not None:
            loss = loss + F.cross_entropy(anchor(z_t + (1 - t[:, None]) * v_hat), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.detach()

    return PlainLoop(modules, step)

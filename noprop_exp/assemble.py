"""Config -> the objects of a run: data on the device, the method, the inference solver."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from noprop_exp.data import DataSplits
from noprop_exp.solvers import Solver
from noprop_exp.variants.base import Method, Parts


@dataclass
class Assembled:
    data: DataSplits
    method: Method
    solver: Solver


def resolve_device(choice: str) -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without it is an error, not a fallback."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no CUDA device is visible: use device=cpu or auto")
    return torch.device(choice)


def assemble(cfg: DictConfig, device: torch.device) -> Assembled:
    data = instantiate(cfg.dataset)(device=device)
    parts = Parts(
        backbone=instantiate(cfg.backbone),
        schedule=instantiate(cfg.noise_schedule),
        embedding=instantiate(cfg.embedding)(data),
        image_shape=data.image_shape,
        num_classes=data.num_classes,
    )
    method = instantiate(cfg.variant.method)(parts).to(device)
    return Assembled(data, method, instantiate(cfg.solver))

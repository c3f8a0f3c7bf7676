"""Config -> the objects of a run: data on the device, the method, the inference solver."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

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


def make_parts(cfg: DictConfig, data: DataSplits) -> Parts:
    """Fresh building blocks of a method (each call its own schedule and embedding)."""
    return Parts(
        backbone=instantiate(cfg.backbone),
        schedule=instantiate(cfg.noise_schedule),
        embedding=instantiate(cfg.embedding)(data),
        image_shape=data.image_shape,
        num_classes=data.num_classes,
    )


def build_method(cfg: DictConfig, data: DataSplits, device: torch.device) -> Method:
    """The configured method for `data`, on `device`, in the configured memory layout."""
    method = instantiate(cfg.variant.method)(make_parts(cfg, data)).to(device)
    if cfg.train.get("channels_last", False):  # absent from runs logged before it existed
        # Each convolution's weight in NHWC makes it return NHWC activations whatever x's
        # layout. (DT's fused stack keeps its 5-d weights as they are.)
        for module in method.modules():
            if isinstance(module, nn.Conv2d):
                module.to(memory_format=torch.channels_last)
    return method


def assemble(cfg: DictConfig, device: torch.device) -> Assembled:
    data = instantiate(cfg.dataset)(device=device)
    return Assembled(data, build_method(cfg, data, device), instantiate(cfg.solver))

"""`noprop-bench --vs-plain`: the suite's training step against a hand-written plain PyTorch loop
of the same maths (`bench/plain.py`), measured side by side in one process.

Three steps per variant, each with its own copy of the model and optimiser, built from the same
config: the plain loop; the suite's step with its speed switches off (`train.precision=fp32
train.channels_last=false`, and the paper CNN's `backbone.dropout_masks=bernoulli`: the maths as
the plain loop does it, with the suite's own machinery); and the suite's step as configured (its
defaults plus `--override`s). The plain loop's networks are built as the switches-off step's, so
they use PyTorch's own dropout, as a hand-written loop would. They take turns on the same
minibatches, `--train-steps` each per round for `--rounds` rounds, so that a shared CPU's load
falls on all three alike; each figure is the median over the rounds, and the speedups are ratios
of those medians.

`--vs-step NAME=FILE.py:FUNCTION` adds another implementation to the turns, e.g. a public
re-implementation's own training step: FUNCTION(cfg, device) returns a step(x, y) that trains on
the suite's minibatch (normalised images and labels on the device), and its images/s and the
suite's speedup over it join the row (`<NAME>_img_s`, `suite_vs_<NAME>`).
"""

from __future__ import annotations

import importlib
import importlib.util
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import Tensor

from noprop_exp.assemble import Assembled, assemble, build_method, make_parts, resolve_device
from noprop_exp.bench import measure, plain
from noprop_exp.config import Device, compose
from noprop_exp.precision import precision_on

SWITCHES_OFF = ("train.precision=fp32", "train.channels_last=false")
# What `--vs-step` names: FUNCTION(cfg, device) -> step(x, y), trained on the suite's minibatches.
StepFactory = Callable[[DictConfig, torch.device], Callable[[Tensor, Tensor], object]]
STEP_FORM = "NAME=FILE.py:FUNCTION (or NAME=MODULE:FUNCTION), e.g. seed=seed_step.py:make_step"


def switches_off_overrides(cfg: DictConfig) -> list[str]:
    """The overrides that turn the suite's speed switches off for `cfg`'s backbone."""
    return [
        *SWITCHES_OFF,
        *(["backbone.dropout_masks=bernoulli"] if "dropout_masks" in cfg.backbone else []),
    ]


def load_step_factory(spec: str) -> tuple[str, StepFactory]:
    """The name and factory of a `--vs-step` option, or a ValueError that says what to fix."""
    name, _, target = spec.partition("=")
    source, _, function = target.rpartition(":")
    if not name.isidentifier() or not source or not function:
        raise ValueError(f"--vs-step takes {STEP_FORM}; got {spec!r}")
    if name in ("plain", "suite", "suite_fp32"):
        raise ValueError(f"--vs-step name {name!r} is taken by a column of its own: pick another")
    if source.endswith(".py"):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"--vs-step {name}: no file {path.resolve()}")
        # as `python FILE.py` would, so the file can import its neighbours (e.g. the code it times)
        folder = str(path.parent.resolve())
        if folder not in sys.path:
            sys.path.insert(0, folder)
        module_spec = importlib.util.spec_from_file_location(f"vs_step_{name}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(source)
    factory = getattr(module, function, None)
    if not callable(factory):
        raise ValueError(f"--vs-step {name}: {source} defines no function {function!r}")
    return name, factory


def versus_plain(
    overrides: Sequence[str],
    rounds: int,
    warmup: int,
    steps: int,
    others: Mapping[str, StepFactory] | None = None,
) -> dict[str, float | str]:
    """One variant's row: images/s of the three steps (and of `others`, each built by its
    factory from the variant's config) and the suite's speedups over plain and over each other."""
    cfg, _ = compose(overrides)
    device = resolve_device(Device(cfg.device).value)
    torch.manual_seed(cfg.seed)
    configured = assemble(cfg, device)
    data = configured.data
    off_cfg, _ = compose([*overrides, *switches_off_overrides(cfg)])
    switches_off = Assembled(data, build_method(off_cfg, data, device), configured.solver)
    steps_by_name = {
        "plain": plain.plain_loop(off_cfg, make_parts(off_cfg, data), device).step,
        "suite_fp32": measure.suite_step(switches_off, off_cfg),
        "suite": measure.suite_step(configured, cfg),
    }
    for name, factory in (others or {}).items():
        steps_by_name[name] = factory(cfg, device)
    batches = measure.endless_batches(configured, cfg.train.batch_size, cfg.seed)
    for step in steps_by_name.values():
        for _ in range(warmup):
            step(*next(batches))
    figures: dict[str, list[float]] = {name: [] for name in steps_by_name}
    for _ in range(rounds):
        for name, step in steps_by_name.items():
            figures[name].append(measure.step_throughput(step, batches, steps, device))
    median = {name: statistics.median(values) for name, values in figures.items()}
    return {
        **{f"{name}_img_s": value for name, value in median.items()},
        "suite_fp32_vs_plain": median["suite_fp32"] / median["plain"],
        "suite_vs_plain": median["suite"] / median["plain"],
        **{f"suite_vs_{name}": median["suite"] / median[name] for name in others or {}},
        "precision": precision_on(cfg.train.precision, device).value,
        "channels_last": cfg.train.channels_last,
        "spread": "; ".join(f"{name} {min(v):.0f}-{max(v):.0f}" for name, v in figures.items()),
    }

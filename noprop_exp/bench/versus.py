"""`noprop-bench --vs-plain`: the suite's training step against a hand-written plain PyTorch loop
of the same maths (`bench/plain.py`), measured side by side in one process.

Three steps per variant, each with its own copy of the model and optimiser, built from the same
config: the plain loop; the suite's step in fp32 with the default layout (`train.precision=fp32
train.channels_last=false`: the maths as the plain loop does it, with the suite's own machinery);
and the suite's step as configured (its defaults plus `--override`s). They take turns on the same
minibatches, `--train-steps` each per round for `--rounds` rounds, so that a shared CPU's load
falls on all three alike; each figure is the median over the rounds, and the speedups are ratios
of those medians.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch

from noprop_exp.assemble import Assembled, assemble, build_method, make_parts, resolve_device
from noprop_exp.bench import measure, plain
from noprop_exp.config import Device, compose
from noprop_exp.precision import precision_on

SWITCHES_OFF = ("train.precision=fp32", "train.channels_last=false")


def versus_plain(
    overrides: Sequence[str], rounds: int, warmup: int, steps: int
) -> dict[str, float | str]:
    """One variant's row: images/s of the three steps and the suite's speedups over plain."""
    cfg, _ = compose(overrides)
    device = resolve_device(Device(cfg.device).value)
    torch.manual_seed(cfg.seed)
    configured = assemble(cfg, device)
    data = configured.data
    off_cfg, _ = compose([*overrides, *SWITCHES_OFF])
    switches_off = Assembled(data, build_method(off_cfg, data, device), configured.solver)
    steps_by_name = {
        "plain": plain.plain_loop(cfg, make_parts(cfg, data), device).step,
        "suite_fp32": measure.suite_step(switches_off, off_cfg),
        "suite": measure.suite_step(configured, cfg),
    }
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
        "plain_img_s": median["plain"],
        "suite_fp32_img_s": median["suite_fp32"],
        "suite_img_s": median["suite"],
        "suite_fp32_vs_plain": median["suite_fp32"] / median["plain"],
        "suite_vs_plain": median["suite"] / median["plain"],
        "precision": precision_on(cfg.train.precision, device).value,
        "channels_last": cfg.train.channels_last,
        "spread": "; ".join(f"{name} {min(v):.0f}-{max(v):.0f}" for name, v in figures.items()),
    }

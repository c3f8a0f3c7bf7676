"""Test-set accuracy of a trained method, and re-building a logged run's model from MLflow.

Inference goes through `Method.predict`, which takes images only: labels are used after the
prediction, to count hits. `accuracy_on_split` is the one evaluation every command makes (training,
`noprop-eval`, `noprop-pictures`): the `eval` config section says how.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from dataclasses import dataclass

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from tqdm import tqdm

from noprop_exp.assemble import Assembled, assemble, resolve_device
from noprop_exp.cli import (
    WEIGHTS,
    UserError,
    add_tracking_uri,
    open_store,
    run_command,
    run_with_weights,
)
from noprop_exp.config import CONF_DIR
from noprop_exp.data import DataSplits
from noprop_exp.pictures.measures import StepAccuracy, step_accuracy
from noprop_exp.precision import autocast
from noprop_exp.solvers import Solver
from noprop_exp.variants.base import Method


@dataclass
class Accuracy:
    mean: float  # percent
    se: float  # standard error over inference repeats, percent (0 for a single repeat)
    # With `by_step=True`: the first repeat read out at every step, for the pictures.
    by_step: StepAccuracy | None = None


@torch.no_grad()
def predict_labels(
    method: Method,
    images: Tensor,
    steps: int,
    solver: Solver,
    batch_size: int,
    generator: torch.Generator | None = None,
    progress: tqdm | None = None,
) -> Tensor:
    """Predicted class of every image, in batches (each one counted on `progress`)."""
    method.eval()
    predictions = []
    for batch in images.split(batch_size):
        predictions.append(method.predict(batch, steps, solver, generator).argmax(dim=1))
        if progress is not None:
            progress.update()
    return torch.cat(predictions)


def accuracy(
    method: Method,
    images: Tensor,
    labels: Tensor,
    steps: int,
    solver: Solver,
    batch_size: int = 1000,
    repeats: int = 1,
    seed: int = 1234,
    progress: bool = False,
    by_step: bool = False,
    check_images: int | None = None,
) -> Accuracy:
    """Accuracy (%) on the whole of (images, labels), mean and s.e. over stochastic repeats;
    with `progress`, a bar over repeats x batches on stderr when it is a terminal.

    `by_step`: the first repeat runs as `step_accuracy` (the same draws, so the same
    predictions), read out at every step, with the method's checks on `check_images` images;
    the pictures then need no inference of their own.
    """
    scores, steps_result = [], None
    total = repeats * math.ceil(len(images) / batch_size)
    # disable=None: tqdm switches itself off when stderr is no terminal (logs, CI, pipes).
    with tqdm(
        total=total,
        desc="inference",
        unit="batch",
        file=sys.stderr,
        disable=None if progress else True,
    ) as bar:
        for repeat in range(repeats):
            if by_step and repeat == 0:
                steps_result = step_accuracy(
                    method, images, labels, steps, solver, batch_size, seed, check_images
                )
                predicted = steps_result.predictions
                bar.update(math.ceil(len(images) / batch_size))
            else:
                generator = torch.Generator(device=images.device).manual_seed(seed + repeat)
                predicted = predict_labels(
                    method, images, steps, solver, batch_size, generator, bar
                )
            scores.append(100.0 * (predicted == labels).float().mean().item())
    mean = sum(scores) / repeats
    if repeats == 1:
        return Accuracy(mean, 0.0, steps_result)
    variance = sum((s - mean) ** 2 for s in scores) / (repeats - 1)
    return Accuracy(mean, math.sqrt(variance / repeats), steps_result)


def accuracy_on_split(
    method: Method,
    data: DataSplits,
    eval_cfg: DictConfig,
    steps: int,
    solver: Solver,
    progress: bool = False,
    split: str = "test",
    by_step: bool = False,
) -> Accuracy:
    """Accuracy on the test (or `split="val"`, validation) split with `steps` steps of `solver`,
    in batches of `eval_cfg.batch_size`, over `eval_cfg.repeats` inference runs seeded from
    `eval_cfg.seed`; `by_step` as in `accuracy`, checks on `eval_cfg.picture_images` images."""
    images, labels = data.split(split)
    return accuracy(
        method,
        images,
        labels,
        steps,
        solver,
        eval_cfg.batch_size,
        eval_cfg.repeats,
        eval_cfg.seed,
        progress,
        by_step,
        eval_cfg.picture_images if by_step else None,
    )


def load_logged_run(
    run_id: str,
    tracking_uri: str,
    device: torch.device,
    data_root: str | None = None,
    test_size: int | None = None,
) -> tuple[DictConfig, Assembled]:
    """Re-build a logged run's data, method and solver from its config.yaml and weights; a
    missing store, run or weights is a UserError that says what to do. `test_size` loads that
    many test images only (e.g. for 1000-step sweeps of several solvers)."""
    client = open_store(tracking_uri)
    run_with_weights(client, run_id)
    with tempfile.TemporaryDirectory() as folder:
        cfg = OmegaConf.load(client.download_artifacts(run_id, "config.yaml", folder))
        weights = client.download_artifacts(run_id, WEIGHTS, folder)
        if data_root is not None and "root" in cfg.dataset:
            cfg.dataset.root = data_root
        if test_size is not None:
            cfg.dataset.test_size = test_size
        torch.manual_seed(cfg.seed)  # the same initial embedding draw as in training
        assembled = assemble(cfg, device)
        assembled.method.load_state_dict(torch.load(weights, map_location=device))
    return cfg, assembled


def solver_by_name(name: str) -> Solver:
    """The solver of conf/solver/NAME.yaml, as `noprop-train solver=NAME` would build it."""
    choices = sorted(path.stem for path in (CONF_DIR / "solver").glob("*.yaml"))
    if name not in choices:
        raise UserError(f"--solver {name}: no such solver; choose one of {', '.join(choices)}")
    return instantiate(OmegaConf.load(CONF_DIR / "solver" / f"{name}.yaml"))


def evaluate(args: argparse.Namespace) -> None:
    solver = solver_by_name(args.solver) if args.solver else None  # before the slow loading
    cfg, run = load_named_run(args)
    solver = solver or run.solver
    steps = args.steps or cfg.eval.steps or run.method.default_steps()
    cfg.eval.repeats, cfg.eval.seed = args.repeats, args.seed  # the command's, not the run's
    try:
        with autocast(cfg.train.precision, run.data.test_x.device):  # as the run evaluated
            result = accuracy_on_split(
                run.method, run.data, cfg.eval, steps, solver, progress=True, split=args.split
            )
    except ValueError as unusable:  # e.g. a solver the method cannot offer what it needs
        raise UserError(str(unusable)) from unusable
    _, labels = run.data.split(args.split)
    print(
        f"{args.run_id}: {args.split} accuracy {result.mean:.2f}% +- {result.se:.2f} "
        f"({args.repeats} inference runs, {steps} steps, solver {solver.name}, "
        f"{len(labels)} images)"
    )


def add_logged_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments that name a logged run and where to rebuild it (`load_named_run`)."""
    parser.add_argument("run_id")
    add_tracking_uri(parser)
    parser.add_argument("--data-root", help="dataset folder, if not where the run found it")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--test-size",
        type=int,
        help="a seeded random N of the test images only (default: all the run used)",
    )


def load_named_run(args: argparse.Namespace) -> tuple[DictConfig, Assembled]:
    """`load_logged_run` for the arguments of `add_logged_run_arguments`."""
    device = resolve_device(args.device)
    return load_logged_run(args.run_id, args.tracking_uri, device, args.data_root, args.test_size)


def main(argv: list[str] | None = None) -> None:
    """noprop-eval: test (or validation) accuracy of a logged run's trained model."""
    parser = argparse.ArgumentParser(prog="noprop-eval", description=main.__doc__)
    add_logged_run_arguments(parser)
    parser.add_argument("--steps", type=int, help="inference steps (default: the run's)")
    parser.add_argument("--solver", help="a name of conf/solver/, e.g. dpm (default: the run's)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument(
        "--split",
        default="test",
        choices=["test", "val"],
        help="val: the run's validation split (dataset.val_size), to choose on",
    )
    run_command(parser, evaluate, argv)

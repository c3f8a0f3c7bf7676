"""One run's whole set of pictures, made from its trained `Method` and logged into MLflow.

Everything about the method goes through its interface (`trajectory`,
`inference_diagnostics`, `step_unit`, `name` for titles), so the five methods are drawn alike.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from matplotlib.figure import Figure
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from noprop_exp.assemble import Assembled
from noprop_exp.console import timed
from noprop_exp.evaluation import accuracy_on_split
from noprop_exp.pictures.figures import (
    GRID_COLUMNS,
    GRID_ROWS,
    TRAJECTORY_IMAGES,
    accuracy_by_step_figure,
    accuracy_vs_steps_figure,
    embedding_figure,
    prediction_grid,
    trajectory_figure,
)
from noprop_exp.pictures.measures import StepAccuracy, pick, shown_steps, step_accuracy
from noprop_exp.precision import autocast
from noprop_exp.solvers import Solver

log = logging.getLogger(__name__)

ARTIFACT_DIR = "pictures"


@dataclass
class Pictures:
    """The figures of one run (file stem -> Figure), their metrics, and why any were skipped."""

    figures: dict[str, Figure] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


def solver_label(solver: Solver) -> str:
    deterministic = getattr(solver, "deterministic", False)
    return f"{solver.name} (deterministic)" if deterministic else solver.name


def logged_step_sweep(client: MlflowClient, run_id: str, solver: Solver) -> dict[str, list[dict]]:
    """The run's own step sweep (its `acc_vs_steps.json` table) as one line; {} if it has none."""
    if "acc_vs_steps.json" not in {a.path for a in client.list_artifacts(run_id)}:
        return {}
    with tempfile.TemporaryDirectory() as folder:
        table = json.loads(
            Path(client.download_artifacts(run_id, "acc_vs_steps.json", folder)).read_text()
        )
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    return {solver_label(solver): rows}


def evaluated_step_sweep(
    cfg: DictConfig, run: Assembled, solvers: Sequence[Solver], step_counts: Sequence[int]
) -> dict[str, list[dict]]:
    """Accuracy of the loaded model at each step count with each solver."""
    lines = {}
    images = len(run.data.test_y)
    for solver in solvers:
        rows = []
        for n in step_counts:
            what = f"{solver_label(solver)}: {images:,} test images at {n} steps"
            with timed(what), autocast(cfg.train.precision, run.data.test_x.device):
                result = accuracy_on_split(run.method, run.data, cfg.eval, n, solver, progress=True)
            log.info("%s at %d steps: test_acc %.2f%%", solver_label(solver), n, result.mean)
            rows.append({"steps": n, "test_acc": result.mean, "test_acc_se": result.se})
        lines[solver_label(solver)] = rows
    return lines


def make_pictures(
    cfg: DictConfig,
    run: Assembled,
    step_sweep: dict[str, list[dict]],
    by_step: StepAccuracy | None = None,
) -> Pictures:
    """Every picture of a trained model (and the per-step metrics), from its test set.

    `by_step`: the read-outs of an evaluation already made (training's last one, which runs
    as `step_accuracy` for this); without it, a pass over the first `eval.picture_images`
    test images makes them.
    """
    method, data, solver = run.method, run.data, run.solver
    steps = cfg.eval.steps or method.default_steps()
    title = f"{method.name} on {data.name}"
    seed = cfg.eval.seed
    pictures = Pictures()

    images = len(by_step.predictions) if by_step is not None else cfg.eval.picture_images
    test_x, test_y = data.test_x[:images], data.test_y[:images]
    result = by_step
    if result is None:
        what = f"reading out every step on {len(test_y):,} test images"
        with timed(what), autocast(cfg.train.precision, data.test_x.device):
            result = step_accuracy(method, test_x, test_y, steps, solver, cfg.eval.batch_size, seed)
    by_step_notes = []
    if len(test_y) < len(data.test_y):
        by_step_notes.append(
            f"read-outs on the first {len(test_y):,} of {len(data.test_y):,} test images "
            "(eval.picture_images)"
        )
    if result.has_block_checks and result.checked_images < len(test_y):
        by_step_notes.append(
            f"per-block checks on the first {result.checked_images:,} test images "
            "(eval.picture_images)"
        )
    shown = shown_steps(steps)
    pictures.metrics = result.metrics(shown)

    index = pick(GRID_ROWS * GRID_COLUMNS, len(test_y), seed)
    pictures.figures["predictions"] = prediction_grid(
        test_x[index], test_y[index], result.predictions[index], title
    )

    index = pick(TRAJECTORY_IMAGES, len(data.test_y), seed + 1)
    generator = torch.Generator(device=data.test_x.device).manual_seed(seed)
    with autocast(cfg.train.precision, data.test_x.device):  # inference, as the run's
        scores = method.trajectory(data.test_x[index], steps, solver, generator)
    probs = scores[shown].float().softmax(-1)
    pictures.figures["trajectories"] = trajectory_figure(
        data.test_x[index], data.test_y[index], probs, shown, method.step_unit, title
    )

    pictures.figures["accuracy_by_step"] = accuracy_by_step_figure(
        result, data.num_classes, method.step_unit, title
    )
    if not result.has_block_checks:
        by_step_notes.append(
            f"per-block diagnostics and the last block on pure noise apply to dt only "
            f"(this run: {method.name})"
        )
    if by_step_notes:
        pictures.notes["accuracy_by_step"] = "; ".join(by_step_notes)

    if step_sweep:
        pictures.figures["accuracy_vs_steps"] = accuracy_vs_steps_figure(step_sweep, title)
    else:
        pictures.notes["accuracy_vs_steps"] = (
            "skipped: the run has no step sweep (eval.steps_sweep is empty); evaluate one with "
            "noprop-pictures RUN_ID --steps N [N ...] [--solvers NAME ...]"
        )

    figure = embedding_figure(method.embedding, title)
    if figure is not None:
        pictures.figures["embedding"] = figure
    else:
        pictures.notes["embedding"] = (
            f"skipped: nothing learned to show ({method.name}: a fixed one-hot W)"
        )
    return pictures


def save_and_log(
    pictures: Pictures, client: MlflowClient, run_id: str, step: int, out_dir: Path | None = None
) -> None:
    """Write the PNGs (and notes.txt) to `out_dir` (default: a temporary folder) and log them
    under `pictures/` of the run, with the metrics at `step`."""
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(out_dir) if out_dir is not None else Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        for stem, figure in pictures.figures.items():
            files.append(folder / f"{stem}.png")
            figure.savefig(files[-1], dpi=110)
        if pictures.notes:
            files.append(folder / "notes.txt")
            files[-1].write_text("".join(f"{k}: {v}\n" for k, v in pictures.notes.items()))
        for file in files:
            client.log_artifact(run_id, str(file), ARTIFACT_DIR)
    timestamp = int(1000 * time.time())
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), timestamp, step) for k, v in pictures.metrics.items()],
    )
    for picture, note in pictures.notes.items():
        log.info("pictures: %s %s", picture, note)


def log_pictures(
    cfg: DictConfig,
    run: Assembled,
    run_id: str,
    step_sweep: dict[str, list[dict]] | None = None,
    out_dir: Path | None = None,
    by_step: StepAccuracy | None = None,
) -> Pictures:
    """Make every picture of a trained model and log it into MLflow run `run_id`.

    `step_sweep` (solver -> rows of steps/test_acc/test_acc_se): default, the run's own.
    `by_step`: as in `make_pictures`.
    """
    client = MlflowClient(cfg.mlflow.tracking_uri)
    if step_sweep is None:
        step_sweep = logged_step_sweep(client, run_id, run.solver)
    pictures = make_pictures(cfg, run, step_sweep, by_step)
    save_and_log(pictures, client, run_id, cfg.train.epochs, out_dir)
    return pictures

"""Pictures of what a trained model does, logged under `pictures/` of its MLflow run.

Made at the end of training (`eval.pictures=true`) and on demand for a logged run with
`noprop-pictures RUN_ID`:

- `predictions.png`: a grid of random test images with predicted and true labels, wrong in red;
- `trajectories.png`: for a few test images, the class probabilities (softmax of the method's
  trajectory scores) at each block (DT) or at evenly spaced steps (CT, FM), noise first;
- `accuracy_by_step.png`: test accuracy read out at every block/step, and for DT each block's own
  argmax along the chain and with z_{t-1} drawn from q, next to the last block fed pure noise
  (spec section 2's per-block diagnostics; also logged as metrics);
- `accuracy_vs_steps.png`: accuracy against the number of inference steps, one line per solver;
- `embedding.png`: prototype rows as images (paper Figure 2), or learned rows in 2-D by PCA.

A picture that would have nothing to show (a run without a step sweep, a fixed one-hot embedding)
is skipped, and `pictures/notes.txt` says why. Everything goes through the `Method` interface
(`trajectory`, `predict`, `name`, `embedding`), so the five methods are drawn alike; only the DT
diagnostics look inside the blocks. Figures are plain `matplotlib.figure.Figure`s drawn by Agg:
no pyplot, so no global figure state and no display needed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig
from torch import Tensor

from noprop_exp.assemble import Assembled, resolve_device
from noprop_exp.config import default_tracking_uri
from noprop_exp.embeddings import LabelEmbedding
from noprop_exp.evaluation import accuracy, load_logged_run
from noprop_exp.solvers import SOLVERS, Solver
from noprop_exp.variants.base import Method

log = logging.getLogger(__name__)

ARTIFACT_DIR = "pictures"
GRID_ROWS, GRID_COLUMNS = 4, 8  # test images in the prediction grid
TRAJECTORY_IMAGES = 5  # test images whose denoising is drawn
MAX_SHOWN_STEPS = 21  # more steps than this (CT/FM's 1000) are shown at 11 evenly spaced ones
WRONG = "#d62728"  # the colour of wrong predictions


# ---------------------------------------------------------------- numbers behind the pictures


@dataclass
class StepAccuracy:
    """Test accuracy (%) at every step of inference; the DT fields are None for other methods.

    readout[k]: argmax of the trajectory scores at step k = 0..S (k = 0 is pure noise).
    block_chain[t-1]: block t's own argmax given z_{t-1} from the inference chain, t = 1..T.
    block_q[t-1]: block t's own argmax given z_{t-1} ~ q(z_{t-1} | y), as in training.
    last_block_noise: block T's argmax given z ~ N(0, I) (is it a plain classifier of x?).
    """

    readout: list[float]
    predictions: Tensor  # (N,) final predicted class of every test image
    block_chain: list[float] | None = None
    block_q: list[float] | None = None
    last_block_noise: float | None = None

    def metrics(self, shown: Sequence[int]) -> dict[str, float]:
        """MLflow metrics: the readout at the shown steps (not all of CT's 1001), DT's blocks."""
        out = {f"readout_acc_step_{k}": self.readout[k] for k in shown}
        for name, values in (("block_acc_chain", self.block_chain), ("block_acc_q", self.block_q)):
            out |= {f"{name}_{t}": v for t, v in enumerate(values or [], 1)}
        if self.last_block_noise is not None:
            out["last_block_noise_acc"] = self.last_block_noise
        return out


def shown_steps(steps: int) -> list[int]:
    """Steps drawn in the trajectory pictures: all of a short chain, else 11 evenly spaced."""
    if steps + 1 <= MAX_SHOWN_STEPS:
        return list(range(steps + 1))
    return sorted({round(i * steps / 10) for i in range(11)})


@torch.no_grad()
def step_accuracy(
    method: Method,
    images: Tensor,
    labels: Tensor,
    steps: int,
    solver: Solver,
    batch_size: int,
    seed: int,
) -> StepAccuracy:
    """One pass of inference over (images, labels), read out at every step, with the method's
    own checks (`Method.inference_diagnostics`; DT's per-block read-outs).

    Inference draws its noise as `evaluation.accuracy` does with the same seed and batch size,
    so the last read-out is the run's `test_acc`; the checks draw theirs from a second
    generator.
    """
    method.eval()
    generator = torch.Generator(device=images.device).manual_seed(seed)
    check_generator = torch.Generator(device=images.device).manual_seed(seed + 1)
    readout_hits = torch.zeros(steps + 1, device=images.device)
    check_hits: dict[str, Tensor] = {}
    predictions = []
    for x, y in zip(images.split(batch_size), labels.split(batch_size), strict=True):
        scores, checks = method.inference_diagnostics(
            x, y, steps, solver, generator, check_generator
        )
        readout_hits += (scores.argmax(-1) == y).sum(1)
        predictions.append(scores[-1].argmax(-1))
        for name, correct in checks.items():
            check_hits[name] = check_hits.get(name, 0) + correct.sum(1)

    def percent(hits: Tensor) -> list[float]:
        return (100.0 * hits / len(labels)).tolist()

    result = StepAccuracy(percent(readout_hits), torch.cat(predictions))
    if check_hits:
        result.block_chain = percent(check_hits["block_acc_chain"])
        result.block_q = percent(check_hits["block_acc_q"])
        (result.last_block_noise,) = percent(check_hits["last_block_noise_acc"])
    return result


def pick(count: int, total: int, seed: int) -> Tensor:
    """`count` distinct random indices out of `total` (all of them if fewer), fixed by `seed`."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:count]


# ------------------------------------------------------------------------------- the figures


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def displayable(image: Tensor):
    """A (C, H, W) normalised image as (H, W) or (H, W, C) in [0, 1], stretched per image."""
    x = image.detach().float().cpu()
    x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-8)
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()


def _show(ax, image: Tensor) -> None:
    ax.imshow(displayable(image), cmap="gray", interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def prediction_grid(images: Tensor, labels: Tensor, predicted: Tensor, title: str) -> Figure:
    """Test images with 'pred p / true y' over each; wrong ones in red, with a red frame."""
    columns = min(GRID_COLUMNS, len(images))
    rows = math.ceil(len(images) / columns)
    figure = _new_figure(1.35 * columns, 1.55 * rows + 0.4)
    wrong = int((predicted != labels).sum())
    figure.suptitle(f"{title}: {len(images)} random test images, {wrong} wrong (red)")
    for i, (image, y, p) in enumerate(
        zip(images, labels.tolist(), predicted.tolist(), strict=True)
    ):
        ax = figure.add_subplot(rows, columns, i + 1)
        _show(ax, image)
        colour = "black" if p == y else WRONG
        ax.set_title(f"pred {p} / true {y}", color=colour, fontsize=9)
        if p != y:
            for spine in ax.spines.values():
                spine.set(color=WRONG, linewidth=2.5)
    return figure


def trajectory_figure(
    images: Tensor, labels: Tensor, probs: Tensor, steps: Sequence[int], is_dt: bool, title: str
) -> Figure:
    """Per image: the image over a heat-map of class probabilities (rows: steps, noise at the
    top; columns: classes), the true class framed in red."""
    count, num_classes = len(images), probs.shape[-1]
    figure = _new_figure(2.3 * count + 1.0, 1.6 + 0.28 * len(steps) + 0.6)
    figure.suptitle(f"{title}: the label estimate, from noise (top) to the prediction (bottom)")
    grid = figure.add_gridspec(2, count, height_ratios=[1.2, 0.28 * len(steps)])
    tick_rows = [f"z{k}" if is_dt else str(k) for k in steps]
    if is_dt:
        tick_rows[0] = "z0 noise"
    heat = None
    for i in range(count):
        image_ax = figure.add_subplot(grid[0, i])
        _show(image_ax, images[i])
        final = int(probs[-1, i].argmax())
        y = int(labels[i])
        image_ax.set_title(
            f"true {y}, pred {final}", color="black" if final == y else WRONG, fontsize=10
        )
        ax = figure.add_subplot(grid[1, i])
        heat = ax.imshow(
            probs[:, i].cpu().numpy(),
            cmap="magma",
            vmin=0,
            vmax=1,
            aspect="auto",
            interpolation="nearest",
        )
        ax.add_patch(
            Rectangle(
                (y - 0.5, -0.5),
                1,
                len(steps),
                fill=False,
                edgecolor=WRONG,
                linewidth=2,
                label="true class",
            )
        )
        ax.set_xticks(range(num_classes) if num_classes <= 20 else [])
        ax.set_xlabel("class")
        ax.set_yticks(range(len(steps)))
        ax.set_yticklabels(tick_rows if i == 0 else [])
        if i == 0:
            ax.set_ylabel("after block" if is_dt else "step")
    figure.colorbar(heat, ax=figure.axes[1::2], label="probability", shrink=0.9)
    return figure


def accuracy_by_step_figure(result: StepAccuracy, num_classes: int, title: str) -> Figure:
    """Accuracy read out at every step; for DT also each block's own argmax (chain and q) and
    the last block fed pure noise."""
    figure = _new_figure(8, 5.2)
    ax = figure.add_subplot()
    steps = range(len(result.readout))
    is_dt = result.block_chain is not None
    ax.plot(
        steps,
        result.readout,
        marker="o" if len(steps) <= MAX_SHOWN_STEPS else None,
        label="read-out of $z_t$ along the inference chain" if is_dt else "read-out of $z_t$",
        color="#1f77b4",
        linewidth=2,
    )
    if is_dt:
        blocks = range(1, len(result.block_chain) + 1)
        ax.plot(
            blocks,
            result.block_chain,
            marker="s",
            color="#2ca02c",
            label="block t's own argmax, $z_{t-1}$ from the chain",
        )
        ax.plot(
            blocks,
            result.block_q,
            marker="^",
            linestyle="--",
            color="#9467bd",
            label=r"block t's own argmax, $z_{t-1} \sim q$ (as in training)",
        )
        ax.axhline(
            result.last_block_noise,
            color=WRONG,
            linestyle="-.",
            label=f"last block alone fed pure noise: {result.last_block_noise:.1f}%",
        )
    ax.axhline(100 / num_classes, color="grey", linestyle=":", label="chance")
    ax.set_xlabel("block t (0 = pure noise $z_0$)" if is_dt else "inference step (0 = pure noise)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 101)
    if is_dt:
        ax.set_xticks(list(steps))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncols=2, fontsize=8, frameon=False)
    ax.set_title(f"{title}: accuracy at every {'block' if is_dt else 'step'}")
    return figure


def accuracy_vs_steps_figure(lines: dict[str, list[dict]], title: str) -> Figure:
    """One line per solver: test accuracy (mean, s.e. bars) against the number of steps."""
    figure = _new_figure(6.5, 4.2)
    ax = figure.add_subplot()
    for solver, rows in lines.items():
        rows = sorted(rows, key=lambda r: r["steps"])
        ax.errorbar(
            [r["steps"] for r in rows],
            [r["test_acc"] for r in rows],
            yerr=[r.get("test_acc_se", 0.0) for r in rows],
            marker="o",
            capsize=3,
            label=solver,
        )
    ax.set_xscale("log")
    ax.set_xlabel("inference steps")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(title="solver")
    ax.set_title(f"{title}: accuracy against inference steps")
    return figure


def embedding_figure(embedding: LabelEmbedding, title: str) -> Figure | None:
    """Prototype rows as images, or learned rows in 2-D (PCA) beside their cosine similarities;
    None for a fixed embedding (one-hot: nothing learned)."""
    if not embedding.trainable:
        return None
    weight = embedding.weight.detach().float().cpu()
    m = len(weight)
    if len(embedding.z_shape) == 3:  # image-shaped prototypes
        columns = min(m, 10)
        rows = math.ceil(m / columns)
        figure = _new_figure(1.3 * columns, 1.45 * rows + 0.4)
        figure.suptitle(f"{title}: learned class prototypes (rows of W as images)")
        for c in range(m):
            ax = figure.add_subplot(rows, columns, c + 1)
            _show(ax, weight[c].view(embedding.z_shape))
            ax.set_title(f"class {c}", fontsize=9)
        return figure
    centred = weight - weight.mean(0)
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    # Two principal axes (a 1-D embedding gets a flat second one).
    coords = torch.zeros(m, 2)
    coords[:, : len(vh[:2])] = centred @ vh[:2].T
    explained = [*(singular**2 / (singular**2).sum().clamp_min(1e-12)).tolist(), 0.0]
    figure = _new_figure(11, 4.8)
    figure.suptitle(f"{title}: learned label embedding W ({m} x {embedding.dim})")
    ax = figure.add_subplot(1, 2, 1)
    ax.scatter(coords[:, 0], coords[:, 1], c=range(m), cmap="tab10" if m <= 10 else "viridis")
    for c, (a, b) in enumerate(coords.tolist()):
        ax.annotate(str(c), (a, b), textcoords="offset points", xytext=(4, 4), fontsize=9)
    ax.set_xlabel(f"PC 1 ({100 * explained[0]:.0f}% of variance)")
    ax.set_ylabel(f"PC 2 ({100 * explained[1]:.0f}% of variance)")
    ax.set_title("rows of W, projected to 2-D by PCA")
    ax.grid(alpha=0.3)
    ax.set_aspect("equal", adjustable="datalim")
    ax = figure.add_subplot(1, 2, 2)
    unit = F.normalize(weight, dim=1)
    similarity = ax.imshow((unit @ unit.T).numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xlabel("class")
    ax.set_ylabel("class")
    if m <= 20:
        ax.set_xticks(range(m))
        ax.set_yticks(range(m))
    ax.set_title("cosine similarity of rows")
    figure.colorbar(similarity, ax=ax, shrink=0.85)
    return figure


# ----------------------------------------------------------------- assembling the whole set


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
    for solver in solvers:
        rows = []
        for n in step_counts:
            result = accuracy(
                run.method,
                run.data.test_x,
                run.data.test_y,
                n,
                solver,
                cfg.eval.batch_size,
                cfg.eval.repeats,
                cfg.eval.seed,
            )
            rows.append({"steps": n, "test_acc": result.mean, "test_acc_se": result.se})
        lines[solver_label(solver)] = rows
    return lines


def make_pictures(cfg: DictConfig, run: Assembled, step_sweep: dict[str, list[dict]]) -> Pictures:
    """Every picture of a trained model (and the per-step metrics), from its test set."""
    method, data, solver = run.method, run.data, run.solver
    steps = cfg.eval.steps or method.default_steps()
    title = f"{method.name} on {data.name}"
    is_dt = method.name == "dt"
    seed = cfg.eval.seed
    pictures = Pictures()

    result = step_accuracy(
        method, data.test_x, data.test_y, steps, solver, cfg.eval.batch_size, seed
    )
    shown = shown_steps(steps)
    pictures.metrics = result.metrics(shown)

    index = pick(GRID_ROWS * GRID_COLUMNS, len(data.test_y), seed)
    pictures.figures["predictions"] = prediction_grid(
        data.test_x[index], data.test_y[index], result.predictions[index], title
    )

    index = pick(TRAJECTORY_IMAGES, len(data.test_y), seed + 1)
    generator = torch.Generator(device=data.test_x.device).manual_seed(seed)
    scores = method.trajectory(data.test_x[index], steps, solver, generator)
    probs = scores[shown].float().softmax(-1)
    pictures.figures["trajectories"] = trajectory_figure(
        data.test_x[index], data.test_y[index], probs, shown, is_dt, title
    )

    pictures.figures["accuracy_by_step"] = accuracy_by_step_figure(result, data.num_classes, title)
    if not is_dt:
        pictures.notes["accuracy_by_step"] = (
            f"per-block diagnostics and the last block on pure noise apply to dt only "
            f"(this run: {method.name})"
        )

    if step_sweep:
        pictures.figures["accuracy_vs_steps"] = accuracy_vs_steps_figure(step_sweep, title)
    else:
        pictures.notes["accuracy_vs_steps"] = (
            "skipped: the run has no step sweep (eval.steps_sweep is empty); evaluate one with "
            "noprop-pictures RUN_ID --steps N [N ...] [--solvers NAME ...]"
        )

    embedding = getattr(method, "embedding", None)
    figure = None if embedding is None else embedding_figure(embedding, title)
    if figure is not None:
        pictures.figures["embedding"] = figure
    else:
        what = "it has no label embedding" if embedding is None else "a fixed one-hot W"
        pictures.notes["embedding"] = f"skipped: nothing learned to show ({method.name}: {what})"
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
) -> Pictures:
    """Make every picture of a trained model and log it into MLflow run `run_id`.

    `step_sweep` (solver -> rows of steps/test_acc/test_acc_se): default, the run's own.
    """
    client = MlflowClient(cfg.mlflow.tracking_uri)
    if step_sweep is None:
        step_sweep = logged_step_sweep(client, run_id, run.solver)
    pictures = make_pictures(cfg, run, step_sweep)
    save_and_log(pictures, client, run_id, cfg.train.epochs, out_dir)
    return pictures


def _solver(name: str) -> Solver:
    by_name = {cls.name: cls for cls in SOLVERS}
    if name not in by_name:
        raise ValueError(f"unknown solver '{name}': choose from {', '.join(by_name)}")
    return by_name[name]()


def main(argv: list[str] | None = None) -> None:
    """noprop-pictures: draw a logged run's trained model and log the PNGs into that run."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("run_id")
    parser.add_argument(
        "--tracking-uri",
        default=default_tracking_uri(),
        help="MLflow store or server (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    parser.add_argument("--data-root", help="dataset folder, if not where the run found it")
    parser.add_argument("--out", type=Path, help="also keep the PNGs in this folder")
    parser.add_argument(
        "--solvers",
        nargs="+",
        metavar="NAME",
        help="evaluate the step sweep with these solvers (default: plot the run's logged sweep)",
    )
    parser.add_argument(
        "--steps",
        nargs="+",
        type=int,
        metavar="N",
        help="step counts to evaluate (default: the run's eval.steps_sweep)",
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args(argv)
    client = MlflowClient(args.tracking_uri)
    if "model" not in {a.path for a in client.list_artifacts(args.run_id)}:
        raise SystemExit(
            f"run {args.run_id} has no logged weights (model/state_dict.pt): it was trained with "
            f"mlflow.log_model=false or did not finish; pictures need the trained model"
        )
    cfg, run = load_logged_run(
        args.run_id, args.tracking_uri, resolve_device(args.device), args.data_root
    )
    cfg.mlflow.tracking_uri = args.tracking_uri  # log where the run was read from
    run.method.eval()  # before any inference: batch norm must not update its statistics
    step_sweep = None
    if args.solvers or args.steps:
        solvers = [_solver(name) for name in args.solvers] if args.solvers else [run.solver]
        step_counts = args.steps or list(cfg.eval.steps_sweep)
        for solver in solvers:  # an unusable solver or step count fails before any work
            for n in step_counts:
                run.method.predict(run.data.test_x[:2], n, solver)
        step_sweep = evaluated_step_sweep(cfg, run, solvers, step_counts) if step_counts else {}
    pictures = log_pictures(cfg, run, args.run_id, step_sweep, args.out)
    made = ", ".join(f"{ARTIFACT_DIR}/{stem}.png" for stem in pictures.figures)
    print(f"{args.run_id}: logged {made}")
    for picture, note in pictures.notes.items():
        print(f"  {picture}: {note}")
    if args.out is not None:
        print(f"  PNGs also in {args.out}")


if __name__ == "__main__":
    main()

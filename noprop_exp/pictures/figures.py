"""Pure figure builders: tensors and lists in, a `matplotlib.figure.Figure` out.

They know nothing of MLflow or of `Method`: what a method calls its steps (`Method.step_unit`)
and whether it has per-block checks come in as arguments. Figures are drawn by Agg without
pyplot, so there is no global figure state and no display is needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from noprop_exp.embeddings import LabelEmbedding
from noprop_exp.pictures.measures import MAX_SHOWN_STEPS, StepAccuracy

GRID_ROWS, GRID_COLUMNS = 4, 8  # test images in the prediction grid
TRAJECTORY_IMAGES = 5  # test images whose denoising is drawn
WRONG = "#d62728"  # the colour of wrong predictions
BLOCK = "block"  # the `Method.step_unit` of a chain of blocks (DT): its steps are z_0 .. z_T


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def displayable(image: Tensor) -> np.ndarray:
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
    images: Tensor,
    labels: Tensor,
    probs: Tensor,
    steps: Sequence[int],
    step_unit: str,
    title: str,
) -> Figure:
    """Per image: the image over a heat-map of class probabilities `probs` (len(steps), count,
    classes) (rows: steps, noise at the top; columns: classes), the true class framed in red.
    A chain of blocks labels its rows by the latent z_k each block produces."""
    count, num_classes = len(images), probs.shape[-1]
    blocks = step_unit == BLOCK
    figure = _new_figure(2.3 * count + 1.0, 1.6 + 0.28 * len(steps) + 0.6)
    figure.suptitle(f"{title}: the label estimate, from noise (top) to the prediction (bottom)")
    grid = figure.add_gridspec(2, count, height_ratios=[1.2, 0.28 * len(steps)])
    tick_rows = [f"z{k}" if blocks else str(k) for k in steps]
    if blocks:
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
            ax.set_ylabel("after block" if blocks else "step")
    figure.colorbar(heat, ax=figure.axes[1::2], label="probability", shrink=0.9)
    return figure


def accuracy_by_step_figure(
    result: StepAccuracy, num_classes: int, step_unit: str, title: str
) -> Figure:
    """Accuracy read out at every step; where the result has per-block checks (DT) also each
    block's own argmax (chain and q) and the last block fed pure noise."""
    figure = _new_figure(8, 5.2)
    ax = figure.add_subplot()
    steps = range(len(result.readout))
    checked, blocks = result.has_block_checks, step_unit == BLOCK
    ax.plot(
        steps,
        result.readout,
        marker="o" if len(steps) <= MAX_SHOWN_STEPS else None,
        label="read-out of $z_t$ along the inference chain" if checked else "read-out of $z_t$",
        color="#1f77b4",
        linewidth=2,
    )
    if checked:
        block_numbers = range(1, len(result.block_chain) + 1)
        ax.plot(
            block_numbers,
            result.block_chain,
            marker="s",
            color="#2ca02c",
            label="block t's own argmax, $z_{t-1}$ from the chain",
        )
        ax.plot(
            block_numbers,
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
    ax.set_xlabel("block t (0 = pure noise $z_0$)" if blocks else "inference step (0 = pure noise)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 101)
    if blocks:
        ax.set_xticks(list(steps))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncols=2, fontsize=8, frameon=False)
    ax.set_title(f"{title}: accuracy at every {step_unit}")
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

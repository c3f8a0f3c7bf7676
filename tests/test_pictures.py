"""Pictures of a trained model: what each figure shows, the per-block accuracies, the command.

One tiny NoProp-DT run is trained (it makes its pictures at the end, as every run does); then
`noprop-pictures` draws it again from the run id alone, as a later session would. The per-block
accuracies are checked against stub blocks whose accuracies are known in closed form and against
a DT chain run by hand.
"""

from __future__ import annotations

import io
import math
import re
import subprocess
import sys
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgba
from matplotlib.patches import Rectangle
from mlflow.tracking import MlflowClient
from torch import Tensor, nn

from noprop_exp.assemble import Assembled, assemble
from noprop_exp.cli import UserError
from noprop_exp.data import DataSplits, synthetic
from noprop_exp.diffusion import posterior_coefficients
from noprop_exp.embeddings import LabelEmbedding, OneHotEmbedding, PrototypeEmbedding
from noprop_exp.evaluation import accuracy, solver_by_name
from noprop_exp.pictures import cli, figures, measures
from noprop_exp.pictures import logged as logged_pictures  # `logged`: the fixture
from noprop_exp.solvers import DDIMSolver, PosteriorSolver
from noprop_exp.train import run
from noprop_exp.variants.base import Method
from tests.conftest import TINY, compose_run_config

RED = to_rgba(figures.WRONG)
REPO = Path(__file__).resolve().parents[1]
STEMS = {"predictions", "trajectories", "accuracy_by_step", "accuracy_vs_steps", "embedding"}


@dataclass
class Logged:
    uri: str
    run_id: str
    trained_metrics: dict[str, float]  # the run's metrics before the command ran
    made: logged_pictures.Pictures  # what the command drew
    out: Path  # the command's --out folder
    printed: str  # the command's output


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> Logged:
    """A tiny DT run (3 blocks, learned embedding, a step sweep), then `noprop-pictures` on its
    id, as read back from MLflow, with two solvers."""
    folder = tmp_path_factory.mktemp("pictures")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    torch.manual_seed(0)
    cfg, choices = compose_run_config(
        [
            *TINY,
            f"mlflow.tracking_uri={uri}",
            "dataset.train_size=64",  # one minibatch: a trained model, not a good one
            "dataset.test_size=64",
            "variant.method.head_updates=1",
            "train.epochs=1",
            "variant.method.num_blocks=3",
            "embedding=learned",
            "eval.steps_sweep=[3]",
        ]
    )
    run(cfg, choices)
    client = MlflowClient(uri)
    (logged_run,) = client.search_runs([client.get_experiment_by_name("noprop").experiment_id])
    run_id = logged_run.info.run_id

    made, printed = [], io.StringIO()
    with pytest.MonkeyPatch.context() as patch, redirect_stdout(printed):
        original = logged_pictures.log_pictures  # keep the command's figures for inspection
        patch.setattr(
            logged_pictures,
            "log_pictures",
            lambda *a, **k: made.append(original(*a, **k)) or made[-1],
        )
        argv = [run_id, "--tracking-uri", uri, "--device", "cpu", "--out", str(folder / "out")]
        cli.main([*argv, "--solvers", "posterior", "ddim"])
    return Logged(uri, run_id, logged_run.data.metrics, made[0], folder / "out", printed.getvalue())


def test_training_logs_every_picture_and_the_per_block_accuracies(logged):
    client = MlflowClient(logged.uri)
    logged_files = {Path(a.path).name for a in client.list_artifacts(logged.run_id, "pictures")}
    assert {f"{stem}.png" for stem in STEMS} <= logged_files
    names = [
        *(f"readout/acc_step_{k}" for k in range(4)),
        *(f"blocks/acc_chain_{t}" for t in (1, 2, 3)),
        *(f"blocks/acc_q_{t}" for t in (1, 2, 3)),
        "blocks/last_on_noise_acc",
    ]
    metrics = logged.trained_metrics
    for name in names:
        history = client.get_metric_history(logged.run_id, name)
        # Once at the end of training, once by the command: same step (the last epoch), and the
        # re-loaded model gives the very same numbers.
        assert [m.step for m in history] == [1, 1], name
        assert history[0].value == history[1].value == metrics[name], name
        assert 0 <= metrics[name] <= 100
    # The read-out after the last block is the run's test accuracy (same seed, one batch).
    assert metrics["readout/acc_step_3"] == pytest.approx(metrics["test_acc"])


def test_command_draws_a_run_read_back_from_mlflow(logged):
    assert set(logged.made.figures) == STEMS
    assert logged.made.notes == {}
    assert {p.name for p in logged.out.iterdir()} == {f"{stem}.png" for stem in STEMS}
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in logged.out.iterdir())
    assert f"{logged.run_id}: logged pictures/predictions.png" in logged.printed
    # Asked for two solvers: one line each in the step picture.
    ax = logged.made.figures["accuracy_vs_steps"].axes[0]
    assert ax.get_legend_handles_labels()[1] == ["posterior", "ddim"]
    assert ax.get_xlabel() == "inference steps"


def test_prediction_grid_marks_exactly_the_wrong_ones_in_red():
    images = torch.randn(10, 1, 8, 8)
    labels = torch.arange(10)
    predicted = labels.clone()
    predicted[[2, 7]] = torch.tensor([5, 0])
    figure = figures.prediction_grid(images, labels, predicted, "test")
    assert len(figure.axes) == 10
    red = [i for i, ax in enumerate(figure.axes) if to_rgba(ax.title.get_color()) == RED]
    assert red == [2, 7]
    assert figure.axes[2].get_title() == "pred 5 / true 2"
    assert figure.axes[0].get_title() == "pred 0 / true 0"
    assert to_rgba(figure.axes[7].spines["left"].get_edgecolor()) == RED
    assert to_rgba(figure.axes[0].spines["left"].get_edgecolor()) != RED
    assert "2 wrong" in figure.get_suptitle()


def test_prediction_grid_of_the_logged_run_is_consistent(logged):
    figure = logged.made.figures["predictions"]
    assert len(figure.axes) == figures.GRID_ROWS * figures.GRID_COLUMNS
    wrong = 0
    for ax in figure.axes:
        predicted, true = map(
            int, re.fullmatch(r"pred (\d+) / true (\d+)", ax.get_title()).groups()
        )
        assert (to_rgba(ax.title.get_color()) == RED) == (predicted != true)
        wrong += predicted != true
    assert f"{wrong} wrong" in figure.get_suptitle()


def test_trajectory_heat_maps_show_probabilities_per_block_with_the_true_class_framed(logged):
    figure = logged.made.figures["trajectories"]
    count = figures.TRAJECTORY_IMAGES
    assert len(figure.axes) == 2 * count + 1  # image + heat-map per image, one colour bar
    heat_maps = figure.axes[1 : 2 * count : 2]
    for image_ax, ax in zip(figure.axes[0 : 2 * count : 2], heat_maps, strict=True):
        probs = ax.images[0].get_array()
        assert probs.shape == (4, 10)  # z_0 .. z_3 of a 3-block chain, 10 classes
        np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
        true = int(re.match(r"true (\d+)", image_ax.get_title()).group(1))
        (frame,) = [p for p in ax.patches if isinstance(p, Rectangle)]
        assert frame.get_x() == true - 0.5
        assert frame.get_height() == 4
    labels = [t.get_text() for t in heat_maps[0].get_yticklabels()]
    assert labels == ["z0 noise", "z1", "z2", "z3"]


def test_accuracy_by_block_figure_matches_the_logged_metrics(logged):
    made = logged.made
    (ax,) = made.figures["accuracy_by_step"].axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert len(lines) == 5  # read-out, block on the chain, block on q, last block on noise, chance
    readout = next(v for k, v in lines.items() if k.startswith("read-out"))
    chain = next(v for k, v in lines.items() if "from the chain" in k)
    on_q = next(v for k, v in lines.items() if "sim q" in k)
    noise = next(v for k, v in lines.items() if k.startswith("last block"))
    metrics = made.metrics
    np.testing.assert_allclose(
        readout.get_ydata(), [metrics[f"readout/acc_step_{k}"] for k in range(4)]
    )
    np.testing.assert_allclose(
        chain.get_ydata(), [metrics[f"blocks/acc_chain_{t}"] for t in (1, 2, 3)]
    )
    np.testing.assert_allclose(on_q.get_ydata(), [metrics[f"blocks/acc_q_{t}"] for t in (1, 2, 3)])
    assert noise.get_ydata()[0] == metrics["blocks/last_on_noise_acc"]
    assert lines["chance"].get_ydata()[0] == pytest.approx(10.0)


def test_learned_embedding_is_projected_by_pca(logged):
    scatter_ax, similarity_ax, _colour_bar = logged.made.figures["embedding"].axes
    assert scatter_ax.collections[0].get_offsets().shape == (10, 2)
    assert [t.get_text() for t in scatter_ax.texts] == [str(c) for c in range(10)]
    np.testing.assert_allclose(np.diag(similarity_ax.images[0].get_array()), 1.0, rtol=1e-5)

    # A W whose principal axes are well defined (distinct variances), against an independent
    # PCA: eigenvectors of the covariance. Pairwise distances do not depend on the axes' signs.
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(10, 20, generator=generator) * torch.linspace(3, 0.1, 20)
    embedding = LabelEmbedding(weight, (20,), trainable=True)
    (points,) = figures.embedding_figure(embedding, "test").axes[0].collections
    centred = weight.double().numpy() - weight.double().numpy().mean(0)
    _, vectors = np.linalg.eigh(centred.T @ centred)
    expected = centred @ vectors[:, ::-1][:, :2]
    distances = lambda p: np.linalg.norm(p[:, None] - p[None], axis=-1)  # noqa: E731
    np.testing.assert_allclose(
        distances(np.asarray(points.get_offsets())), distances(expected), atol=1e-5
    )


def test_prototype_rows_are_drawn_as_images_and_onehot_is_skipped(compose_config):
    data = synthetic(train_size=80, test_size=8)
    prototypes = PrototypeEmbedding.from_data(data, per_class=8)
    figure = figures.embedding_figure(prototypes, "test")
    assert len(figure.axes) == 10
    for c, ax in enumerate(figure.axes):
        assert ax.get_title() == f"class {c}"
        row = prototypes.weight[c].detach().view(16, 16)
        stretched = (row - row.min()) / (row.max() - row.min())
        np.testing.assert_allclose(ax.images[0].get_array(), stretched.numpy(), atol=1e-6)
    cfg, _ = compose_config([*TINY, "variant.method.num_blocks=2", "dataset.test_size=32"])
    onehot = assemble(cfg, torch.device("cpu"))
    assert figures.embedding_figure(onehot.method.embedding, "test") is None
    made = logged_pictures.make_pictures(cfg, onehot, step_sweep={})
    assert set(made.figures) == STEMS - {"embedding", "accuracy_vs_steps"}
    assert "one-hot" in made.notes["embedding"]
    assert "no step sweep" in made.notes["accuracy_vs_steps"]


# ---------------------------------------------------------------- per-block accuracies, exactly


class StubBlock(nn.Module):
    """A DT block's interface (DTBlock): image features of x, then logits from z and them."""

    def image_features(self, x: Tensor) -> Tensor:
        return x.flatten(1)[:, :10]

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return self.from_features(z, self.image_features(x))


class ReadsZ(StubBlock):
    """A stub DT block that ignores the image: its logits are its (one-hot-space) input z."""

    def from_features(self, z: Tensor, features: Tensor) -> Tensor:
        return 50 * z


class ReadsX(StubBlock):
    """A stub DT block that is a perfect classifier of x and ignores z."""

    def from_features(self, z: Tensor, features: Tensor) -> Tensor:
        return 50 * features


def p_argmax_correct(signal: float, sigma: float, classes: int = 10) -> float:
    """P(argmax(signal * e_y + sigma * eps) = y), eps ~ N(0, I): integral over the true
    coordinate's noise u of phi(u) * Phi((signal + sigma u) / sigma)^(classes - 1)."""
    u = np.linspace(-9, 9, 20001)
    phi = np.exp(-(u**2) / 2) / math.sqrt(2 * math.pi)
    big_phi = 0.5 * (1 + np.vectorize(math.erf)((signal / sigma + u) / math.sqrt(2)))
    return float(np.trapezoid(phi * big_phi ** (classes - 1), u))


@pytest.fixture
def stub_dt(compose_config):
    """A 3-block DT (one-hot W) on 4000 one-hot 'images' whose blocks are replaced by stubs."""
    cfg, _ = compose_config([*TINY, "variant.method.num_blocks=3"])
    method = assemble(cfg, torch.device("cpu")).method
    with torch.no_grad():  # head = identity: the read-out is argmax z
        method.head.weight.copy_(torch.eye(10))
        method.head.bias.zero_()
    labels = torch.arange(4000) % 10
    images = torch.nn.functional.one_hot(labels, 16).float().view(-1, 1, 4, 4)
    return method, images, labels


def test_blocks_that_read_only_z_are_right_only_where_z_holds_the_label(stub_dt):
    method, images, labels = stub_dt
    method.blocks = nn.ModuleList(ReadsZ() for _ in range(3))
    result = measures.step_accuracy(method, images, labels, 3, PosteriorSolver(), 1000, 0)
    alpha_bars = method.alpha_bars.tolist()
    for t in (1, 2, 3):  # z_{t-1} ~ q: signal sqrt(ab), noise sqrt(1 - ab)
        ab = alpha_bars[t - 1]
        expected = 100 * p_argmax_correct(math.sqrt(ab), math.sqrt(1 - ab))
        assert result.block_q[t - 1] == pytest.approx(expected, abs=4.0), t
    assert result.last_block_noise == pytest.approx(10.0, abs=2.5)  # pure noise: chance
    assert result.readout[0] == pytest.approx(10.0, abs=2.5)  # z_0 is noise
    # Along the chain nothing ever brings in the label: chance throughout.
    assert all(acc == pytest.approx(10.0, abs=2.5) for acc in result.block_chain)


def test_blocks_that_classify_x_are_right_everywhere_even_on_pure_noise(stub_dt):
    method, images, labels = stub_dt
    method.blocks = nn.ModuleList(ReadsX() for _ in range(3))
    result = measures.step_accuracy(method, images, labels, 3, PosteriorSolver(), 1000, 0)
    assert result.block_chain == result.block_q == [100.0, 100.0, 100.0]
    assert result.last_block_noise == 100.0
    assert result.readout[-1] == 100.0
    assert result.readout[0] == pytest.approx(10.0, abs=2.5)
    assert result.predictions.tolist() == labels.tolist()


def test_chain_accuracies_match_a_chain_run_by_hand(tiny_config):
    torch.manual_seed(0)
    cfg, _ = tiny_config("variant.method.num_blocks=3", "embedding=learned", "dataset.test_size=64")
    parts = assemble(cfg, torch.device("cpu"))
    method, x, y = parts.method, parts.data.test_x, parts.data.test_y
    solver = PosteriorSolver(deterministic=True)  # after z_0, no randomness
    result = measures.step_accuracy(method, x, y, 3, solver, 1000, seed=5)

    method.eval()
    with torch.no_grad():
        z = torch.randn((len(x), 20), generator=torch.Generator().manual_seed(5))
        expected_readout = [100 * (method.head(z).argmax(1) == y).float().mean().item()]
        expected_blocks = []
        for t in (1, 2, 3):
            logits = method.blocks[t - 1](z, x)
            expected_blocks.append(100 * (logits.argmax(1) == y).float().mean().item())
            a, b, _ = posterior_coefficients(method.alpha_bars[t - 1], method.alpha_bars[t])
            z = a * (logits.softmax(1) @ method.embedding.weight) + b * z
            expected_readout.append(100 * (method.head(z).argmax(1) == y).float().mean().item())
    assert result.block_chain == pytest.approx(expected_blocks)
    assert result.readout == pytest.approx(expected_readout, abs=1e-4)
    final = accuracy(method, x, y, 3, solver, 1000, seed=5)
    assert result.readout[-1] == pytest.approx(final.mean)


@pytest.mark.parametrize("fused", [False, True], ids=["blocks", "fused"])
def test_q_and_noise_checks_match_whole_block_calls_and_reuse_the_chains_image_passes(
    tiny_config, monkeypatch, fused
):
    """Block t's check on z_{t-1} ~ q and block T's on pure noise, recomputed here by whole
    block calls (z, x); the checks themselves take each block's image features from the chain,
    so a checked batch costs T image passes, as an unchecked one does."""
    torch.manual_seed(0)
    cfg, _ = tiny_config("variant.method.num_blocks=3", f"variant.method.fused={fused}")
    method = assemble(cfg, torch.device("cpu")).method
    x, y = torch.randn(50, 1, 16, 16), torch.arange(50) % 10
    block_type, image_passes = type(method.blocks[0]), []  # DTBlock, or the stack's BlockView
    image_features = block_type.image_features

    def counted(block, images):
        image_passes.append(block)
        return image_features(block, images)

    monkeypatch.setattr(block_type, "image_features", counted)
    method.eval()
    _, checks = method.inference_diagnostics(
        x,
        y,
        3,
        PosteriorSolver(),
        torch.Generator().manual_seed(1),
        torch.Generator().manual_seed(2),
    )
    assert len(image_passes) == 3  # a whole block call (z, x) would pass the image again
    monkeypatch.undo()
    by_hand, u_y = torch.Generator().manual_seed(2), method.embedding(y)
    with torch.no_grad():
        expected_q = []
        for t in range(3):
            ab = method.alpha_bars[t]
            z = ab.sqrt() * u_y + (1 - ab).sqrt() * torch.randn(u_y.shape, generator=by_hand)
            expected_q.append(method.blocks[t](z, x).argmax(1) == y)
        noise = torch.randn(u_y.shape, generator=by_hand)
        expected_noise = method.blocks[2](noise, x).argmax(1) == y
    assert torch.equal(checks["block_acc_q"], torch.stack(expected_q))
    assert torch.equal(checks["last_block_noise_acc"][0], expected_noise)


def test_checks_on_the_first_images_leave_every_read_out_as_a_full_pass(tiny_config):
    """The last evaluation of training runs as step_accuracy with the checks on a few images
    (eval.picture_images): its predictions must be those of plain inference over all images,
    and its checks those of a pass over the checked images alone."""
    torch.manual_seed(0)
    cfg, _ = tiny_config("variant.method.num_blocks=3", "dataset.test_size=96")
    parts = assemble(cfg, torch.device("cpu"))
    method, x, y = parts.method, parts.data.test_x, parts.data.test_y
    solver = PosteriorSolver()  # stochastic: a draw out of step would change predictions
    full = measures.step_accuracy(method, x, y, 3, solver, 32, seed=7)
    partial = measures.step_accuracy(method, x, y, 3, solver, 32, seed=7, check_images=40)
    assert (full.checked_images, partial.checked_images) == (96, 64)  # whole batches of 32
    assert partial.readout == full.readout
    assert partial.predictions.tolist() == full.predictions.tolist()
    first = measures.step_accuracy(method, x[:64], y[:64], 3, solver, 32, seed=7)
    assert partial.block_chain == first.block_chain
    assert partial.block_q == first.block_q
    assert partial.last_block_noise == first.last_block_noise

    evaluated = accuracy(method, x, y, 3, solver, 32, repeats=2, seed=7, by_step=True)
    plain = accuracy(method, x, y, 3, solver, 32, repeats=2, seed=7)
    assert (evaluated.mean, evaluated.se) == (plain.mean, plain.se)
    assert evaluated.by_step.predictions.tolist() == full.predictions.tolist()
    assert plain.by_step is None


# ------------------------------------------------------------------- other methods, long solves


class ClassifiesGradually(Method):
    """A stand-in for CT/FM: scores (k / steps) * onehot(x's class); no blocks, a one-hot W."""

    name = "stub"

    def __init__(self) -> None:
        super().__init__()
        self.embedding = OneHotEmbedding(10)

    def default_steps(self) -> int:
        return 1000

    def trajectory(self, x, steps, solver, generator=None):
        fraction = torch.arange(steps + 1, dtype=torch.float32) / steps
        return fraction.view(-1, 1, 1) * x.flatten(1)[:, :10]


def test_long_solves_are_shown_at_eleven_steps_without_block_diagnostics(compose_config):
    labels = torch.arange(300) % 10
    images = torch.nn.functional.one_hot(labels, 16).float().view(-1, 1, 4, 4)
    data = DataSplits("onehots", images, labels, images, labels, 10)
    cfg, _ = compose_config([*TINY])
    made = logged_pictures.make_pictures(
        cfg, Assembled(data, ClassifiesGradually(), DDIMSolver()), {}
    )
    shown = list(range(0, 1001, 100))
    assert measures.shown_steps(1000) == shown
    # Step 0 scores all zero: argmax is class 0, right for the images of class 0 only.
    assert made.metrics["readout/acc_step_0"] == pytest.approx(100 * (labels == 0).float().mean())
    assert all(made.metrics[f"readout/acc_step_{k}"] == 100.0 for k in shown[1:])
    assert len(made.metrics) == 11 and not any(k.startswith("block") for k in made.metrics)
    assert "dt only" in made.notes["accuracy_by_step"]
    assert "a fixed one-hot W" in made.notes["embedding"]
    heat_map = made.figures["trajectories"].axes[1]
    assert heat_map.images[0].get_array().shape == (11, 10)
    (ax,) = made.figures["accuracy_by_step"].axes
    assert [line.get_label() for line in ax.get_lines()] == ["read-out of $z_t$", "chance"]
    assert len(ax.get_lines()[0].get_xdata()) == 1001


# ------------------------------------------------------------------------ switches and errors


def test_pictures_can_be_switched_off(logged):
    cfg, choices = compose_run_config(
        [
            *TINY,
            f"mlflow.tracking_uri={logged.uri}",  # an existing store: creating one takes seconds
            "mlflow.experiment_name=switched-off",
            "train.epochs=1",
            "variant.method.num_blocks=2",
            "dataset.train_size=64",
            "dataset.test_size=32",
            "eval.pictures=false",
            "mlflow.log_model=false",
        ]
    )
    run(cfg, choices)
    client = MlflowClient(logged.uri)
    experiment = client.get_experiment_by_name("switched-off")
    (logged_run,) = client.search_runs([experiment.experiment_id])
    assert client.list_artifacts(logged_run.info.run_id, "pictures") == []
    assert "blocks/acc_chain_1" not in logged_run.data.metrics
    with pytest.raises(SystemExit, match="no logged weights"):
        cli.main([logged_run.info.run_id, "--tracking-uri", logged.uri])


def test_unknown_solver_is_a_clear_error():
    with pytest.raises(UserError, match="--solver rk4: no such solver; choose one of ddim, dpm"):
        solver_by_name("rk4")


def test_importing_the_training_loop_loads_no_matplotlib():
    # Only runs that draw pay for matplotlib: train.py imports the pictures when it makes them.
    code = "import noprop_exp.train, sys; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)

"""NoProp-CT: its loss against independent maths, what it trains, its inference, and that it learns.

Also here, as they concern every variant: the nine variant x embedding combinations, the paper
presets, and the per-step-count metrics in MLflow.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from torch import nn

from noprop_exp import diffusion
from noprop_exp.assemble import assemble
from noprop_exp.schedules import LearnedSchedule
from noprop_exp.solvers import DDIMSolver, EulerSolver, HeunSolver, PosteriorSolver
from noprop_exp.train import run

F64 = torch.float64
CPU = torch.device("cpu")
SOLVERS = [PosteriorSolver(), DDIMSolver(), EulerSolver(), HeunSolver()]


class RecordingNetwork(nn.Module):
    """Stands in for CTNetwork: logits = logits_fn(z, t), a known function; records z and t."""

    def __init__(self, logits_fn) -> None:
        super().__init__()
        self.logits_fn = logits_fn
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(x), 1)

    def from_features(self, z: torch.Tensor, features: torch.Tensor, t: torch.Tensor):
        t = t.expand(len(z)) if t.dim() == 0 else t
        self.calls.append((z.detach().clone(), t.detach().clone()))
        return self.logits_fn(z, t)


class RecordingHead(nn.Module):
    """Wraps a head and records what it reads."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head
        self.inputs: list[torch.Tensor] = []

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.inputs.append(z.detach().clone())
        return self.head(z)


def build(tiny_config, *overrides: str):
    torch.manual_seed(0)
    cfg, _ = tiny_config("variant=ct", *overrides)
    return assemble(cfg, CPU)


def t_logits(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Logits that depend on t only, so the error ||u_hat - u_y|| is known from t and y."""
    return torch.outer(t, torch.arange(10.0)) - 3 * t[:, None] ** 2


def snr_prime_linear(t: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """d/dt of ab / (1 - ab) with ab = low + (high - low) t: (high - low) / (1 - ab)^2."""
    ab = low + (high - low) * t.double()
    return (high - low) / (1 - ab) ** 2


def snr_prime_learned(schedule: LearnedSchedule, t: torch.Tensor) -> torch.Tensor:
    """Central differences of SNR = exp(-gamma) in float64 (not the schedule's autograd)."""
    h = 1e-5
    t = t.double().clamp(h, 1 - h)
    with torch.no_grad():
        return (torch.exp(-schedule.gamma(t + h)) - torch.exp(-schedule.gamma(t - h))) / (2 * h)


def kl_gaussians(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, var I) || N(0, I)) per row, from the textbook per-dimension formula."""
    return 0.5 * (mean.pow(2) + var - 1 - torch.log(var)).sum(1)


@pytest.mark.parametrize("schedule", ["linear", "learned"])
def test_loss_is_the_snr_prime_weighted_error_plus_head_ce_and_kl(tiny_config, schedule):
    overrides = ["embedding=learned", f"noise_schedule={schedule}", "variant.method.eta=0.7"]
    if schedule == "linear":
        overrides += ["noise_schedule.alpha_min=0.001", "noise_schedule.alpha_max=0.99"]
    parts = build(tiny_config, *overrides)
    method, data = parts.method, parts.data
    method.network = RecordingNetwork(t_logits)
    method.head = RecordingHead(method.head)
    x, y = data.train_x, data.train_y  # 512 examples: enough for the moment checks below

    loss, diagnostics = next(method.update_losses(x, y))

    (z_t, t), z_1 = method.network.calls[0], method.head.inputs[0]
    W = method.embedding.weight.detach().double()
    u = W[y]
    if schedule == "linear":
        weight = snr_prime_linear(t, 0.001, 0.99)
        ab_t = 0.001 + (0.99 - 0.001) * t.double()
        ab_0, ab_1 = torch.tensor(0.001, dtype=F64), torch.tensor(0.99, dtype=F64)
    else:
        weight = snr_prime_learned(method.schedule, t)
        gamma = method.schedule.gamma(torch.cat([t, torch.tensor([0.0, 1.0])]).double()).detach()
        ab_all = 1 / (1 + torch.exp(gamma))
        ab_t, ab_0, ab_1 = ab_all[:-2], ab_all[-2], ab_all[-1]
        assert ab_0 < 1e-3 and ab_1 > 0.999  # gamma from 7 at t = 0 to -7 at t = 1
    assert torch.all(weight > 0)
    u_hat = F.softmax(t_logits(z_t, t).double(), dim=1) @ W
    denoising = (0.7 / 2 * weight * (u_hat - u).pow(2).sum(1)).mean()
    cross_entropy = F.cross_entropy(method.head.head(z_1).double(), y)
    kl = kl_gaussians(ab_0.sqrt() * u, (1 - ab_0).expand_as(u)).mean()

    torch.testing.assert_close(diagnostics["loss/denoise"].double(), denoising, rtol=2e-4, atol=0)
    torch.testing.assert_close(
        loss.detach().double(), denoising + cross_entropy + kl, rtol=2e-4, atol=1e-5
    )
    # z_t and z_1 are draws of q(z | y) = N(sqrt(ab) u_y, (1 - ab) I), not a model's output.
    # The implied noise is N(0, I), and uncorrelated with u_y: a noising mean of ab * u_y (a
    # known slip) would leave a component along u_y of mean ~0.2 at these t (s.e. 0.045).
    for z, ab in ((z_t, ab_t[:, None]), (z_1, ab_1)):
        noise = (z.double() - ab.sqrt() * u) / (1 - ab).sqrt()
        along_u = (noise * u).sum(1) / u.norm(dim=1)
        assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05
        assert abs(along_u.mean()) < 0.15


def test_time_bins_split_the_denoising_loss(tiny_config):
    parts = build(tiny_config, "variant.method.t_sampling=stratified")
    method, data = parts.method, parts.data
    method.network = RecordingNetwork(t_logits)
    _, diagnostics = next(method.update_losses(data.train_x[:100], data.train_y[:100]))
    _, t = method.network.calls[0]
    bins = torch.stack([diagnostics[f"loss/tbin_{k}"] for k in range(5)])
    # Stratified: exactly 20 of the 100 times in each fifth of [0, 1].
    assert torch.bincount((t * 5).long(), minlength=5).tolist() == [20] * 5
    torch.testing.assert_close(bins.mean(), diagnostics["loss/denoise"])
    # SNR' grows by orders of magnitude towards t = 1 (docs/NOPROP_SPEC.md §3): the last
    # bin dominates.
    assert bins[-1] > 10 * bins[:-1].max()


def test_the_loss_trains_every_part_and_head_steps_only_the_head_and_w(tiny_config):
    parts = build(tiny_config, "embedding=learned", "variant.method.head_updates=3")
    method, data = parts.method, parts.data
    losses = method.update_losses(data.train_x[:16], data.train_y[:16])
    main, _ = next(losses)
    main.backward()
    for name, p in method.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    method.zero_grad(set_to_none=True)
    head_only, diagnostics = next(losses)
    head_only.backward()
    assert diagnostics == {}
    for name, p in method.named_parameters():
        touched = p.grad is not None and p.grad.abs().sum() > 0
        assert touched == name.startswith(("head.", "embedding.")), name
    assert len(list(losses)) == 1  # head_updates - 1 head-only steps in all


def test_learned_schedule_is_exempt_from_weight_decay(tiny_config):
    method = build(tiny_config).method
    groups = method.parameter_groups(1e-3)
    schedule = {id(p) for p in method.schedule.parameters()}
    assert len(schedule) == 6
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in groups}
    assert by_decay[0.0] == schedule
    assert by_decay[1e-3] == {id(p) for p in method.parameters()} - schedule
    method.decay_schedule = True
    assert [g["weight_decay"] for g in method.parameter_groups(1e-3)] == [1e-3]


def test_diagnostics_report_the_learned_endpoints_and_how_far_the_schedule_moved(tiny_config):
    method = build(tiny_config).method
    expected = {"schedule/gamma_0": -7.0, "schedule/gamma_1": 7.0, "schedule/log_snr_shift": 0}
    assert method.diagnostics() == pytest.approx(expected, abs=1e-5)
    with torch.no_grad():  # gamma_0 and gamma_1 both down by 0.5: log SNR = -gamma up by 0.5
        method.schedule.gamma_0 -= 0.5
    assert method.diagnostics()["schedule/log_snr_shift"] == pytest.approx(0.5, abs=1e-4)
    assert build(tiny_config, "noise_schedule=cosine").method.diagnostics() == {}


def cosine_snr(t: torch.Tensor) -> torch.Tensor:
    """SNR of the spec's cosine schedule, written out (delta 0.008, clamped to [1e-4, 0.9999])."""
    ab = torch.cos((1 - t + 0.008) / 1.008 * (math.pi / 2)).square().clamp(1e-4, 0.9999)
    return ab / (1 - ab)


def test_importance_sampled_t_has_density_snr_prime_and_a_weight_that_undoes_it(tiny_config):
    overrides = ["noise_schedule=cosine", "variant.method.t_sampling=importance"]
    method = build(tiny_config, *overrides).method
    torch.manual_seed(0)
    t = diffusion.sample_times(40_000, "importance", CPU, method.schedule).double()
    # The CDF of density SNR'/(SNR(1) - SNR(0)) is (SNR(t) - SNR(0)) / (SNR(1) - SNR(0)).
    ends = cosine_snr(torch.tensor([0.0, 1.0], dtype=F64))
    quantiles = torch.linspace(0.05, 0.95, 19, dtype=F64)
    cdf = (cosine_snr(torch.quantile(t, quantiles)) - ends[0]) / (ends[1] - ends[0])
    torch.testing.assert_close(cdf, quantiles, rtol=0, atol=0.01)
    # The weight divides SNR' by that density: the SNR range, whatever t, so that
    # E_t~p[weight(t) f(t)] is the paper's E_t~U[SNR'(t) f(t)].
    weights = method.weight(t[:100].float())
    expected = torch.full_like(weights, float(ends[1] - ends[0]))  # float32 SNR(1): to 1e-3
    torch.testing.assert_close(weights, expected, rtol=1e-3, atol=0)
    uniform = build(tiny_config, "variant.method.loss_weight=uniform").method
    assert torch.equal(uniform.weight(t[:5].float()), torch.ones(5))


def norm(parameters) -> float:
    return torch.cat([p.grad.flatten() for p in parameters if p.grad is not None]).norm().item()


def test_gradient_norms_of_each_loss_term(tiny_config):
    """With a fixed schedule and one-hot W, the denoising term reaches the network only and the
    head term the head only: each logged norm is then that part's gradient norm after one
    backward pass of the whole loss."""
    parts = build(tiny_config, "variant.method.grad_norms=true", "noise_schedule=cosine")
    method, data = parts.method, parts.data
    loss, diagnostics = next(method.update_losses(data.train_x[:32], data.train_y[:32]))
    loss.backward()
    assert diagnostics["grad_norm/denoise"].item() == pytest.approx(
        norm(method.network.parameters()), rel=1e-4
    )
    assert diagnostics["grad_norm/head"].item() == pytest.approx(
        norm(method.head.parameters()), rel=1e-4
    )
    assert "grad_norm/denoise_schedule" not in diagnostics  # nothing to train in a fixed one
    learned = build(tiny_config, "variant.method.grad_norms=true").method
    _, diagnostics = next(learned.update_losses(data.train_x[:32], data.train_y[:32]))
    assert 0 < diagnostics["grad_norm/denoise_schedule"] <= diagnostics["grad_norm/denoise"]


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: s.name)
def test_every_solver_infers_without_the_label(tiny_config, solver, monkeypatch):
    parts = build(tiny_config)
    method, x = parts.method, parts.data.test_x[:6]

    def forbidden(*_args, **_kwargs):
        raise AssertionError("inference looked up a label's embedding")

    monkeypatch.setattr(method.embedding, "forward", forbidden)
    image_passes = []
    method.network.image_branch.register_forward_hook(lambda *_: image_passes.append(1))
    method.eval()
    scores = method.predict(x, 7, solver, torch.Generator().manual_seed(3))
    trajectory = method.trajectory(x, 7, solver, torch.Generator().manual_seed(3))
    assert scores.shape == (6, 10) and torch.isfinite(scores).all()
    assert trajectory.shape == (8, 6, 10)
    torch.testing.assert_close(trajectory[-1], scores)  # same noise, same path
    assert len(image_passes) == 2  # one per solve, not one per step (heun: two per step)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_fixed_schedules_work_as_ablations(tiny_config, schedule):
    parts = build(tiny_config, f"noise_schedule={schedule}")
    loss, _ = next(parts.method.update_losses(parts.data.train_x[:8], parts.data.train_y[:8]))
    loss.backward()
    assert math.isfinite(loss.item())
    assert parts.method.predict(parts.data.test_x[:4], 5, HeunSolver()).shape == (4, 10)


def test_bad_settings_fail_with_the_key_to_fix(tiny_config):
    for override, message in [
        ("variant.method.t_sampling=sobol", "t_sampling"),
        ("variant.method.head_updates=0", "head_updates"),
        ("variant.method.loss_bins=0", "loss_bins"),
        ("variant.method.loss_weight=elbo", "loss_weight"),
    ]:
        with pytest.raises(ValueError, match=message):
            build(tiny_config, override)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One MLflow store for this module's runs: creating a store's tables takes seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def test_ct_learns_synthetic_data_and_logs_accuracy_per_step_count(tiny_config, store, tmp_path):
    torch.manual_seed(0)
    cfg, choices = tiny_config(
        "variant=ct",
        "train.epochs=4",
        "train.batch_size=16",
        "eval.steps=10",
        "eval.steps_sweep=[2,5,10]",
        "mlflow.log_model=false",
        "eval.pictures=false",
        f"mlflow.tracking_uri={store}",
        "mlflow.run_name=ct-steps-sweep",
    )
    metrics = run(cfg, choices)
    assert metrics["test_acc"] > 60.0  # chance: 10%

    client = MlflowClient(store)
    (logged,) = client.search_runs(
        [client.get_experiment_by_name("noprop").experiment_id],
        filter_string="attributes.run_name = 'ct-steps-sweep'",
    )
    assert logged.data.tags["noise_schedule"] == "learned"
    for n in (2, 5, 10):
        assert logged.data.metrics[f"test_acc_steps/{n}"] == pytest.approx(
            metrics[f"test_acc_steps/{n}"]
        )
    # Same model, steps and inference seed as the last evaluation: the same accuracy.
    assert metrics["test_acc_steps/10"] == pytest.approx(metrics["test_acc"])
    for name in (
        "schedule/gamma_0",
        "schedule/gamma_1",
        "loss/tbin_4",
        "loss/denoise",
        "loss/head",
    ):
        assert len(client.get_metric_history(logged.info.run_id, name)) == 4, name
    path = client.download_artifacts(logged.info.run_id, "acc_vs_steps.json", str(tmp_path))
    table = json.loads(Path(path).read_text())
    assert [row[0] for row in table["data"]] == [2, 5, 10]


@pytest.mark.parametrize("variant", ["dt", "ct", "fm"])
@pytest.mark.parametrize("embedding", ["onehot", "learned", "prototype"])
def test_every_variant_runs_with_every_embedding(tiny_config, store, variant, embedding):
    torch.manual_seed(0)
    # dt infers with its blocks (eval.steps null); 3 of them keep this test quick.
    steps = "variant.method.num_blocks=3" if variant == "dt" else "eval.steps=3"
    cfg, choices = tiny_config(
        f"variant={variant}",
        f"embedding={embedding}",
        steps,
        "train.epochs=1",
        "dataset.train_size=128",
        "dataset.test_size=64",
        "mlflow.log_model=false",
        f"mlflow.tracking_uri={store}",
    )
    metrics = run(cfg, choices)
    assert math.isfinite(metrics["train_loss"])
    assert 0 <= metrics["test_acc"] <= 100


def test_ct_defaults_and_paper_presets(compose_config):
    cfg, choices = compose_config(["variant=ct"])
    assert (choices["noise_schedule"], choices["solver"]) == ("learned", "posterior")
    assert str(cfg.train.optimizer.value) == "adam"
    assert cfg.variant.method.eta == 1.0
    # The command line wins over the variant's default schedule.
    assert compose_config(["variant=ct", "noise_schedule=cosine"])[1]["noise_schedule"] == "cosine"
    epochs = {"mnist": (100, 100), "cifar10": (150, 500), "cifar100": (150, 1000)}
    for dataset, (dt_epochs, ct_fm_epochs) in epochs.items():
        for variant in ("dt", "ct", "fm"):
            cfg, choices = compose_config([f"experiment=paper/{dataset}_{variant}"])
            assert (choices["dataset"], choices["variant"]) == (dataset, variant)
            assert cfg.train.epochs == (dt_epochs if variant == "dt" else ct_fm_epochs)
            assert cfg.eval.repeats == 5
            assert cfg.eval.steps == (None if variant == "dt" else 1000)
            expected = {"dt": "adamw", "ct": "adam", "fm": "adam"}[variant]
            assert str(cfg.train.optimizer.value) == expected
            schedule = {"dt": "cosine", "ct": "learned", "fm": "cosine"}[variant]
            assert choices["noise_schedule"] == schedule
            solver = {"dt": "posterior", "ct": "posterior", "fm": "euler"}[variant]
            assert choices["solver"] == solver
            assert (cfg.train.batch_size, cfg.train.lr, cfg.train.weight_decay) == (
                128,
                1e-3,
                1e-3,
            )


def test_the_recipe_preset_is_the_paper_preset_with_uniformly_weighted_t_and_a_cosine_rate(
    compose_config,
):
    """...for 5 epochs in fp32, as it was verified."""
    paper, _ = compose_config(["experiment=paper/mnist_ct"])
    recipe, choices = compose_config(["experiment=recipe/mnist_ct"])
    # The paper presets stay faithful.
    assert (paper.variant.method.loss_weight, paper.train.lr_schedule) == ("snr_prime", "constant")
    assert (recipe.variant.method.loss_weight, recipe.train.lr_schedule) == ("uniform", "cosine")
    assert (paper.train.precision, recipe.train.precision) == ("auto", "fp32")
    assert (paper.train.epochs, recipe.train.epochs) == (100, 5)
    recipe.variant.method.loss_weight, recipe.train.lr_schedule = "snr_prime", "constant"
    recipe.train.precision, recipe.train.epochs = "auto", 100
    assert recipe == paper and choices["experiment"] == "recipe/mnist_ct"


@pytest.mark.slow
@pytest.mark.needs_mnist
def test_ct_learns_real_mnist(tiny_config, capsys):
    torch.manual_seed(0)
    cfg, choices = tiny_config(
        "variant=ct",
        "dataset=mnist",
        "dataset.download=false",
        "dataset.train_size=10000",
        "dataset.test_size=1000",
        "train.epochs=1",
        "train.batch_size=128",
        "eval.steps=20",
        "mlflow.log_model=false",
        "eval.pictures=false",
    )
    metrics = run(cfg, choices)
    with capsys.disabled():
        print(
            f"\nNoProp-CT, 10000 real MNIST images, 1 epoch on CPU: test accuracy "
            f"{metrics['test_acc']:.2f}% (20 posterior steps) after "
            f"{metrics['train_time_s']:.1f} s of training"
        )
    # Chance is 10%; measured 78.7% (the spec's re-implementation: 81.5%). A head trained once
    # per minibatch (head_updates=1) scores ~2-18% here, a reversed schedule stays near chance.
    assert metrics["test_acc"] > 65.0

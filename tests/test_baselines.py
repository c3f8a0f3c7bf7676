"""The paper's baselines: back-propagation through DT's chain, and the adjoint neural ODE."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from noprop_exp.assemble import assemble
from noprop_exp.train import run
from noprop_exp.variants.adjoint import AdjointODE, require_torchdiffeq

CPU = torch.device("cpu")


@pytest.fixture
def backprop(tiny_config):
    torch.manual_seed(0)
    cfg, _ = tiny_config("variant=backprop", "variant.method.num_blocks=4", "embedding=learned")
    return assemble(cfg, CPU)


@pytest.fixture
def adjoint(tiny_config):
    torch.manual_seed(0)
    cfg, _ = tiny_config(
        "variant=adjoint",
        "variant.method.train_steps=8",
        "variant.method.ode_method=rk4",
        "embedding=learned",
    )
    return assemble(cfg, CPU)


def test_one_cross_entropy_reaches_every_block_the_mixing_weights_and_w(backprop):
    """The opposite of NoProp-DT's independence: one loss trains every parameter."""
    method, data = backprop.method, backprop.data
    method.train()
    (loss, _), *rest = list(method.update_losses(data.train_x[:32], data.train_y[:32]))
    assert rest == []
    loss.backward()
    for name, p in method.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
    assert method.mix_logits.grad.shape == (4,)


def test_chain_mixes_each_blocks_prediction_with_tanh_of_learned_weights(backprop):
    """z_t = (1 - tanh(w_t)) z_{t-1} + tanh(w_t) softmax(block_t(z_{t-1}, x)) @ W, recomputed
    from the blocks' own inputs and outputs; block t reads block t-1's output."""
    method, data = backprop.method, backprop.data
    assert torch.allclose(method.mixing(), torch.full((4,), 0.5))
    with torch.no_grad():
        method.mix_logits.copy_(torch.tensor([-0.3, 0.2, 0.7, 1.5]))
    seen = []
    hooks = [
        block.register_forward_hook(lambda _, args, out: seen.append((args[0], out)))
        for block in method.blocks
    ]
    method.eval()
    with torch.no_grad():
        images = data.test_x[:6]
        states = method.chain(images, method.initial_z(images))
    for hook in hooks:
        hook.remove()
    weight = method.embedding.weight
    for t, (w, (z_in, logits)) in enumerate(zip([-0.3, 0.2, 0.7, 1.5], seen, strict=True), 1):
        a = math.tanh(w)
        torch.testing.assert_close(z_in, states[t - 1])
        expected = (1 - a) * states[t - 1] + a * (logits.softmax(1) @ weight)
        torch.testing.assert_close(states[t], expected)


def test_backprop_inference_starts_from_noise_and_checks_its_step_count(backprop, tiny_config):
    method, data = backprop.method, backprop.data
    method.eval()
    x = data.test_x[:8]
    first = method.trajectory(x, 4, backprop.solver, torch.Generator().manual_seed(1))
    again = method.trajectory(x, 4, backprop.solver, torch.Generator().manual_seed(1))
    other = method.trajectory(x, 4, backprop.solver, torch.Generator().manual_seed(2))
    assert first.shape == (5, 8, data.num_classes)
    torch.testing.assert_close(first, again)
    assert not torch.allclose(first[0], other[0])  # z_0 is a fresh draw of N(0, I)
    with pytest.raises(ValueError, match=r"eval\.steps"):
        method.predict(x, 7, backprop.solver)
    cfg, _ = tiny_config(
        "variant=backprop", "variant.method.num_blocks=2", "variant.method.z0=zeros"
    )
    deterministic = assemble(cfg, CPU).method.eval()
    a = deterministic.predict(x, 2, backprop.solver, torch.Generator().manual_seed(1))
    b = deterministic.predict(x, 2, backprop.solver, torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("variant=backprop variant.method.initial_mix=1.0", "initial_mix"),
        ("variant=backprop variant.method.z0=ones", "z0"),
        ("variant=adjoint variant.method.ode_method=dopri5", "fixed-step"),
        ("variant=adjoint variant.method.train_steps=0", "integer >= 1"),
    ],
)
def test_bad_settings_are_rejected_with_the_key_to_fix(tiny_config, override, message):
    cfg, _ = tiny_config(*override.split())
    with pytest.raises(ValueError, match=message):
        assemble(cfg, CPU)


def parameter_grads(method: AdjointODE, x, y, adjoint: bool) -> dict[str, torch.Tensor]:
    method.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same z_0 for both ways
    z1 = method.terminal_state(x, method.train_steps, adjoint=adjoint)
    F.cross_entropy(method.readout(z1), y).backward()
    return {name: p.grad.clone() for name, p in method.named_parameters() if p.grad is not None}


def test_adjoint_gradients_match_backpropagation_through_the_same_solver(adjoint):
    """Every parameter's gradient, image branch and W included, agrees with back-propagation
    through torchdiffeq's own RK4 steps up to the discretisation error of the adjoint pass (which
    integrates its own ODE backwards), in float64. Were the image features handled wrongly, the
    image branch would get no gradient or twice its gradient."""
    method = adjoint.method.double().eval()  # eval: no dropout, so both passes see one network
    x, y = adjoint.data.train_x[:4].double(), adjoint.data.train_y[:4]
    through_adjoint = parameter_grads(method, x, y, adjoint=True)
    direct = parameter_grads(method, x, y, adjoint=False)
    names = {name for name, _ in method.named_parameters()}
    assert through_adjoint.keys() == direct.keys() == names
    assert any(name.startswith("network.image_branch") for name in names)
    for name, grad in direct.items():
        assert grad.abs().sum() > 0, name
        scale = grad.abs().max()
        torch.testing.assert_close(
            through_adjoint[name], grad, rtol=0.05, atol=0.02 * scale, msg=name
        )
    # Not the same computation: the adjoint pass differs by a small discretisation error.
    assert any(not torch.equal(through_adjoint[n], direct[n]) for n in names)


def test_adjoint_inference_reads_out_z1_on_the_training_grid(adjoint):
    method, data = adjoint.method.eval(), adjoint.data
    x = data.test_x[:5]
    trajectory = method.trajectory(x, 6, adjoint.solver, torch.Generator().manual_seed(3))
    scores = method.predict(x, 6, adjoint.solver, torch.Generator().manual_seed(3))
    assert method.default_steps() == 8  # eval.steps=null integrates as in training
    assert trajectory.shape == (7, 5, data.num_classes)
    torch.testing.assert_close(trajectory[-1], scores)
    # Two Euler steps by hand: z_{1/2} = z_0 + f(0, z_0) / 2, z_1 = z_{1/2} + f(1/2, z_{1/2}) / 2.
    method.ode_method = "euler"
    z = torch.randn((5, method.embedding.dim), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        features = method.network.image_features(x)
        for t in (0.0, 0.5):
            logits = method.network.from_features(z, features, torch.tensor(t))
            z = z + 0.5 * logits @ method.embedding.weight
        expected = method.head(z)
    two_steps = method.predict(x, 2, adjoint.solver, torch.Generator().manual_seed(3))
    torch.testing.assert_close(two_steps, expected)


def test_missing_torchdiffeq_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchdiffeq", None)  # makes `import torchdiffeq` fail
    with pytest.raises(ImportError, match=r"pip install -e '\.\[adjoint\]'"):
        require_torchdiffeq()


# Few steps; the DT chain's head reads a convex mix of W's rows, so at lr 1e-3 it learns slowly.
QUICK = {
    "backprop": ["variant.method.num_blocks=2", "train.epochs=4", "train.lr=1e-2"],
    "adjoint": ["variant.method.train_steps=10", "train.epochs=3"],
}


def test_baselines_learn_synthetic_data_and_are_recorded_like_the_others(
    tiny_config, tracking_uri, tmp_path
):
    """One MLflow store for both runs (creating a store takes seconds)."""
    accuracy = {}
    for variant, overrides in QUICK.items():
        torch.manual_seed(0)
        cfg, choices = tiny_config(f"variant={variant}", "mlflow.log_model=false", *overrides)
        accuracy[variant] = run(cfg, choices)["test_acc"]
    assert min(accuracy.values()) > 30.0, accuracy  # chance is 10%
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("noprop").experiment_id])
    assert sorted(r.data.tags["variant"] for r in runs) == ["adjoint", "backprop"]
    for logged in runs:
        variant = logged.data.tags["variant"]
        assert logged.info.status == "FINISHED"
        assert logged.data.params["train.optimizer"] == "adamw"
        assert logged.data.metrics["test_acc"] == pytest.approx(accuracy[variant])
        assert logged.data.metrics["train_time_s"] > 0
        artifacts = {a.path for a in client.list_artifacts(logged.info.run_id)}
        assert {"acc_vs_time.json", "config.yaml", "pictures"} <= artifacts, variant
        folder = tmp_path / variant
        folder.mkdir()
        table = json.loads(
            Path(
                client.download_artifacts(logged.info.run_id, "acc_vs_time.json", str(folder))
            ).read_text()
        )
        assert table["columns"] == ["epoch", "train_time_s", "test_acc", "test_acc_se"]
        assert len(table["data"]) == int(logged.data.params["train.epochs"])


@pytest.mark.parametrize(
    ("dataset", "variant", "epochs"),
    [
        ("mnist", "backprop", 100),
        ("cifar10", "backprop", 150),
        ("cifar100", "backprop", 150),
        ("mnist", "adjoint", 2),
        ("cifar10", "adjoint", 4),
        ("cifar100", "adjoint", 4),
    ],
)
def test_paper_presets_carry_the_papers_settings(compose_config, dataset, variant, epochs):
    """docs/NOPROP_SPEC.md §8: batch 128, AdamW, lr and weight decay 1e-3; adjoint 1000 steps."""
    cfg, choices = compose_config([f"experiment=paper/{dataset}_{variant}"])
    assert (choices["dataset"], choices["variant"], choices["backbone"]) == (
        dataset,
        variant,
        "cnn",
    )
    assert cfg.train.epochs == epochs
    assert (cfg.train.batch_size, cfg.train.lr, cfg.train.weight_decay) == (128, 1e-3, 1e-3)
    assert cfg.variant.optimizer == "adamw"
    assert cfg.eval.repeats == 5
    if variant == "adjoint":
        assert cfg.variant.method.train_steps == 1000
    else:
        assert cfg.variant.method.num_blocks == 10

"""End to end: the CLI trains, MLflow holds the run; failures are clear and recorded."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from noprop_exp.evaluation import main as evaluate_main
from noprop_exp.train import run
from noprop_exp.variants.dt import NoPropDT
from tests.conftest import TINY


def only_run(tracking_uri: str, experiment: str = "noprop"):
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_cli_records_params_tags_metrics_and_artifacts(tmp_path, tracking_uri, capsys):
    command = [
        sys.executable,
        "-m",
        "noprop_exp.train",
        *TINY,
        "eval.repeats=2",
        f"mlflow.tracking_uri={tracking_uri}",
        f"hydra.run.dir={tmp_path / 'out'}",
    ]
    subprocess.run(command, check=True, capture_output=True, text=True)

    client, logged = only_run(tracking_uri)
    assert logged.info.status == "FINISHED"
    assert logged.data.params["train.epochs"] == "2"
    assert logged.data.params["variant.method.eta"] == "0.1"
    assert logged.data.params["train.optimizer"] == "adamw"
    assert {
        k: logged.data.tags[k]
        for k in ("variant", "dataset", "backbone", "embedding", "noise_schedule", "solver")
    } == {
        "variant": "dt",
        "dataset": "synthetic",
        "backbone": "cnn",
        "embedding": "onehot",
        "noise_schedule": "cosine",
        "solver": "posterior",
    }
    for metric in ("train_loss", "test_acc", "test_acc_se", "train_time_s"):
        history = client.get_metric_history(logged.info.run_id, metric)
        assert [m.step for m in history] == [1, 2], metric
    times = [m.value for m in client.get_metric_history(logged.info.run_id, "train_time_s")]
    assert 0 < times[0] < times[1]
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert {"acc_vs_time.json", "config.yaml", "model"} <= artifacts
    table = json.loads(
        Path(
            client.download_artifacts(logged.info.run_id, "acc_vs_time.json", str(tmp_path))
        ).read_text()
    )
    assert table["columns"] == ["epoch", "train_time_s", "test_acc", "test_acc_se"]
    assert [row[0] for row in table["data"]] == [1, 2]
    assert table["data"][-1][2] == pytest.approx(logged.data.metrics["test_acc"])

    # The logged weights, re-loaded by noprop-eval, give the logged accuracy again.
    evaluate_main(
        [logged.info.run_id, "--tracking-uri", tracking_uri, "--repeats", "2", "--device", "cpu"]
    )
    printed = capsys.readouterr().out
    assert f"test accuracy {logged.data.metrics['test_acc']:.2f}%" in printed
    # --solver builds conf/solver/NAME.yaml: the run's own (posterior) gives its accuracy again.
    logged_run = [logged.info.run_id, "--tracking-uri", tracking_uri, "--device", "cpu"]
    evaluate_main([*logged_run, "--repeats", "2", "--solver", "posterior"])
    printed = capsys.readouterr().out
    assert f"test accuracy {logged.data.metrics['test_acc']:.2f}%" in printed
    assert "solver posterior" in printed
    evaluate_main([*logged_run, "--solver", "dpm"])
    assert "steps, solver dpm," in capsys.readouterr().out


def test_a_run_that_raises_is_failed_and_keeps_what_it_logged(
    tiny_config, tracking_uri, monkeypatch
):
    cfg, choices = tiny_config("train.epochs=3")
    original = NoPropDT.update_losses
    calls = {"n": 0}
    batches_per_epoch = math.ceil(cfg.dataset.train_size / cfg.train.batch_size)

    def nan_in_second_epoch(self, x, y):
        calls["n"] += 1
        for loss, diagnostics in original(self, x, y):
            yield (loss * float("nan") if calls["n"] > batches_per_epoch else loss), diagnostics

    monkeypatch.setattr(NoPropDT, "update_losses", nan_in_second_epoch)
    with pytest.raises(FloatingPointError, match=r"train\.lr"):
        run(cfg, choices)
    client, logged = only_run(tracking_uri)
    assert logged.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(logged.info.run_id, "test_acc")] == [1]
    assert mlflow.active_run() is None


def test_missing_data_stops_before_training_and_names_the_files(tmp_path, tracking_uri):
    command = [
        sys.executable,
        "-m",
        "noprop_exp.train",
        "dataset=mnist",
        f"dataset.root={tmp_path / 'nowhere'}",
        "dataset.download=false",
        f"mlflow.tracking_uri={tracking_uri}",
        f"hydra.run.dir={tmp_path / 'out'}",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode != 0
    assert str(tmp_path / "nowhere") in result.stderr
    assert "train-images-idx3-ubyte" in result.stderr
    assert not (tmp_path / "mlflow.db").exists() or not MlflowClient(
        tracking_uri
    ).search_experiments(filter_string="name = 'noprop'")


@pytest.mark.needs_mnist
def test_dt_learns_real_mnist(tiny_config, capsys):
    torch.manual_seed(0)
    cfg, choices = tiny_config(
        "dataset=mnist",
        "dataset.download=false",
        "dataset.train_size=6000",
        "dataset.test_size=1000",
        "train.epochs=1",
        "train.batch_size=128",
        "mlflow.log_model=false",
    )
    metrics = run(cfg, choices)
    with capsys.disabled():
        print(
            f"\nNoProp-DT, 6000 real MNIST images, 1 epoch on CPU: test accuracy "
            f"{metrics['test_acc']:.2f}% after {metrics['train_time_s']:.1f} s of training"
        )
    # Chance is 10%; a reversed schedule or a head starved of updates stays far below this
    # (with one head update per minibatch instead of T, this run scores about 20%).
    assert metrics["test_acc"] > 75.0


def test_console_script_finds_the_configs_from_any_directory(tmp_path):
    """`noprop-train` imports the package (not a file): the config path must still resolve."""
    script = shutil.which("noprop-train")
    assert script, "noprop-train is not on PATH: install the suite with pip install -e ."
    result = subprocess.run(
        [script, "--cfg", "job", "variant=dt"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "num_blocks: 10" in result.stdout


BatchNorm = torch.nn.modules.batchnorm._BatchNorm  # BatchNorm1d/2d alike


def test_the_pre_training_check_leaves_batch_norm_statistics_alone(tiny_config, monkeypatch):
    """The solver check before training runs test images through the model: in eval mode, so
    batch norm's running statistics are still those of initialisation when training starts."""
    from noprop_exp import train

    seen = {}

    def first_step(method, *args, **kwargs):
        norms = [m for m in method.modules() if isinstance(m, BatchNorm)]
        seen["untouched"] = all(
            bool((m.running_mean == 0).all() and (m.running_var == 1).all()) for m in norms
        )
        seen["count"] = len(norms)
        raise RuntimeError("stop after the check")

    monkeypatch.setattr(train, "train_step", first_step)
    cfg, choices = tiny_config("train.epochs=1", "mlflow.system_metrics=false")
    with pytest.raises(RuntimeError, match="stop after the check"):
        train.run(cfg, choices)
    assert seen["count"] > 0 and seen["untouched"]


def test_a_validation_split_is_evaluated_logged_and_reproduced_by_noprop_eval(
    tiny_config, tracking_uri, capsys
):
    cfg, choices = tiny_config("dataset.val_size=40", "variant.method.head_updates=3")
    metrics = run(cfg, choices)
    client, logged = only_run(tracking_uri)
    history = client.get_metric_history(logged.info.run_id, "val_acc")
    assert [m.step for m in history] == [1, 2]
    assert metrics["val_acc"] == pytest.approx(history[-1].value)
    batches = math.ceil(cfg.dataset.train_size / cfg.train.batch_size)
    params = logged.data.params
    assert {k: params[k] for k in params if k.startswith(("epoch.", "data."))} == {
        "epoch.train_images": str(cfg.dataset.train_size),
        "epoch.minibatches": str(batches),
        "epoch.optimizer_steps": str(3 * batches),
        "data.val_images": "40",
        "data.test_images": str(cfg.dataset.test_size),
    }
    # The logged weights on the split rebuilt from the logged config give the logged val_acc:
    # the split is the one trained beside, not a fresh draw.
    logged_run = [logged.info.run_id, "--tracking-uri", tracking_uri, "--device", "cpu"]
    evaluate_main([*logged_run, "--split", "val"])
    printed = capsys.readouterr().out
    assert f"val accuracy {metrics['val_acc']:.2f}% +- 0.00 (1 inference runs" in printed
    assert "40 images" in printed
    evaluate_main([*logged_run, "--test-size", "16"])  # a subset, for long step sweeps
    assert "16 images" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["hydra/sweeper=search"], "needs a validation split: set dataset.val_size"),
        # Optuna's own default direction minimises: it would search for the worst model.
        (["hydra/sweeper=optuna", "dataset.val_size=32"], "would minimize val_acc"),
    ],
)
def test_a_search_that_cannot_select_honestly_is_refused_before_any_run(
    tmp_path, tracking_uri, overrides, message
):
    command = [
        sys.executable,
        "-m",
        "noprop_exp.train",
        "-m",
        *TINY,
        *overrides,
        "hydra.sweeper.n_trials=1",
        f"mlflow.tracking_uri={tracking_uri}",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode != 0
    assert message in done.stderr
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("noprop")
    runs = [] if experiment is None else client.search_runs([experiment.experiment_id])
    assert all("mlflow.parentRunId" not in r.data.tags for r in runs)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_the_learning_rate_follows_train_lr_schedule_minibatch_by_minibatch(
    tiny_config, tracking_uri, monkeypatch, schedule
):
    from noprop_exp import train

    seen, original = [], train.train_step

    def recording(method, optimizer, *args, **kwargs):
        seen.append([group["lr"] for group in optimizer.param_groups])
        return original(method, optimizer, *args, **kwargs)

    monkeypatch.setattr(train, "train_step", recording)
    cfg, choices = tiny_config(
        f"train.lr_schedule={schedule}", "train.lr=0.002", "eval.pictures=false"
    )
    run(cfg, choices)
    total = cfg.train.epochs * math.ceil(cfg.dataset.train_size / cfg.train.batch_size)
    assert len(seen) == total
    # Written out: constant, or a half cosine from 0.002 down towards 0 over the run.
    expected = [
        0.002 if schedule == "constant" else 0.001 * (1 + math.cos(math.pi * k / total))
        for k in range(total)
    ]
    assert [rates[0] for rates in seen] == pytest.approx(expected, rel=1e-12)
    assert all(len(set(rates)) == 1 for rates in seen)  # every parameter group alike
    client, logged = only_run(tracking_uri)
    logged_lr = sorted(client.get_metric_history(logged.info.run_id, "lr"), key=lambda m: m.step)
    per_epoch = total // cfg.train.epochs
    assert [m.value for m in logged_lr] == pytest.approx(expected[per_epoch - 1 :: per_epoch])

"""What a user sees of a run: timed lines, the summary it ends on, its name, system metrics."""

from __future__ import annotations

import logging

import pytest
from mlflow.tracking import MlflowClient

from noprop_exp.console import summary_line, ui_hint
from noprop_exp.tracking import default_run_name
from noprop_exp.train import run


def test_a_run_is_named_logs_its_evaluation_and_ends_on_a_summary(tiny_config, caplog):
    cfg, choices = tiny_config("train.epochs=1")
    with caplog.at_level(logging.INFO):
        metrics = run(cfg, choices)

    client = MlflowClient(cfg.mlflow.tracking_uri)
    (logged,) = client.search_runs([client.get_experiment_by_name("noprop").experiment_id])
    assert logged.info.run_name == "dt-onehot-synthetic-s0"
    assert not any(k.startswith("system/") for k in logged.data.metrics)  # off in debug=tiny
    messages = [r.getMessage() for r in caplog.records]
    assert "evaluating 256 test images at 10 steps, 1 run(s)..." in messages
    summary = messages[-1]
    assert summary == summary_line(
        logged.info.run_id, logged.info.experiment_id, cfg.mlflow.tracking_uri, metrics
    )
    assert f"test_acc {metrics['test_acc']:.2f} +- 0.00 %" in summary
    assert f"mlflow ui --backend-store-uri {cfg.mlflow.tracking_uri}`" in summary
    assert summary.endswith(f"#/experiments/{logged.info.experiment_id}/runs/{logged.info.run_id}")


def test_the_preset_choices_and_seed_name_a_run(tiny_config):
    cfg, choices = tiny_config("experiment=small/mnist_ct", "seed=3")
    assert default_run_name(cfg, choices) == "small/mnist_ct-ct-onehot-synthetic-s3"


def test_a_server_run_is_opened_at_its_url():
    hint = ui_hint("http://mlflow:5000/", "4", "abc")
    assert hint == "open http://mlflow:5000/#/experiments/4/runs/abc"


def test_system_metrics_are_recorded_when_switched_on(tiny_config, monkeypatch):
    pytest.importorskip("psutil")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    cfg, choices = tiny_config("train.epochs=1", "mlflow.system_metrics=true")
    run(cfg, choices)
    client = MlflowClient(cfg.mlflow.tracking_uri)
    (logged,) = client.search_runs([client.get_experiment_by_name("noprop").experiment_id])
    assert "system/cpu_utilization_percentage" in logged.data.metrics

"""MLflow bookkeeping of one training run: its lifecycle, params, tags, metrics and artifacts.

A run opens in a `with tracked_run(...)` block and always closes there: FINISHED when the block
ends, KILLED when a signal or Ctrl-C stops it (tags `stopped.signal`, `stopped.epoch`), FAILED
when it raises, with the one-line reason as the `failure.reason` tag and the traceback as the
`failure/traceback.txt` artifact. Everything logged so far is kept; checkpoints
(`checkpoint.py`) mean a stopped run loses at most its minibatch in progress, a killed one its
epoch in progress. `tracked_run(..., resume_run_id=...)` re-opens a run (RUNNING again).
"""

from __future__ import annotations

import json
import os
import tempfile
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from mlflow.entities import RunStatus
from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS as LOGGED_ARTIFACTS
from omegaconf import DictConfig, OmegaConf

from noprop_exp.lifecycle import RunStopped

# Config groups whose choice becomes a run tag, so the MLflow UI can filter and group runs.
GROUP_TAGS = ("variant", "dataset", "backbone", "embedding", "noise_schedule", "solver")
# Set in each sweep job's process by the sweep callback (noprop_exp.sweep.SweepParentRun):
# the job's run then becomes a child of the sweep's parent run.
PARENT_RUN_ENV = "NOPROP_MLFLOW_PARENT_RUN_ID"
FAILURE_TAG = "failure.reason"
MAX_TAG_CHARS = 5000  # MLflow's tag values hold 8,000 characters (5,000 on older stores)


def flatten_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as dotted keys, e.g. {'train.lr': 0.001}."""
    flat: dict[str, Any] = {}

    def visit(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                visit(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node

    visit(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), "")
    return flat


def default_run_name(cfg: DictConfig, choices: Mapping[str, str]) -> str:
    """What the run is, for the MLflow UI's run list (instead of MLflow's random names):
    `[<experiment preset>-]<variant>-<embedding>-<dataset>-s<seed>`, e.g. `dt-onehot-mnist-s0`."""
    parts = [choices.get("experiment"), choices.get("variant") or cfg.variant.name]
    parts += [choices.get("embedding"), choices.get("dataset"), f"s{cfg.seed}"]
    return "-".join(part for part in parts if part)


class RunTracker:
    """Logs to one active MLflow run; created by `tracked_run`."""

    def __init__(self, run: mlflow.ActiveRun) -> None:
        self.run_id = run.info.run_id
        self.experiment_id = run.info.experiment_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        mlflow.log_metrics({name: float(value) for name, value in metrics.items()}, step=step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        mlflow.log_params(dict(params))

    def latest_metrics(self) -> dict[str, float]:
        return dict(mlflow.get_run(self.run_id).data.metrics)

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """Write (or replace) a table artifact in `mlflow.log_table`'s format. Not log_table
        itself: it appends to an existing table, which would repeat the rows of a table
        rewritten every epoch or after a resume."""
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / Path(artifact_file).name
            pd.DataFrame(rows).to_json(path, orient="split", index=False, date_format="iso")
            folder_in_run = str(Path(artifact_file).parent)
            mlflow.log_artifact(str(path), None if folder_in_run == "." else folder_in_run)
        logged = json.loads(mlflow.get_run(self.run_id).data.tags.get(LOGGED_ARTIFACTS, "[]"))
        entry = {"path": artifact_file, "type": "table"}  # shows the table in the MLflow UI
        if entry not in logged:
            mlflow.set_tag(LOGGED_ARTIFACTS, json.dumps([*logged, entry]))

    def log_state_dict(self, module: torch.nn.Module, artifact_path: str = "model") -> None:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "state_dict.pt"
            torch.save(module.state_dict(), path)
            mlflow.log_artifact(str(path), artifact_path)


class NoTracker(RunTracker):
    """What a process without the run logs (rank > 0 of a distributed run): nothing."""

    def __init__(self) -> None:
        self.run_id = self.experiment_id = None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def latest_metrics(self) -> dict[str, float]:
        return {}

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        pass

    def log_state_dict(self, module: torch.nn.Module, artifact_path: str = "model") -> None:
        pass


@contextmanager
def untracked() -> Iterator[RunTracker]:
    yield NoTracker()


@contextmanager
def tracked_run(
    cfg: DictConfig,
    choices: Mapping[str, str],
    tags: Mapping[str, str] | None = None,
    resume_run_id: str | None = None,
) -> Iterator[RunTracker]:
    """Open the run for `cfg` in its experiment, log config, params and tags, yield a tracker.

    `choices` maps each config group to the option chosen (Hydra's runtime choices); `tags` are
    extra tags. With `resume_run_id` the run is re-opened instead: its params stay those it was
    started with (MLflow does not let them change), `config.yaml` is rewritten (a raised
    `train.epochs`).
    """
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    mlflow.set_experiment(cfg.mlflow.experiment_name)
    tags = dict(tags or {})
    run_name = cfg.mlflow.run_name  # a continued run keeps its name unless told otherwise
    if resume_run_id is None:
        run_name = run_name or default_run_name(cfg, choices)
        tags |= {group: choices[group] for group in GROUP_TAGS if group in choices}
        if choices.get("experiment"):
            tags["experiment"] = choices["experiment"]
        parent_run_id = os.environ.get(PARENT_RUN_ENV)
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
    # Set again on resume: params keep the epochs a run started with (MLflow does not let them
    # change), so the report reads what an extended run is trained to from this tag.
    tags["epochs"] = str(cfg.train.epochs)
    # Closed here rather than by start_run's own context manager, which ends every exception
    # FAILED and records nothing of why. System metrics (CPU, memory, GPU with pynvml) are
    # sampled by MLflow's own thread, which end_run stops; without psutil MLflow warns and
    # the run goes on without them.
    run = mlflow.start_run(
        run_id=resume_run_id, run_name=run_name, log_system_metrics=cfg.mlflow.system_metrics
    )
    try:
        mlflow.set_tags(tags)
        if resume_run_id is None:
            mlflow.log_params(flatten_config(cfg))
        mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        yield RunTracker(run)
    except RunStopped as stopped:
        mlflow.set_tags({"stopped.signal": stopped.signal_name, "stopped.epoch": stopped.epoch})
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise
    except KeyboardInterrupt:
        mlflow.set_tag("stopped.signal", "SIGINT (twice: no checkpoint of this epoch)")
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException as error:
        mlflow.set_tag(FAILURE_TAG, f"{type(error).__name__}: {error}"[:MAX_TAG_CHARS])
        mlflow.log_text(traceback.format_exc(), "failure/traceback.txt")
        mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        raise
    mlflow.end_run()

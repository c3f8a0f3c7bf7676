"""`train.resume`: which MLflow run a training command continues, skips or starts.

- `train.resume=RUN_ID` continues that run with the config it was started with (its
  `config.yaml`). Command-line overrides of keys in `MUTABLE_KEYS` apply (`train.epochs=200`
  trains further); any other override that differs from the run's config is refused.
- `train.resume=auto` (for sweeps and requeued jobs) looks for the latest run of the same job:
  same experiment, same `config_hash` tag (a hash of the resolved config without
  `MUTABLE_KEYS`). FINISHED with at least `train.epochs` epochs: skipped, its metrics returned.
  KILLED, or RUNNING (a process that died without a word), or FINISHED with fewer epochs, with a
  checkpoint: continued. Anything else (none, FAILED, no checkpoint): a new run.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import mlflow
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from mlflow.entities import Run, RunStatus
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from noprop_exp.checkpoint import has_checkpoint
from noprop_exp.distributed import WORLD_SIZE_PARAM
from noprop_exp.lifecycle import EPOCHS_DONE_TAG
from noprop_exp.tracking import flatten_config

log = logging.getLogger(__name__)

# Keys that do not change what is trained, nor the metrics already logged: where runs are
# recorded and data read from, how often to checkpoint and report progress, what to do once
# training ends, and how long to train. (Evaluation keys such as eval.repeats are not here:
# changing them would mix two kinds of test_acc in one run's history.)
MUTABLE_KEYS = (
    "train.epochs",
    "train.resume",
    "train.checkpoint_every",
    "train.log_every",
    "eval.pictures",
    "eval.steps_sweep",
    "mlflow",
    "paths",
    "dataset.root",
    "dataset.download",
)
CONFIG_HASH_TAG = "config_hash"
# Tags of an earlier stop or failure, removed when the run is continued.
STALE_TAGS = ("stopped.signal", "stopped.epoch", "failure.reason")
FINISHED = RunStatus.to_string(RunStatus.FINISHED)
# RUNNING: a process that died without a word (SIGKILL, a lost machine); FINISHED: fewer epochs.
RESUMABLE = {FINISHED, *(RunStatus.to_string(s) for s in (RunStatus.KILLED, RunStatus.RUNNING))}


class ResumeError(ValueError):
    """The run to resume does not exist, cannot be continued, or the overrides conflict."""


@dataclass
class Plan:
    """What `train.run` does: train `cfg` in a new run (`run_id` None) or in run `run_id`, or
    nothing (`finished`: the metrics of the job's finished run)."""

    cfg: DictConfig
    run_id: str | None = None
    finished: dict[str, float] | None = None
    tags: dict[str, str] = field(default_factory=dict)  # for a new run


def is_mutable(key: str) -> bool:
    return any(key == m or key.startswith(f"{m}.") for m in MUTABLE_KEYS)


def config_hash(cfg: DictConfig) -> str:
    """A hash of the resolved config, keys that may change between tries excluded."""
    kept = {k: v for k, v in sorted(flatten_config(cfg).items()) if not is_mutable(k)}
    return hashlib.sha256(json.dumps(kept, default=str).encode()).hexdigest()[:16]


def command_line_keys() -> list[str] | None:
    """The keys (or groups) overridden on the command line; None outside a Hydra app."""
    if not HydraConfig.initialized():
        return None
    overrides = OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task))
    return [o.key_or_group for o in overrides]


def plan_run(cfg: DictConfig, given: list[str] | None, world_size: int = 1) -> Plan:
    """Decide from `cfg.train.resume`; `given`: the keys set on the command line (None: every
    key of `cfg` counts as given, as when `train.run` is called from Python); `world_size`: the
    processes this run trains on (a run continues on as many as it started with)."""
    fresh = Plan(cfg, tags={CONFIG_HASH_TAG: config_hash(cfg)})
    if cfg.train.resume is None:
        return fresh
    client = MlflowClient(cfg.mlflow.tracking_uri)
    if cfg.train.resume == "auto":
        return plan_auto(client, cfg, fresh, world_size)
    run = get_run(client, cfg.train.resume, cfg.mlflow.tracking_uri)
    if not has_checkpoint(run.data.tags):
        raise ResumeError(f"run {run.info.run_id} has no checkpoint to continue from")
    merged = merged_config(cfg, stored_config(client, run), given)
    if run.info.status == FINISHED and epochs_done(run) >= merged.train.epochs:
        raise ResumeError(
            f"run {run.info.run_id} already finished its {epochs_done(run)} epochs: "
            "raise train.epochs to train it further"
        )
    return reopen(client, run, merged, world_size)


def plan_auto(client: MlflowClient, cfg: DictConfig, fresh: Plan, world_size: int) -> Plan:
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment_name)
    if experiment is None:
        return fresh
    runs = client.search_runs(
        [experiment.experiment_id],
        f"tags.{CONFIG_HASH_TAG} = '{fresh.tags[CONFIG_HASH_TAG]}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return fresh
    run = runs[0]
    if run.info.status == FINISHED and epochs_done(run) >= cfg.train.epochs:
        log.info("train.resume=auto: run %s already finished this job: skipped", run.info.run_id)
        return Plan(cfg, finished=dict(run.data.metrics))
    if run.info.status in RESUMABLE and has_checkpoint(run.data.tags):
        log.info("train.resume=auto: continuing run %s (%s)", run.info.run_id, run.info.status)
        return reopen(client, run, cfg, world_size)
    return fresh


def get_run(client: MlflowClient, run_id: str, tracking_uri: str) -> Run:
    try:
        return client.get_run(run_id)
    except mlflow.exceptions.MlflowException as error:
        raise ResumeError(f"no run {run_id} in {tracking_uri}: {error}") from None


def stored_config(client: MlflowClient, run: Run) -> DictConfig:
    text = client.download_artifacts(run.info.run_id, "config.yaml")
    return OmegaConf.load(text)


def epochs_done(run: Run) -> int:
    return int(run.data.tags.get(EPOCHS_DONE_TAG, 0))


def merged_config(cfg: DictConfig, stored: DictConfig, given: list[str] | None) -> DictConfig:
    """The run's config with the given mutable keys of `cfg`; refuses other given changes."""
    flat = flatten_config(cfg)
    keys = list(flat) if given is None else [k.lstrip("+~").partition("@")[0] for k in given]
    conflicts = []
    for key in keys:
        if is_mutable(key):
            continue
        mine, theirs = plain(OmegaConf.select(cfg, key)), plain(OmegaConf.select(stored, key))
        if mine is None and theirs is None and key not in flat:
            conflicts.append(f"{key} (a config group that sets other keys)")
        elif mine != theirs:
            conflicts.append(f"{key} (the run's: {theirs}, given: {mine})")
    if conflicts:
        raise ResumeError(
            f"train.resume={cfg.train.resume} continues that run with the config it was started "
            f"with; these overrides would change what it trains: {'; '.join(conflicts)}. "
            "Drop them, or start a new run."
        )
    merged = OmegaConf.create(OmegaConf.to_container(stored, resolve=True))
    always = ["train.resume", "mlflow.tracking_uri"]  # where the run was just found
    for key in {*always, *(k for k in keys if is_mutable(k))}:
        if key in flat:
            OmegaConf.update(merged, key, flat[key], merge=False)
    return merged


def plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def reopen(client: MlflowClient, run: Run, cfg: DictConfig, world_size: int) -> Plan:
    # Each process's optimiser state is in the checkpoint (a block-parallel one holds its own
    # blocks' only), so a run continues on the number of processes that wrote it.
    trained_on = int(run.data.params.get(WORLD_SIZE_PARAM, "1"))
    if trained_on != world_size:
        raise ResumeError(
            f"run {run.info.run_id} trained on {trained_on} process(es) and continues on as "
            f"many: start it with torchrun --nproc-per-node {trained_on} (this is {world_size})"
        )
    for tag in STALE_TAGS:
        if tag in run.data.tags:
            client.delete_tag(run.info.run_id, tag)
    return Plan(cfg, run_id=run.info.run_id)

"""Typed schemas of the run-level config sections, registered in Hydra's ConfigStore.

`conf/config.yaml` puts `noprop_schema` first in its defaults list, so a mistyped key
(`train.epoch=3`) or a wrong type (`train.epochs=ten`) fails when the config is composed, not
halfway through a run. Config groups that build objects (`dataset`, `backbone`, `noise_schedule`,
`solver`, `embedding`, `variant.method`) are checked by the constructors they name with
`_target_`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, open_dict


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class OptimizerName(str, Enum):
    adam = "adam"
    adamw = "adamw"


class LrSchedule(str, Enum):
    constant = "constant"  # train.lr throughout (the paper)
    cosine = "cosine"  # (ours) train.lr decayed to 0 along a half cosine over the run's minibatches


class Precision(str, Enum):
    auto = "auto"  # bf16 where the device computes it natively, else fp32 (precision.py)
    fp32 = "fp32"
    bf16 = "bf16"


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-3
    lr_schedule: LrSchedule = LrSchedule.constant
    # The paper uses AdamW for DT and the baselines, Adam for CT and FM: each variant says which.
    optimizer: OptimizerName = "${variant.optimizer}"  # type: ignore[assignment]
    log_every: int = 50  # steps between progress-bar updates (each one syncs with the device)
    # bf16: autocast of forward passes (train and eval); auto: bf16 on a GPU that has it and on
    # a CPU with AVX512-BF16 or AMX (where it measured ~1.7x fp32 at equal accuracy), else fp32.
    precision: Precision = Precision.auto
    compile: bool = False  # torch.compile each of the method's networks
    # Convolution weights and activations in NHWC (oneDNN's and cuDNN's preferred layout).
    channels_last: bool = True
    fused_optimizer: bool = True  # Adam(W) as one fused kernel (false: torch's default loop)
    # Epochs between checkpoints (checkpoint.py); 0: only on a signal and after the last epoch.
    checkpoint_every: int = 1
    resume: str | None = None  # a run id to continue, or `auto` (resume.py); null: a new run


@dataclass
class EvalConfig:
    every: int = 1  # epochs between test evaluations (the last epoch is always evaluated)
    steps: int | None = None  # inference steps; null: the variant's own (T for dt, 1000 ct/fm)
    steps_sweep: list[int] = field(default_factory=list)  # extra step counts at the end
    repeats: int = 1  # stochastic inference runs averaged per evaluation (paper: 5)
    batch_size: int = 1000
    seed: int = 1234  # seeds inference noise, separately from training
    pictures: bool = True  # at the end: predictions, trajectories, per-block accuracy (pictures/)
    # (ours) the per-step and per-block accuracies of the pictures on the first N test images:
    # a second full pass (and DT's per-block checks, another) would cost more than the training
    # of a short run; null: every test image.
    picture_images: int | None = 2000


# Where every command records and reads runs unless told otherwise: $MLFLOW_TRACKING_URI, else a
# SQLite file in the working directory. Runs and reading commands share this one default.
LOCAL_TRACKING_URI = "sqlite:///mlflow.db"


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or LOCAL_TRACKING_URI


@dataclass
class MLflowConfig:
    tracking_uri: str = f"${{oc.env:MLFLOW_TRACKING_URI,{LOCAL_TRACKING_URI}}}"
    experiment_name: str = "noprop"
    run_name: str | None = None  # null: <variant>-<embedding>-<dataset>-s<seed> (tracking.py)
    log_model: bool = True
    system_metrics: bool = True  # MLflow's CPU, memory and GPU samples (needs psutil)


@dataclass
class PathsConfig:
    # Datasets are read from (and downloaded into) <data_root>/MNIST, /cifar-10-batches-py, ...
    # Its default ($NOPROP_DATA_DIR, else ./data) is set in conf/paths/default.yaml.
    data_root: str = MISSING


@dataclass
class VariantConfig:
    name: str = MISSING
    optimizer: OptimizerName = MISSING
    method: Any = MISSING


@dataclass
class NoPropConfig:
    seed: int = 0
    device: Device = Device.auto
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    variant: VariantConfig = field(default_factory=VariantConfig)
    dataset: Any = MISSING
    backbone: Any = MISSING
    noise_schedule: Any = MISSING
    solver: Any = MISSING
    embedding: Any = MISSING


def register_configs() -> None:
    ConfigStore.instance().store(name="noprop_schema", node=NoPropConfig)


register_configs()


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose(overrides: Sequence[str] = ()) -> tuple[DictConfig, dict[str, str]]:
    """conf/config.yaml with Hydra overrides, as `noprop-train` composes it, without the `hydra`
    node; and the config-group choices (e.g. {'variant': 'dt', 'dataset': 'mnist', ...})."""
    with hydra.initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra.compose(
            config_name="config", overrides=list(overrides), return_hydra_config=True
        )
    choices = {k: v for k, v in cfg.hydra.runtime.choices.items() if v is not None}
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices

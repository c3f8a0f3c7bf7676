"""Shared fixtures: configs composed with Hydra's compose API, and a throwaway MLflow store."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

import noprop_exp.config  # noqa: F401  (registers the schema)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Small, fast settings for runs on the synthetic dataset.
TINY = ["debug=tiny"]


def compose_run_config(overrides: list[str]) -> tuple[DictConfig, dict[str, str]]:
    """Compose conf/config.yaml with overrides; returns the job config and the group choices."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    choices = {k: v for k, v in cfg.hydra.runtime.choices.items() if v is not None}
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices


@pytest.fixture
def compose_config() -> Callable[[list[str]], tuple[DictConfig, dict[str, str]]]:
    return compose_run_config


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def tiny_config(tracking_uri: str) -> Callable[..., tuple[DictConfig, dict[str, str]]]:
    """A tiny synthetic run recording into a temporary MLflow store."""

    def make(*overrides: str) -> tuple[DictConfig, dict[str, str]]:
        return compose_run_config([*TINY, f"mlflow.tracking_uri={tracking_uri}", *overrides])

    return make

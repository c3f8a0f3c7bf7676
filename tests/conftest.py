"""Shared fixtures: configs composed with Hydra's compose API, a throwaway MLflow store, a
working directory outside the checkout, and the `needs_mnist` marker's one skip condition."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from noprop_exp.config import compose

MNIST_FILES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]

# Small, fast settings for runs on the synthetic dataset.
TINY = ["debug=tiny"]


compose_run_config = compose


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


def pytest_configure(config: pytest.Config) -> None:
    # The tests run in a temporary directory (outside_the_checkout): keep a relative root valid.
    if root := os.environ.get("NOPROP_DATA_DIR"):
        os.environ["NOPROP_DATA_DIR"] = str(Path(root).resolve())


def missing_mnist() -> str | None:
    """Why real MNIST is not where the dataset configs read it ($NOPROP_DATA_DIR), or None."""
    root = os.environ.get("NOPROP_DATA_DIR")
    if not root:
        return "NOPROP_DATA_DIR is not set"
    raw = Path(root) / "MNIST" / "raw"
    absent = [
        f for f in MNIST_FILES if not any((raw / f"{f}{ext}").is_file() for ext in ("", ".gz"))
    ]
    return f"{raw} lacks {', '.join(absent)}" if absent else None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if item.get_closest_marker("needs_mnist") is None or (reason := missing_mnist()) is None:
        return
    reason = (
        f"real MNIST not found ({reason}): needs_mnist tests read "
        f"$NOPROP_DATA_DIR/MNIST/raw/{{{','.join(MNIST_FILES)}}}[.gz]"
    )
    # CI provides the data: there a missing file must fail, not quietly skip the real-data tests.
    if os.environ.get("CI") == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def mnist_root() -> Path:
    """The real-MNIST root of a `needs_mnist` test."""
    return Path(os.environ["NOPROP_DATA_DIR"])


@pytest.fixture(scope="session", autouse=True)
def outside_the_checkout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Run the tests in a temporary directory: MLflow puts artifacts in ./mlruns, Hydra writes
    ./outputs. Session-wide, so that module-scoped fixtures that train run there too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("cwd"))
        yield

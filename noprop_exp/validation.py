"""Checks of a composed run config that Hydra's schema cannot make, run before any data loads.

The typed schema (`config.py`) already refuses a misspelt key or a wrong type when the config is
composed, but Hydra's `+key=value` forces a key in past it, and ranges (`eval.every=0`) are not
types. Each problem is reported in one line that names the setting and a value that works, so a
run that cannot succeed fails in a second instead of after hours of training.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterator, Mapping

from omegaconf import DictConfig

from noprop_exp.config import EvalConfig, MLflowConfig, NoPropConfig, PathsConfig, TrainConfig


class ConfigError(ValueError):
    """A run config that cannot work; the message says what to change."""


# The config sections whose keys the schema fixes; the groups (dataset, variant.method, ...) are
# checked by the constructors their `_target_` names.
TYPED_SECTIONS = {
    "": NoPropConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "mlflow": MLflowConfig,
    "paths": PathsConfig,
}

# (setting, smallest value that works)
AT_LEAST = {
    "train.epochs": 1,
    "train.batch_size": 1,
    "train.log_every": 1,
    "train.checkpoint_every": 0,
    "eval.every": 1,
    "eval.repeats": 1,
    "eval.batch_size": 1,
}


def unknown_keys(cfg: DictConfig) -> Iterator[str]:
    """One message per key in a typed section that its schema does not have."""
    for section, schema in TYPED_SECTIONS.items():
        node = cfg.get(section) if section else cfg
        if not isinstance(node, Mapping):
            continue
        known = [f.name for f in dataclasses.fields(schema)]
        for key in node:
            if key in known:
                continue
            name = f"{section}.{key}" if section else key
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {section + '.' if section else ''}{close[0]}?" if close else ""
            yield f"'{name}' is not a setting of this suite ({hint or 'remove it'})"


def out_of_range(cfg: DictConfig) -> Iterator[str]:
    for name, least in AT_LEAST.items():
        section, key = name.split(".")
        value = cfg[section][key]
        if value < least:
            yield f"{name}={value} cannot work: it must be >= {least}"
    for n in cfg.eval.steps_sweep:
        if n < 1:
            yield f"eval.steps_sweep holds {n}: step counts must be >= 1"
    if cfg.eval.steps is not None and cfg.eval.steps < 1:
        yield f"eval.steps={cfg.eval.steps} cannot work: use null (the variant's own) or >= 1"
    shown = cfg.eval.picture_images
    if shown is not None and shown < 1:
        yield f"eval.picture_images={shown} cannot work: use null (every test image) or >= 1"


def check_run_config(cfg: DictConfig) -> None:
    """Raise `ConfigError` listing every problem of `cfg` (the job config, without `hydra`)."""
    problems = [*unknown_keys(cfg), *out_of_range(cfg)]
    if problems:
        raise ConfigError("; ".join(problems))


def check_search_objective(cfg: DictConfig, sweeper: Mapping) -> None:
    """A search (any sweeper but Hydra's basic grid) optimises what `main` returns, `val_acc`:
    without a validation split there is nothing honest to optimise, and minimising it (Optuna's
    default direction) would search for the worst model; refuse both before the first trial."""
    name = str(sweeper["_target_"]).rsplit(".", 1)[-1]
    if name == "BasicSweeper":
        return
    if not cfg.dataset.get("val_size"):
        raise ConfigError(
            f"{name} maximises val_acc, which needs a validation split: set dataset.val_size "
            "(e.g. dataset.val_size=5000); the test set is never searched on"
        )
    direction = str(sweeper.get("direction", "maximize")).rpartition(".")[2]  # an Enum's name
    if direction != "maximize":
        raise ConfigError(
            f"{name} would {direction} val_acc: use hydra/sweeper=search, or set "
            "hydra.sweeper.direction=maximize"
        )

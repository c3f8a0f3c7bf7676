"""Every config choice composes; mistakes fail at composition with a message that says what."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf.errors import ValidationError

from noprop_exp.config import CONF_DIR

GROUPS = ("dataset", "backbone", "variant", "noise_schedule", "solver", "embedding")


def group_options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in group_options(g)])
def test_every_group_choice_composes(compose_config, group, option):
    cfg, choices = compose_config([f"{group}={option}"])
    assert choices[group] == option
    assert cfg[group] is not None


@pytest.mark.parametrize("group", GROUPS)
def test_group_targets_can_be_imported(compose_config, group):
    """A `_target_` that names a missing class fails here rather than in a user's run."""
    from hydra.utils import get_object

    for option in group_options(group):
        cfg, _ = compose_config([f"{group}={option}"])
        node = cfg.variant.method if group == "variant" else cfg[group]
        assert callable(get_object(node._target_))


def test_defaults_are_the_papers(compose_config):
    cfg, choices = compose_config([])
    assert {g: choices[g] for g in GROUPS} == {
        "dataset": "mnist",
        "backbone": "cnn",
        "variant": "dt",
        "noise_schedule": "cosine",
        "solver": "posterior",
        "embedding": "onehot",
    }
    assert (cfg.train.batch_size, cfg.train.lr, cfg.train.weight_decay) == (128, 1e-3, 1e-3)
    assert str(cfg.train.optimizer.value) == "adamw"
    assert (cfg.variant.method.num_blocks, cfg.variant.method.eta) == (10, 0.1)


def test_unknown_choice_lists_the_available_ones(compose_config):
    with pytest.raises(ConfigCompositionException, match="Available options"):
        compose_config(["variant=nonsense"])


def test_mistyped_key_fails(compose_config):
    with pytest.raises(ConfigCompositionException) as error:
        compose_config(["train.epoch=3"])
    assert "Key 'epoch' not in 'TrainConfig'" in str(error.value.__cause__)


def test_wrong_type_fails(compose_config):
    with pytest.raises(ConfigCompositionException) as error:
        compose_config(["train.epochs=ten"])
    assert isinstance(error.value.__cause__, ValidationError)


def test_unknown_optimizer_fails(compose_config):
    with pytest.raises(ConfigCompositionException):
        compose_config(["train.optimizer=sgd"])


def test_paper_preset_sets_the_papers_settings(compose_config):
    cfg, choices = compose_config(["experiment=paper/mnist_dt"])
    assert choices["experiment"] == "paper/mnist_dt"
    assert cfg.train.epochs == 100
    assert cfg.eval.repeats == 5


@pytest.mark.parametrize("dataset", ["mnist", "cifar10", "cifar100"])
def test_paper_dt_presets_train_block_by_block(compose_config, dataset):
    """As the paper trains them, and as its Table 2 measures DT's memory."""
    cfg, _ = compose_config([f"experiment=paper/{dataset}_dt"])
    assert cfg.variant.method.backward == "per_block" and not cfg.variant.method.fused


def test_small_presets_compose_from_the_main_config_tree(compose_config):
    cfg, choices = compose_config(["experiment=small/mnist_ct"])
    assert choices["experiment"] == "small/mnist_ct"
    assert (cfg.variant.name, cfg.eval.steps, cfg.train.epochs) == ("ct", 20, 100)


@pytest.mark.parametrize("option", group_options("debug"))
def test_debug_options_shrink_the_paper_presets(compose_config, option):
    """debug comes last in the defaults list, so it wins over the preset's 100 epochs."""
    cfg, choices = compose_config(["experiment=paper/mnist_dt", f"debug={option}"])
    assert choices["debug"] == option
    assert cfg.train.epochs <= 2 and cfg.dataset.train_size <= 1000


def test_dataset_root_defaults_to_the_environment_variable(compose_config, monkeypatch):
    monkeypatch.setenv("NOPROP_DATA_DIR", "/somewhere/data")
    cfg, choices = compose_config([])
    assert choices["paths"] == "default"
    assert cfg.dataset.root == "/somewhere/data"
    monkeypatch.delenv("NOPROP_DATA_DIR")
    assert compose_config([])[0].dataset.root == "./data"


def test_schedules_and_solvers_instantiate(compose_config):
    for schedule in group_options("noise_schedule"):
        cfg, _ = compose_config([f"noise_schedule={schedule}"])
        assert hasattr(instantiate(cfg.noise_schedule), "alpha_bar")
    for solver in group_options("solver"):
        cfg, _ = compose_config([f"solver={solver}"])
        assert hasattr(instantiate(cfg.solver), "step")

"""Settings that cannot work are refused before any data loads, in one line naming the fix."""

from __future__ import annotations

import pytest

from noprop_exp.validation import ConfigError, check_run_config
from tests.conftest import TINY, compose_run_config


def refusal(*overrides: str) -> str:
    cfg, _ = compose_run_config([*TINY, *overrides])
    with pytest.raises(ConfigError) as failure:
        check_run_config(cfg)
    return str(failure.value)


def test_the_default_and_tiny_configs_pass() -> None:
    check_run_config(compose_run_config([])[0])
    check_run_config(compose_run_config(TINY)[0])


def test_a_key_forced_in_with_plus_is_refused_with_the_close_match() -> None:
    message = refusal("+train.epoch=1")
    assert message == "'train.epoch' is not a setting of this suite (did you mean train.epochs?)"
    assert "'colour' is not a setting" in refusal("+colour=red")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("eval.every=0", "eval.every=0 cannot work: it must be >= 1"),
        ("eval.repeats=0", "eval.repeats=0 cannot work: it must be >= 1"),
        ("train.epochs=0", "train.epochs=0 cannot work: it must be >= 1"),
        ("train.batch_size=-5", "train.batch_size=-5 cannot work: it must be >= 1"),
        ("eval.steps=0", "eval.steps=0 cannot work: use null (the variant's own) or >= 1"),
        (
            "eval.picture_images=0",
            "eval.picture_images=0 cannot work: use null (every test image) or >= 1",
        ),
        ("eval.steps_sweep=[10,0]", "eval.steps_sweep holds 0: step counts must be >= 1"),
    ],
)
def test_ranges_that_cannot_work_are_refused(override: str, expected: str) -> None:
    assert refusal(override) == expected


def test_every_problem_is_listed_at_once() -> None:
    message = refusal("eval.every=0", "+train.epoch=1")
    assert "eval.every=0" in message and "'train.epoch'" in message

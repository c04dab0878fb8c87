"""The settings dataclasses that the errors tests do not reach: the experiment grid, the service's settings, and the
package's shape (every settings module small enough to read in one sitting)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from covidcxr.config import ENGINES, ExperimentConfig, ServeConfig, TrainConfig, save_json, to_dict
from covidcxr.errors import InputError

GRID = {"data": "DATA", "settings": {"baseline": {}, "rest": {"task": "covid-vs-rest", "augment": {"blur": 0.2}}},
        "base": {"epochs": 2, "augment": {"rotate_deg": 5}}}


def test_a_grid_setting_is_defaults_then_base_then_its_overrides():
    grid = ExperimentConfig.from_mapping(GRID)
    assert (grid.seeds, grid.eval_task, grid.folds, grid.keep_checkpoints) == ([0], "covid-vs-normal", [], True)
    rest = grid.train_config("rest")
    assert isinstance(rest, TrainConfig) and (rest.epochs, rest.task) == (2, "covid-vs-rest")
    assert (rest.augment.rotate_deg, rest.augment.blur, rest.augment.equalize) == (5, 0.2, "global")
    assert grid.train_config("baseline").task == "covid-vs-normal"


def test_a_grid_round_trips_through_its_saved_json(tmp_path: Path):
    grid = ExperimentConfig.from_mapping({**GRID, "folds": None, "seeds": [0, 1]})
    save_json(to_dict(grid), tmp_path / "experiment.json")
    again = ExperimentConfig.from_mapping(json.loads((tmp_path / "experiment.json").read_text()))
    assert again == grid and again.folds == []


@pytest.mark.parametrize("change, message", [
    ({"settings": None}, "missing key(s) settings"),
    ({"fold": ["a"]}, "unknown key(s) fold (known: base, data, eval_task, folds, keep_checkpoints, seeds, settings)"),
    ({"settings": {}}, "settings must map setting names to TrainConfig overrides"),
    ({"settings": {"typo": {"learning_rate": 0.1}}}, "setting 'typo': unknown TrainConfig setting(s): learning_rate"),
    ({"settings": {"bad": {"epochs": 0}}}, "setting 'bad': TrainConfig setting epochs = 0"),
    ({"seeds": []}, "ExperimentConfig setting seeds = [] is invalid"),
    ({"seeds": [0, -1]}, "a non-empty list of integers >= 0"),
    ({"keep_checkpoints": "no"}, "true or false"),
])
def test_a_bad_grid_names_what_is_wrong(change, message):
    spec = {k: v for k, v in {**GRID, **change}.items() if v is not None}
    with pytest.raises(InputError) as err:
        ExperimentConfig.from_mapping(spec)
    assert message in str(err.value)


def test_the_service_log_is_in_the_run_unless_db_says_otherwise():
    assert ServeConfig().log_path("RUN") == Path("RUN") / "predictions.sqlite"
    assert ServeConfig(db="/var/log/x.sqlite").log_path("RUN") == Path("/var/log/x.sqlite")
    assert ServeConfig().engine == ENGINES[0] and "token" not in to_dict(ServeConfig())  # a secret is no setting


@pytest.mark.parametrize("setting, value, says", [
    ("port", 70000, "a port number in [0, 65535]"),
    ("threads", 0, "an integer >= 1"),
    ("max_batch", 0, "an integer >= 1"),
    ("max_wait_ms", -1.0, "a number >= 0"),
    ("shift_batch", 0, "an integer >= 1"),
    ("engine", "tensorrt", "onnx, torch"),
])
def test_bad_service_settings_fail_when_made(setting, value, says):
    with pytest.raises(InputError) as err:
        ServeConfig(**{setting: value})
    assert setting in str(err.value) and says in str(err.value)

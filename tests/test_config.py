"""The config contract: strict keys, typed values, overrides, and errors that say what/where/how."""

import re
import textwrap
from pathlib import Path

import pytest

from ktrain.config import load_config
from ktrain.errors import UserError

pytestmark = pytest.mark.fast  # the fast tier: README, Development

GOOD = """\
model:
  fn: models.py:build_model
  kwargs: {hidden: 64}
data:
  fn: models.py:load_data
train:
  epochs: 5
  global_batch_size: 128
  optimizer: {name: sgd, learning_rate: 0.01, momentum: 0.9}
  loss: sparse_categorical_crossentropy
strategy:
  name: mirrored
  devices: 2
output_dir: runs/example
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def error_for(tmp_path, text, *overrides) -> str:
    with pytest.raises(UserError) as caught:
        load_config(write(tmp_path, text), list(overrides))
    return caught.value.render()


def test_good_config_is_typed_and_paths_resolve_where_users_expect(tmp_path, monkeypatch):
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    config = load_config(write(tmp_path, GOOD))
    assert config.train.epochs == 5 and config.strategy.devices == 2
    assert config.train.shuffle is True  # default
    assert config.model.fn == f"{tmp_path / 'models.py'}:build_model"  # beside the config
    assert config.output_dir == str(workdir / "runs" / "example")  # where ktrain runs
    assert config.train.optimizer.model_dump()["momentum"] == 0.9


def test_overrides_are_parsed_as_yaml_scalars(tmp_path):
    config = load_config(write(tmp_path, GOOD), ["train.epochs=1", "train.shuffle=false",
                                                 "strategy.devices=auto"])
    assert (config.train.epochs, config.train.shuffle, config.strategy.devices) == (1, False, "auto")


def test_unknown_key_names_line_and_suggests(tmp_path):
    message = error_for(tmp_path, GOOD.replace("  epochs: 5", "  epoch: 5"))
    assert "config.yaml:7: unknown key 'train.epoch'" in message
    assert "did you mean 'epochs'?" in message


def test_missing_required_key(tmp_path):
    message = error_for(tmp_path, GOOD.replace("  global_batch_size: 128\n", ""))
    assert "missing required key 'train.global_batch_size'" in message
    assert "config.yaml:6:" in message


def test_wrong_type_says_what_was_received(tmp_path):
    message = error_for(tmp_path, GOOD.replace("epochs: 5", "epochs: five"))
    assert "config.yaml:7: invalid value 'five' for 'train.epochs'" in message


def test_wrong_choice_lists_allowed_values(tmp_path):
    message = error_for(tmp_path, GOOD.replace("devices: 2", "devices: many"))
    assert "'strategy.devices'" in message and "'auto'" in message and "config.yaml:13" in message
    message = error_for(tmp_path, GOOD.replace("name: sgd", "name: sgdd"))
    assert "'train.optimizer.name'" in message and "'adam'" in message and "'sgd'" in message


def test_unknown_strategy_lists_the_available_ones(tmp_path):
    """The names the schema offers are exactly the strategies that run (their options live in
    ktrain.config, their code in ktrain.strategies)."""
    from ktrain.strategies import REGISTRY

    message = error_for(tmp_path, GOOD.replace("name: mirrored", "name: mirored"))
    assert "strategy.name" in message
    offered = set(re.findall(r"'(\w+)'", message.partition("must be one of")[2]))
    assert offered == set(REGISTRY), message


def test_malformed_yaml_reports_the_line(tmp_path):
    message = error_for(tmp_path, GOOD.replace("  loss: sparse", "  loss: [sparse"))
    assert message.startswith(f"{tmp_path / 'config.yaml'}:")
    assert "malformed YAML" in message


def test_duplicate_keys_are_rejected(tmp_path):
    message = error_for(tmp_path, GOOD.replace("  epochs: 5", "  epochs: 5\n  epochs: 6"))
    assert "'train.epochs' appears twice" in message and "config.yaml:8" in message


def test_bad_override_is_blamed_on_the_override(tmp_path):
    message = error_for(tmp_path, GOOD, "train.epochs=-1")
    assert "override 'train.epochs=-1'" in message and "greater than 0" in message
    message = error_for(tmp_path, GOOD, "train.epocs=1")
    assert "unknown key 'train.epocs'" in message and "did you mean 'epochs'?" in message
    message = error_for(tmp_path, GOOD, "epochs")
    assert "not of the form key.path=value" in message


def test_fn_reference_must_name_a_function(tmp_path):
    message = error_for(tmp_path, GOOD.replace("models.py:build_model", "models.py"))
    assert "'model.fn'" in message and "file.py:function" in message


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    assert "empty" in error_for(tmp_path, "")


def test_dump_round_trips(tmp_path):
    config = load_config(write(tmp_path, GOOD), ["train.epochs=2"])
    again = write(tmp_path, config.dump_yaml())
    assert load_config(again) == config


def test_multi_process_options_read_naturally(tmp_path):
    text = GOOD.replace("  name: mirrored\n  devices: 2", "  name: multiworker\n  lr_scaling: off\n"
                        "  communicator: mpi")
    config = load_config(write(tmp_path, text))
    assert (config.strategy.lr_scaling, config.strategy.communicator) == ("off", "mpi")
    ray = load_config(write(tmp_path, GOOD.replace("  name: mirrored\n  devices: 2",
                                                   "  name: ray\n  max_failures: 2")))
    assert ray.strategy.max_restarts == 2


def test_switching_strategy_on_the_command_line_leaves_out_options_it_does_not_take(
        tmp_path, capsys):
    config = load_config(write(tmp_path, GOOD), ["strategy.name=multiworker"])
    assert config.strategy.name == "multiworker" and config.strategy.workers == 2
    note = capsys.readouterr().err
    assert "strategy.name=multiworker leaves out strategy.devices" in note
    assert "config.yaml" in note
    ray = GOOD.replace("  name: mirrored\n  devices: 2", "  name: ray\n  max_restarts: 2\n"
                       "  placement: spread")
    config = load_config(write(tmp_path, ray), ["strategy.name=spark"])
    assert config.strategy.max_restarts == 2  # every multi-process strategy takes it
    assert "leaves out strategy.placement" in capsys.readouterr().err
    # An option given on the command line is never dropped: a wrong one is an error.
    message = error_for(tmp_path, GOOD, "strategy.name=multiworker", "strategy.devices=2")
    assert "unknown key 'strategy.devices'" in message and "workers" in message


def test_an_optimizer_by_name_alone_as_model_compile_takes_it(tmp_path):
    config = load_config(write(tmp_path, GOOD.replace(
        "optimizer: {name: sgd, learning_rate: 0.01, momentum: 0.9}", "optimizer: adamw")))
    assert (config.train.optimizer.name, config.train.optimizer.learning_rate) == ("adamw", 0.001)
    assert load_config(write(tmp_path, GOOD), ["train.optimizer=rmsprop"]).train.optimizer.name \
        == "rmsprop"
    message = error_for(tmp_path, GOOD.replace(
        "optimizer: {name: sgd, learning_rate: 0.01, momentum: 0.9}", "optimizer: adamm"))
    assert "invalid value 'adamm'" in message and "'adam'" in message


def test_validation_split_with_files_it_cannot_split_is_refused_where_it_is_set(tmp_path):
    files = GOOD.replace("  fn: models.py:load_data", "  files: train-*.parquet")
    message = error_for(tmp_path, files.replace("  epochs: 5", "  epochs: 5\n"
                                                "  validation_split: 0.2"))
    assert message.startswith(f"{tmp_path / 'config.yaml'}:8: train.validation_split")
    assert "data.validation_files" in message
    message = error_for(tmp_path, files, "train.validation_split=0.1")
    assert message.startswith("override 'train.validation_split=0.1': ")
    assert load_config(write(tmp_path, files)).train.validation_split == 0.0


def test_options_that_would_do_nothing_are_refused_where_they_are_set(tmp_path):
    """data.lanes (and format, map, validation_files) act on data.files only; warmup_epochs
    ramps a scaled learning rate only: set where they cannot act, each is named, all at once."""
    idle = GOOD.replace("  name: mirrored\n  devices: 2", "  name: multiworker\n  warmup_epochs: 2")
    idle = idle.replace("  fn: models.py:load_data", "  fn: models.py:load_data\n  lanes: 6")
    message = error_for(tmp_path, idle)
    assert message.startswith("2 problems:"), message
    assert "data.lanes applies to data.files, which this config does not read" in message
    assert "strategy.warmup_epochs ramps up the scaled learning rate" in message
    assert "lr_scaling: linear" in message and f"{tmp_path / 'config.yaml'}:" in message

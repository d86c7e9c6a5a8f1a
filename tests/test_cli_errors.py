"""What a user sees when something is wrong: exit status 2, one message naming what, where and
how to fix it, no traceback (unless --debug), and an existing output_dir left untouched."""

import hashlib

import pytest

from helpers import FIXTURES, REPO, base_config, run_cli, write_config


def snapshot(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def fails(tmp_path, config, *overrides, debug=False):
    path = write_config(tmp_path / "config.yaml", config)
    result = run_cli("run", path, *overrides, *(["--debug"] if debug else []))
    assert result.returncode == 2, result.stdout + result.stderr
    if not debug:  # the user's own traceback may be shown, never the launcher's frames
        assert f'File "{REPO / "launcher"}' not in result.stderr
    return result.stderr


def test_unknown_key_one_message_no_traceback(tmp_path):
    config = base_config(tmp_path / "out", train={"epoch": 3})
    err = fails(tmp_path, config)
    assert err.startswith("ktrain: error: ") and "Traceback" not in err
    assert "unknown key 'train.epoch'" in err and "did you mean 'epochs'?" in err
    assert "config.yaml:" in err


def test_debug_shows_the_traceback(tmp_path):
    config = base_config(tmp_path / "out", train={"epoch": 3})
    err = fails(tmp_path, config, debug=True)
    assert "Traceback" in err and "unknown key 'train.epoch'" in err


@pytest.mark.parametrize("fn, expected", [
    ("broken_model", ["model.fn: broken_model() raised RuntimeError: the user's own bug",
                      "_helper_that_fails", "user_models.py"]),
    ("not_a_model", ["model.fn: the model fn returned a dict, not a keras.Model"]),
    ("no_such_fn", ["model.fn:", "has no function 'no_such_fn'"]),
])
def test_model_fn_problems(tmp_path, fn, expected):
    err = fails(tmp_path, base_config(tmp_path / "out",
                                      model={"fn": f"{FIXTURES}:{fn}", "kwargs": {}}))
    for text in expected:
        assert text in err


def test_data_fn_returning_the_wrong_type(tmp_path):
    err = fails(tmp_path, base_config(tmp_path / "out", data={"fn": f"{FIXTURES}:not_data"}))
    assert "data.fn: the data fn returned a int" in err and "HINT: return (x, y)" in err


def test_batch_not_divisible_by_replicas(tmp_path):
    config = base_config(tmp_path / "out", strategy={"devices": 2},
                         train={"global_batch_size": 63})
    err = fails(tmp_path, config)
    assert "global_batch_size 63 cannot be split evenly over 2 devices" in err
    assert "multiple of 2, e.g. 64" in err


def test_more_devices_than_exist(tmp_path):
    err = fails(tmp_path, base_config(tmp_path / "out", strategy={"devices": 512}))
    assert "strategy.devices: strategy.devices is 512 but this machine has" in err
    assert "at most" in err


def test_uncompiled_model_without_a_loss(tmp_path):
    config = base_config(tmp_path / "out")
    del config["train"]["loss"]
    err = fails(tmp_path, config)
    assert "train.loss: the model fn returned an uncompiled model and train.loss is not set" in err


def test_shape_mismatch_inside_training_is_shown_clearly(tmp_path):
    err = fails(tmp_path, base_config(tmp_path / "out",
                                      model={"fn": f"{FIXTURES}:three_classes", "kwargs": {}}))
    assert "model.fit: training failed:" in err and "shape" in err.lower()
    assert "HINT: this usually means the model and the data do not fit together" in err


def test_bad_inputs_never_touch_an_existing_output_dir(tmp_path):
    out = tmp_path / "out"
    good = base_config(out, train={"epochs": 1})
    assert run_cli("run", write_config(tmp_path / "good.yaml", good), "-q").returncode == 0
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    fails(tmp_path, base_config(out, train={"epoch": 3}))
    fails(tmp_path, base_config(out, model={"fn": f"{FIXTURES}:broken_model", "kwargs": {}}))
    err = fails(tmp_path, base_config(out, data={"fn": f"{FIXTURES}:digits_wrong_width"},
                                      train={"epochs": 2}))
    assert "differs from this one" in err and "data.fn" in err  # not resumed into
    newest = str(out / "checkpoints" / "ckpt-000001.npz")
    err = fails(tmp_path, base_config(out, data={"fn": f"{FIXTURES}:digits_wrong_width"},
                                      train={"epochs": 2}, checkpoint={"resume": newest}))
    assert "training failed" in err
    err = fails(tmp_path, base_config(out, checkpoint={"resume": "never"}))
    assert "already holds checkpoints" in err and "checkpoint.resume: auto" in err
    err = fails(tmp_path, base_config(out, model={"fn": f"{FIXTURES}:mlp", "kwargs": {"hidden": 8}},
                                      train={"epochs": 2}, checkpoint={"resume": newest}))
    assert "does not fit this model" in err
    assert snapshot(out) == before


def test_output_dir_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    err = fails(tmp_path, base_config(blocker / "out"))
    assert "output_dir: cannot write to output_dir" in err and "a-file/out" in err

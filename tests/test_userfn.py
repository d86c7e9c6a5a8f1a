"""Loading the user's functions: each wrong part of 'file.py:function' is named, and the user's
own traceback is shown without the launcher's frames."""

import pytest

from helpers import FIXTURES
from ktrain.errors import UserError
from ktrain.userfn import call_user, load_function

pytestmark = pytest.mark.fast  # the fast tier: README, Development


def test_loads_from_file_and_module(tmp_path):
    assert load_function(f"{FIXTURES}:mlp", "model.fn", str(tmp_path)).__name__ == "mlp"
    assert load_function("json:dumps", "model.fn", str(tmp_path))([1]) == "[1]"


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"model.fn: file '.*nope.py' does not exist"):
        load_function(f"{tmp_path}/nope.py:build", "model.fn", str(tmp_path))


def test_missing_module(tmp_path):
    with pytest.raises(UserError, match="module 'no_such_pkg' not found"):
        load_function("no_such_pkg.models:build", "model.fn", str(tmp_path))


def test_missing_function_suggests_a_close_name(tmp_path):
    with pytest.raises(UserError, match="has no function 'mpl'") as caught:
        load_function(f"{FIXTURES}:mpl", "model.fn", str(tmp_path))
    assert "did you mean" in caught.value.render() and ":mlp'" in caught.value.render()


def test_file_that_fails_to_import_shows_the_users_traceback(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("import math\n\nx = 1 / 0\n")
    with pytest.raises(UserError) as caught:
        load_function(f"{broken}:build", "model.fn", str(tmp_path))
    text = caught.value.render()
    assert "ZeroDivisionError" in text and 'broken.py", line 3' in text
    assert "launcher/userfn.py" not in text and "<frozen" not in text


def test_fn_that_raises_shows_only_user_frames(tmp_path):
    fn = load_function(f"{FIXTURES}:broken_model", "model.fn", str(tmp_path))
    with pytest.raises(UserError) as caught:
        call_user(fn, {}, "model.fn")
    text = caught.value.render()
    assert "broken_model() raised RuntimeError: the user's own bug" in text
    assert "_helper_that_fails" in text and "user_models.py" in text
    assert "launcher/userfn.py" not in text


def test_kwargs_that_do_not_match_the_signature(tmp_path):
    fn = load_function(f"{FIXTURES}:mlp", "model.fn", str(tmp_path))
    with pytest.raises(UserError, match="model.kwargs: .*hiden"):
        call_user(fn, {"hiden": 3}, "model.fn")

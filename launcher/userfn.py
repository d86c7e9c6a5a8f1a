"""Import and call the user's own functions, reporting their mistakes in their terms.

Errors name which part of ``file.py:function`` is wrong, and when user code raises, the user
sees their own traceback without the launcher's frames.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

from ktrain.errors import UserError

_LAUNCHER_DIR = str(Path(__file__).resolve().parent)


def load_function(ref: str, key: str, base_dir: str) -> Callable:
    """Return the callable named by ``ref`` (``file.py:fn`` or ``pkg.module:fn``)."""
    target, _, name = ref.rpartition(":")
    if target.endswith(".py") or "/" in target:
        module = _import_file(Path(target), key)
    else:
        module = _import_module(target, key, base_dir)
    try:
        fn = getattr(module, name)
    except AttributeError:
        candidates = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        guess = difflib.get_close_matches(name, candidates, n=1)
        hint = f"did you mean '{target}:{guess[0]}'?" if guess else (
            f"functions defined there: {', '.join(sorted(candidates)) or 'none'}")
        raise UserError(f"'{target}' has no function '{name}'", where=key, hint=hint) from None
    if not callable(fn):
        raise UserError(f"'{target}:{name}' is a {type(fn).__name__}, not a function", where=key,
                        hint="point it at a function that returns the model or data")
    return fn


def call_user(fn: Callable, kwargs: dict[str, Any], key: str) -> Any:
    """Call ``fn(**kwargs)``; a bad kwarg or an exception inside becomes a UserError."""
    name = getattr(fn, "__name__", repr(fn))
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as err:
        raise UserError(f"{name}{inspect.signature(fn)} cannot take the kwargs given: {err}",
                        where=f"{key.rsplit('.', 1)[0]}.kwargs",
                        hint=f"make the kwargs match the parameters of {name}") from None
    except ValueError:
        pass  # builtins without a signature: just call it
    try:
        return fn(**kwargs)
    except Exception as err:  # the user's code failed: show their traceback, not ours
        raise UserError(f"{name}() raised {type(err).__name__}: {err}", where=key,
                        details=user_traceback(err),
                        hint=f"the error is in your code; fix {name}() and run again") from err


def user_traceback(err: BaseException) -> str:
    """The exception's traceback with the launcher's and importlib's leading frames removed."""
    tb = err.__traceback__
    while tb is not None and (tb.tb_frame.f_code.co_filename.startswith(_LAUNCHER_DIR)
                              or tb.tb_frame.f_code.co_filename.startswith("<frozen")):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(err), err, tb))


def _import_file(path: Path, key: str):
    if not path.exists():
        raise UserError(f"file '{path}' does not exist", where=key,
                        hint="paths are relative to the config file's folder")
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))  # so the file can import its siblings
    module_name = _module_name(path)
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        raise UserError(f"importing '{path}' raised {type(err).__name__}: {err}", where=key,
                        details=user_traceback(err),
                        hint="the error is in your file; fix it and run again") from err
    sys.modules[module_name] = module
    return module


def _module_name(path: Path) -> str:
    """The name ``import <stem>`` gives the file in its folder, so that classes saved with a
    model (custom layers) name the module the user's own code imports; a private name where
    that would shadow another module (a file called json.py)."""
    try:
        found = importlib.util.find_spec(path.stem) if path.stem.isidentifier() else None
    except (ImportError, ValueError):
        found = None
    if found and found.origin and Path(found.origin).resolve() == path.resolve():
        return path.stem
    return f"ktrain_user_{path.stem}"


def _import_module(target: str, key: str, base_dir: str):
    if base_dir not in sys.path:
        sys.path.insert(0, base_dir)
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as err:
        if err.name and target.startswith(err.name):
            raise UserError(f"module '{err.name}' not found (looking for '{target}')", where=key,
                            hint="use 'path/to/file.py:function' for a file, or install the "
                                 "package that provides the module") from None
        raise UserError(f"importing '{target}' raised {err}", where=key,
                        details=user_traceback(err)) from err
    except Exception as err:
        raise UserError(f"importing '{target}' raised {type(err).__name__}: {err}", where=key,
                        details=user_traceback(err),
                        hint="the error is in your module; fix it and run again") from err

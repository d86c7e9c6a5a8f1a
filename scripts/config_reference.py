"""Write docs/config-reference.md from the config's own schema (ktrain.config): every section,
every key, its type, default and docstring, so the reference cannot drift from what
``ktrain run`` accepts. tests/test_docs.py fails when the page is stale or a key has no
docstring.

    python scripts/config_reference.py           # rewrite the page
    python scripts/config_reference.py --check   # exit 1 if it is stale
"""

import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from ktrain.config import STRATEGY_OPTIONS, RunConfig, StrategyConfig

PAGE = Path(__file__).resolve().parent.parent / "docs" / "config-reference.md"
HEADER = """# Config reference

Every key of a run's config, generated from ktrain's schema by `scripts/config_reference.py`
(do not edit by hand). Unknown keys are errors; any key can be set on the command line as
`section.key=value`. [The config](config.md) shows a whole file and how paths resolve.
"""

_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _type(annotation, metadata=()) -> str:
    """An annotation as a reader writes it: ``int > 0``, ``auto / int > 0``, ``list of string``
    (no ``|``: it would end a table cell)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type(args[0], args[1:])
    if origin is typing.Literal:
        return " / ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        kinds = list(dict.fromkeys(_type(a) for a in args if a is not type(None)))
        return " / ".join(kinds) + (" / null" if type(None) in args else "")
    if origin in (list, tuple):
        return f"list of {_type(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    name = getattr(annotation, "__name__", str(annotation))
    bounds = [f"{_BOUNDS[key]} {getattr(m, key)}" for m in metadata for key in _BOUNDS
              if getattr(m, key, None) is not None]
    return " ".join([{"str": "string", "bool": "true / false"}.get(name, name), *bounds])


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default_factory else field.default
    if isinstance(value, BaseModel):
        return f"`{value.name}`" if hasattr(value, "name") else "defaults below"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value!r}`".replace("'", "") if value != "" else "(see below)"


def _section(field):
    """The section a field holds (its annotation, or the model in its ``X | None``), if any."""
    return next((a for a in (field.annotation, *typing.get_args(field.annotation))
                 if isinstance(a, type) and issubclass(a, BaseModel)), None)


def _sections():
    """(key path, model) of every section, strategy options by strategy."""
    yield "", RunConfig
    for name, field in RunConfig.model_fields.items():
        if name == "strategy":
            for strategy, options in STRATEGY_OPTIONS.items():
                yield f"strategy` with `name: {strategy}", options
        elif (model := _section(field)) is not None:
            yield name, model
            for sub, subfield in model.model_fields.items():
                if (inner := _section(subfield)) is not None:
                    yield f"{name}.{sub}", inner


def _description(model, key: str, field) -> str:
    if issubclass(model, StrategyConfig) and key == "name":
        return "Selects this strategy."
    return " ".join((field.description or "").split())


def undocumented() -> list[str]:
    return [f"{path or 'top level'}: {key}" for path, model in _sections()
            for key, field in model.model_fields.items()
            if key != "base_dir" and not _description(model, key, field)]


def reference() -> str:
    parts = [HEADER]
    for path, model in _sections():
        title = f"`{path}`" if path else "Top level"
        doc = " ".join((model.__doc__ or "").split()) if path else ""
        rows = [f"| `{key}` | {_type(field.annotation, field.metadata)} | {_default(field)} | "
                f"{_description(model, key, field)} |"
                for key, field in model.model_fields.items() if key != "base_dir"]
        parts.append(f"## {title}\n\n" + (f"{doc}\n\n" if doc and "Base class" not in doc
                                            else "")
                     + "| key | type | default | what |\n|---|---|---|---|\n" + "\n".join(rows)
                     + "\n")
    return "\n".join(parts)


if __name__ == "__main__":
    text = reference()
    if "--check" in sys.argv[1:]:
        sys.exit(0 if PAGE.exists() and PAGE.read_text() == text else
                 f"{PAGE} is stale: run python scripts/config_reference.py")
    PAGE.write_text(text)

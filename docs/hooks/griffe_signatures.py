"""Griffe extension: the constructor signature, with defaults, of classes whose `__init__` is
generated at run time (`eqx.Module` fields, `NamedTuple`s).

Griffe reads the source statically and sees no `__init__` in such a class (it only recreates
those of `@dataclasses.dataclass`), so the API pages would show `DRTRL` without `strict=True`.
The signature is taken from the imported class instead, the one users call.
"""

import dataclasses
import enum
import importlib
import inspect
import sys
from pathlib import Path
from typing import Any

import griffe


# The package as the pages document it (mkdocstrings reads `src` too, without importing it).
_SRC = str(Path(__file__).resolve().parents[2] / "src")
if _SRC not in sys.path:
    sys.path.insert(0, _SRC)

_KINDS = {
    inspect.Parameter.POSITIONAL_ONLY: griffe.ParameterKind.positional_only,
    inspect.Parameter.POSITIONAL_OR_KEYWORD: griffe.ParameterKind.positional_or_keyword,
    inspect.Parameter.VAR_POSITIONAL: griffe.ParameterKind.var_positional,
    inspect.Parameter.KEYWORD_ONLY: griffe.ParameterKind.keyword_only,
    inspect.Parameter.VAR_KEYWORD: griffe.ParameterKind.var_keyword,
}


def _runtime_class(cls: griffe.Class) -> type | None:
    try:
        obj: Any = importlib.import_module(cls.module.path)
        for name in cls.path.removeprefix(cls.module.path + ".").split("."):
            obj = getattr(obj, name)
    except (ImportError, AttributeError):
        return None
    return obj if isinstance(obj, type) else None


def _generated_init(runtime: type) -> bool:
    """Whether users construct `runtime` through a generated `__init__` worth showing."""
    if issubclass(runtime, (BaseException, enum.Enum)) or runtime.__name__.startswith("Abstract"):
        return False
    is_named_tuple = issubclass(runtime, tuple) and hasattr(runtime, "_fields")
    return is_named_tuple or any(c.__module__.startswith("equinox") for c in runtime.__mro__)


def shown_parameters(runtime: type) -> list[inspect.Parameter]:
    """The constructor parameters of `runtime` that the page shows: all but the fields kept out
    of the `repr` (set by the library, e.g. the structure `eqtrace.prepare` gives a rule)."""
    fields = dataclasses.fields(runtime) if dataclasses.is_dataclass(runtime) else ()
    hidden = {f.name for f in fields if not f.repr}
    return [p for p in inspect.signature(runtime).parameters.values() if p.name not in hidden]


def _set_init(cls: griffe.Class) -> None:
    runtime = _runtime_class(cls)
    if runtime is None or not _generated_init(runtime):
        return
    parameters = [
        griffe.Parameter(
            p.name,
            kind=_KINDS[p.kind],
            default=None if p.default is inspect.Parameter.empty else repr(p.default),
        )
        for p in shown_parameters(runtime)
    ]
    init = griffe.Function("__init__", lineno=0, endlineno=0, parent=cls)
    init.parameters = griffe.Parameters(griffe.Parameter("self"), *parameters)
    cls.set_member("__init__", init)


def _visit(obj: griffe.Module | griffe.Class, seen: set[str]) -> None:
    if obj.path in seen:
        return
    seen.add(obj.path)
    if isinstance(obj, griffe.Class) and "__init__" not in obj.members:
        _set_init(obj)
    for member in obj.members.values():
        if not member.is_alias and (member.is_module or member.is_class):
            _visit(member, seen)  # type: ignore[arg-type]


class RuntimeSignatures(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        _visit(pkg, set())

"""Every public name is documented for its users: no private names in its docstring, and every
public function states its arguments and what it returns."""

import inspect
import re

import pytest

import eqtrace
from eqtrace import nn


def _public(module):
    """The public names of `module`, without the modules it holds (checked on their own)."""
    names = [n for n in dir(module) if not n.startswith("_")]
    objects = [(f"{module.__name__}.{n}", getattr(module, n)) for n in names]
    return [(name, obj) for name, obj in objects if not inspect.ismodule(obj)]


PUBLIC = (
    _public(eqtrace)
    + _public(nn)
    + _public(nn.surrogate)
    + _public(eqtrace.tasks)
    + _public(eqtrace.plot)
)
FUNCTIONS = [
    (name, obj)
    for name, obj in PUBLIC
    if callable(obj) and not inspect.isclass(obj) and not inspect.ismodule(obj)
]
#: A backticked private name (`_block_link`) or a private module path (eqtrace._ops).
PRIVATE = re.compile(r"`[^`\s]*\b_[a-z]\w*[^`]*`|eqtrace\._\w+")


def _docstrings(name, obj):
    yield name, inspect.getdoc(obj) or ""
    if inspect.isclass(obj):
        for member, value in vars(obj).items():
            if not member.startswith("_") and (callable(value) or isinstance(value, property)):
                yield f"{name}.{member}", inspect.getdoc(value) or ""


@pytest.mark.parametrize("name, obj", PUBLIC, ids=[name for name, _ in PUBLIC])
def test_docstring_names_nothing_private(name, obj):
    assert inspect.getdoc(obj), f"{name} has no docstring"
    for where, doc in _docstrings(name, obj):
        assert not PRIVATE.findall(doc), f"{where} refers to private names: {PRIVATE.findall(doc)}"


@pytest.mark.parametrize("name, function", FUNCTIONS, ids=[name for name, _ in FUNCTIONS])
def test_functions_state_arguments_and_returns(name, function):
    doc = inspect.getdoc(function) or ""
    assert "**Arguments:**" in doc, f"{name} lists no **Arguments:**"
    assert "**Returns:**" in doc, f"{name} states no **Returns:**"

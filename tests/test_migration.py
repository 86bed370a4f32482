"""The "Coming from braintrace" page, `docs/coming_from_braintrace.md`, stays true.

Every Python block on the page is labelled by the title of its fence:

- ```` ```python title="braintrace" ```` quotes braintrace for comparison. braintrace is not a
  dependency, so these blocks are only parsed, never run.
- ```` ```python title="eqtrace" ```` is the eqtrace equivalent. The blocks run in page order in
  one namespace, like a doctest, so each may use the names of the ones before it. A block fails
  the test if it raises, including through its `assert`s.

A Python block without one of the two labels fails the test, so that no eqtrace code on the
page goes unrun. The `eqtrace.*` names in the prose and the table must exist.
"""

import ast
import re
from pathlib import Path

import pytest

import eqtrace


PAGE = Path(__file__).parent.parent / "docs" / "coming_from_braintrace.md"
LABELS = ("braintrace", "eqtrace")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>.*)$")


def _blocks() -> list[tuple[int, str, str, str]]:
    """The fenced code blocks of the page: (line of the first code line, language, title,
    code), the code dedented by the indentation of its fence."""
    blocks = []
    lines = PAGE.read_text().splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, info = opening["indent"], opening["fence"], opening["info"].strip()
        language = info.split()[0].lstrip(".{") if info else ""
        title = re.search(r'title="([^"]*)"', info)
        code, i = [], i + 1
        start = i + 1  # 1-based line number of the first code line
        while i < len(lines) and not (
            lines[i].strip().startswith(fence[0] * len(fence))
            and set(lines[i].strip()) == {fence[0]}
        ):
            code.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        assert i < len(lines), f"{PAGE.name}:{start - 1}: unclosed code fence"
        blocks.append((start, language, title.group(1) if title else "", "\n".join(code)))
        i += 1
    return blocks


BLOCKS = _blocks()
PYTHON = [block for block in BLOCKS if block[1] in ("python", "py")]


def test_every_python_block_is_labelled():
    unlabelled = [
        f"line {line}: title {title!r}" for line, _, title, _ in PYTHON if title not in LABELS
    ]
    assert not unlabelled, (
        f"{PAGE.name}: Python blocks must be titled one of {LABELS}: " + ", ".join(unlabelled)
    )
    assert {title for _, _, title, _ in PYTHON} == set(LABELS)


@pytest.mark.parametrize(
    "line, code", [(line, code) for line, _, title, code in PYTHON if title == "braintrace"]
)
def test_braintrace_blocks_parse(line, code):
    """The quoted braintrace code is at least valid Python (it is not run)."""
    ast.parse(code, filename=f"{PAGE.name}:{line}")


def test_eqtrace_blocks_run():
    namespace: dict = {"__name__": "coming_from_braintrace"}
    for line, _, title, code in PYTHON:
        if title != "eqtrace":
            continue
        # Padded so that a traceback points at the line of the page.
        source = "\n" * (line - 1) + code
        try:
            exec(compile(source, str(PAGE), "exec"), namespace)
        except Exception as error:
            raise AssertionError(
                f"the eqtrace block at {PAGE.name}:{line} raised {type(error).__name__}: {error}"
            ) from error


def test_named_eqtrace_functions_exist():
    """Every `eqtrace.a.b` named on the page (prose, table and code) exists."""
    names = set(re.findall(r"\beqtrace(?:\.[A-Za-z_]\w*)+", PAGE.read_text()))
    assert names
    missing = []
    for name in sorted(names):
        obj = eqtrace
        for part in name.split(".")[1:]:
            if not hasattr(obj, part):
                missing.append(name)
                break
            obj = getattr(obj, part)
    assert not missing, f"{PAGE.name} names what eqtrace does not have: {missing}"

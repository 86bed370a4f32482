"""Every output the documentation shows is what its code prints, and every signature a guide
shows has the code's defaults.

The pages follow the convention of `tests/doc_blocks.py`: a ```` ```text title="Output" ````
block right after a ```` ```python ```` block is what that block prints, exactly. The pages that
show an output run whole, in order, in one fresh Python process with JAX's defaults (float32,
as a reader runs them; this suite runs in float64); on the other pages the python blocks are
only compiled. To update a page after a change, run its blocks and paste what they print:
`python tests/doc_blocks.py out.json docs/custom_cells.md`.
"""

import ast
import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap

import eqtrace
from doc_blocks import ROOT, blocks, drifts, pages, run_page


PAGES = pages()
#: The pages whose code runs: those that show what it prints.
SHOWING = [page for page in PAGES if any(b.output_of is not None for b in blocks(page))]


def test_code_blocks_follow_the_convention():
    for page in PAGES:
        found = blocks(page)  # Raises on an Output block that follows no python block.
        for block in found:
            if block.language == "python":
                compile(block.body, block.where, "exec")
                assert block.marker in (None, "skip"), f"{block.where}: a python block is run"
            elif block.language == "text":
                assert (block.output_of is None) == (block.marker == "recorded"), (
                    f"{block.where}: a text block is either the Output of the python block "
                    "before it or marked `<!-- recorded: ... -->`"
                )
            else:
                assert block.marker is None, f"{block.where}: only python blocks are skipped"
            if block.output_of is not None:
                assert found[block.output_of].runs, f"{block.where}: the output of a skipped block"


def test_printed_outputs_match_the_code(tmp_path):
    result_path = tmp_path / "printed.json"
    names = [str(page.relative_to(ROOT)) for page in SHOWING]
    # As a reader runs the pages: JAX's defaults, not this suite's float64 and XLA flags.
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_ENABLE_X64", "XLA_FLAGS")}
    # No persistent compilation cache: these programs (JAX's default flags) are the pages' own.
    env.update(JAX_PLATFORMS="cpu", TQDM_DISABLE="1", JAX_ENABLE_COMPILATION_CACHE="false")
    run = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "doc_blocks.py"), str(result_path), *names],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    results = json.loads(result_path.read_text(encoding="utf-8"))
    found = [
        drift for page in SHOWING for drift in drifts(page, results[str(page.relative_to(ROOT))])
    ]
    assert not found, "\n\n".join(found)


def test_a_drifted_output_is_caught(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        textwrap.dedent(
            """\
            ```python
            total = sum(range(4))
            ```

            ```python
            print("total", total)
            ```

            ```text title="Output"
            total 7
            ```
            """
        )
    )
    (drift,) = drifts(page, run_page(page))
    assert "-total 7\n+total 6" in drift
    page.write_text(page.read_text().replace("total 7", "total 6"))
    assert drifts(page, run_page(page)) == []


#: A signature written in a guide: a public name and arguments in backticks.
_CALL = re.compile(r"`(?:eqtrace\.)?(?:nn\.)?(?:tasks\.)?(?P<name>\w+)\((?P<args>[^`]*)\)`")


def _public(name: str):
    for namespace in (eqtrace, eqtrace.nn, eqtrace.tasks):
        if not name.startswith("_") and callable(getattr(namespace, name, None)):
            return getattr(namespace, name)
    return None


def _fields(obj) -> list[str] | None:
    """The fields of a record (a dataclass or named tuple constructed from exactly them)."""
    if dataclasses.is_dataclass(obj):
        return [f.name for f in dataclasses.fields(obj)]
    return list(getattr(obj, "_fields", [])) or None


def _shown_signatures():
    """`(where, callable, call)` for every span of a guide that writes a public callable's
    signature: its positional arguments are bare names, some of them its parameters', and
    either they are its first parameters (`check(model, algorithm=None, x=None)`) or, for a
    record, there are as many as its fields (`PPPropTrace(inputs, outputs, params, normaliser)`).
    A call with values (`PPProp(rank=100)`, `ExactWindows(PPProp(rank=4))`) is not one."""
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in _CALL.finditer(text):
            obj = _public(match["name"])
            if obj is None:
                continue
            try:
                # A bare `*` (keyword-only parameters follow) is not call syntax.
                args = re.sub(r"(^|,)\s*\*\s*(,|$)", r"\1", match["args"]).strip(", ")
                call = ast.parse(f"f({args})", mode="eval").body
            except SyntaxError:
                continue
            parameters = inspect.signature(obj).parameters.values()
            names = [p.name for p in parameters]
            n_positional = sum(p.kind <= p.POSITIONAL_OR_KEYWORD for p in parameters)
            positional = [a.id if isinstance(a, ast.Name) else None for a in call.args]
            is_signature = (
                positional
                and None not in positional
                and any(a in names for a in positional)
                and (
                    positional == names[: len(positional)]
                    # A record's fields, one misnamed: not a call, whose names are the caller's.
                    or (_fields(obj) == names and len(positional) == n_positional)
                )
                and all(k.arg in names for k in call.keywords)
            )
            if is_signature:
                line = text.count("\n", 0, match.start()) + 1
                yield f"{page.relative_to(ROOT)}:{line}", obj, call


def test_signatures_in_the_guides_have_the_codes_defaults():
    checked = 0
    for where, obj, call in _shown_signatures():
        parameters = inspect.signature(obj).parameters
        shown_names = [a.id for a in call.args]
        assert shown_names == list(parameters)[: len(shown_names)], (
            f"{where}: `{', '.join(shown_names)}` shown, but the parameters are {list(parameters)}"
        )
        for keyword in call.keywords:
            try:
                shown = ast.literal_eval(keyword.value)
            except ValueError:  # `algebra=eqtrace.OpAlgebra()`: not a literal.
                continue
            if shown is Ellipsis:  # `dt=...`: a value to choose, explained in the text.
                continue
            default = parameters[keyword.arg].default
            assert default is not inspect.Parameter.empty, (
                f"{where}: `{keyword.arg}={shown!r}` shown as a default, but it has none"
            )
            assert shown == default, (
                f"{where}: `{keyword.arg}={shown!r}` shown, but the default is {default!r}"
            )
            checked += 1
    assert checked >= 5  # The README's drivers, `check`, ...

"""The code blocks of the documentation pages, and a runner that executes them as a reader
would: `tests/test_docs_outputs.py` uses both.

The convention, for `README.md` and `docs/**/*.md`:

- Every ```` ```python ```` block runs. The blocks of a page run in order in one namespace, like
  the cells of a notebook, in a fresh Python process with JAX's defaults (float32).
- A ```` ```text title="Output" ```` block right after a ```` ```python ```` block shows what
  that block prints, exactly.
- `<!-- skip: why -->` on the line before a ```` ```python ```` block keeps it from running (a
  fragment that uses names the page does not define, or code for another library).
- Any other ```` ```text ```` block is a recorded output that the suite cannot reproduce (a
  measured run of an example): `<!-- recorded: what it is; the test that checks it -->` on the
  line before it says so.
- Other languages (```` ```bash ````) never run.

Run as a script, `python tests/doc_blocks.py RESULT.json PAGE...` executes the pages' python
blocks and writes what each printed (or the error it raised) to `RESULT.json`;
`python tests/doc_blocks.py --update PAGE...` rewrites the pages' Output blocks with what their
code prints (review the diff: a changed output may be a regression).
"""

import contextlib
import dataclasses
import difflib
import io
import json
import re
import sys
import time
import traceback
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S
)
_MARKER = re.compile(r"^\s*<!--\s*(?P<kind>skip|recorded):\s*(?P<reason>.*?)\s*-->\s*$")
_TITLE = re.compile(r'title="(?P<title>[^"]*)"')
OUTPUT_TITLE = "Output"


@dataclasses.dataclass(frozen=True)
class Block:
    """A fenced code block of a page."""

    page: str
    line: int  # of the opening fence, 1-based
    language: str
    title: str | None
    body: str
    #: `"skip"` or `"recorded"` from the comment on the line before the fence, else `None`.
    marker: str | None
    #: The comment's text after the marker.
    reason: str = ""
    #: The block this one shows the output of (an `Output` block), by index in the page.
    output_of: int | None = None

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.language == "python" and self.marker != "skip"


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT)) if page.is_relative_to(ROOT) else str(page)


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of `page`, in order. Raises `ValueError` on an `Output` block that
    does not follow a python block."""
    text = page.read_text(encoding="utf-8")
    name = _name(page)
    found: list[Block] = []
    for match in _FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = _MARKER.match(before)
        info = match["info"].strip()
        title = _TITLE.search(info)
        indent = len(match["indent"])
        body = "".join(row[indent:] for row in match["body"].splitlines(keepends=True))
        block = Block(
            page=name,
            line=line,
            language=info.split()[0] if info else "",
            title=title["title"] if title else None,
            body=body,
            marker=marker["kind"] if marker else None,
            reason=marker["reason"] if marker else "",
        )
        if block.title == OUTPUT_TITLE:
            # Only blank lines between a block and its output.
            previous = found[-1] if found else None
            between = text[: match.start()].rstrip()
            if previous is None or previous.language != "python" or not between.endswith("```"):
                raise ValueError(f"{block.where}: an Output block must follow a python block")
            block = dataclasses.replace(block, output_of=len(found) - 1)
        found.append(block)
    return found


def drifts(page: Path, result: dict) -> list[str]:
    """Where the outputs `page` shows differ from what its blocks printed (`result`, from
    `run_page`), each with a diff; and the error a block raised, if any."""
    found = []
    if result["error"] is not None:
        found.append(f"{result['error']['where']} raised:\n{result['error']['traceback']}")
    for block in blocks(page):
        if block.output_of is None or str(block.output_of) not in result["printed"]:
            continue
        printed = result["printed"][str(block.output_of)]
        if printed.rstrip("\n") != block.body.rstrip("\n"):
            diff = difflib.unified_diff(
                block.body.rstrip("\n").splitlines(),
                printed.rstrip("\n").splitlines(),
                "shown",
                "printed",
                lineterm="",
            )
            found.append(
                f"{block.where}: the output shown is not what the code prints:\n" + "\n".join(diff)
            )
    return found


def run_page(page: Path) -> dict:
    """Runs the python blocks of `page` in order in one namespace. Returns, per block run, its
    printed text; stops at the first block that raises, with its traceback."""
    namespace: dict = {"__name__": "__main__"}
    printed: dict[str, str] = {}  # by block index, as a JSON key
    error = None
    start = time.perf_counter()
    for index, block in enumerate(blocks(page)):
        if not block.runs:
            continue
        out = io.StringIO()
        try:
            code = compile(block.body, block.where, "exec")
            with contextlib.redirect_stdout(out):
                exec(code, namespace)
        except BaseException:  # noqa: BLE001 - reported, with the block's place
            error = {"index": index, "where": block.where, "traceback": traceback.format_exc()}
            break
        printed[str(index)] = out.getvalue()
    seconds = time.perf_counter() - start
    return {"printed": printed, "error": error, "seconds": seconds}


def update_page(page: Path, result: dict) -> None:
    """Rewrites the Output blocks of `page` with what their python blocks printed (`result`,
    from `run_page`)."""
    text = page.read_text(encoding="utf-8")
    # From the last block back, so that the offsets of the earlier ones hold.
    for block, match in reversed(list(zip(blocks(page), _FENCE.finditer(text)))):
        printed = result["printed"].get(str(block.output_of))
        if printed is None:
            continue
        indent = match["indent"]
        body = "".join(indent + row if row.strip() else row for row in printed.splitlines(True))
        body = body if body.endswith("\n") or not body else body + "\n"
        text = text[: match.start("body")] + body + text[match.end("body") :]
    page.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    # `python tests/doc_blocks.py RESULT.json PAGE...`, or `--update PAGE...` to rewrite the
    # pages' Output blocks with what their code prints now.
    first, *page_names = sys.argv[1:]
    results = {name: run_page(ROOT / name) for name in page_names}
    if first == "--update":
        for name, result in results.items():
            if result["error"] is not None:
                sys.exit(f"{result['error']['where']} raised:\n{result['error']['traceback']}")
            update_page(ROOT / name, result)
    else:
        Path(first).write_text(json.dumps(results), encoding="utf-8")

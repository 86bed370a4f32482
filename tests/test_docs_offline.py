"""The built documentation works offline: no script, style sheet, font or image from another host.

`find_external_resources` scans a built site with the standard library only. The build test
runs `mkdocs build --strict` into a temporary directory (skipped where mkdocs is not installed,
e.g. with only the test extras); `.ci/run` runs this file after installing the docs extras.
The same build checks that the API pages show every constructor's and function's parameters
with their defaults, as the code declares them.
"""

import ast
import enum
import html
import importlib
import importlib.util
import inspect
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
# Where docs/hooks/mathjax.py puts MathJax in the site.
MATHJAX = "javascripts/vendor/mathjax/tex-svg-full.js"
# The griffe extension that gives the API pages the signatures of generated constructors.
HOOK = ROOT / "docs" / "hooks" / "griffe_signatures.py"

_EXTERNAL = re.compile(r"^\s*(?:[a-z][a-z0-9+.-]*:)?//", re.IGNORECASE)
# `link` relations that make the browser fetch something (`canonical`, `alternate`, ... do not).
_FETCHING_RELS = {
    "stylesheet",
    "preload",
    "prefetch",
    "preconnect",
    "dns-prefetch",
    "modulepreload",
    "icon",
    "apple-touch-icon",
    "mask-icon",
    "manifest",
}
_CSS_URL = re.compile(
    r"""@import\s+(?:url\(\s*)?["']?([^"')\s;]+)|url\(\s*["']?([^"')\s]+)""", re.IGNORECASE
)


def _css_externals(css: str) -> list[str]:
    urls = (a or b for a, b in _CSS_URL.findall(css))
    return [url for url in urls if _EXTERNAL.match(url)]


class _ResourceParser(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.found: list[tuple[str, str]] = []
        self._in_style = False

    def _add(self, what: str, url: str | None):
        if url and _EXTERNAL.match(url):
            self.found.append((what, url.strip()))

    def handle_starttag(self, tag, attrs):
        attributes = {name: value or "" for name, value in attrs}
        if tag == "script":
            self._add("script[src]", attributes.get("src"))
        elif tag == "link":
            rels = set(attributes.get("rel", "").lower().split())
            if rels & _FETCHING_RELS:
                self._add(f"link[rel={' '.join(sorted(rels))}]", attributes.get("href"))
        elif tag in ("img", "source", "iframe", "embed", "video", "audio", "input"):
            self._add(f"{tag}[src]", attributes.get("src"))
            for candidate in attributes.get("srcset", "").split(","):
                self._add(f"{tag}[srcset]", (candidate.split() or [""])[0])
        elif tag == "style":
            self._in_style = True
        if "style" in attributes:
            for url in _css_externals(attributes["style"]):
                self.found.append((f"{tag}[style] url", url))

    def handle_endtag(self, tag):
        if tag == "style":
            self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.found.extend(("<style> url", url) for url in _css_externals(data))


def find_external_resources(site: Path) -> list[str]:
    """Every resource in the HTML and CSS files under `site` that is loaded from another host.

    **Arguments:**

    - `site`: a built site directory.

    **Returns:**

    One line per offending reference, `path: kind url`; empty when the site is self-contained.
    Plain hyperlinks (`<a href>`) are not resources and are never reported.
    """
    report = []
    for path in sorted(site.rglob("*")):
        if path.suffix in (".html", ".htm"):
            parser = _ResourceParser()
            parser.feed(path.read_text(encoding="utf-8", errors="replace"))
            parser.close()
            found = parser.found
        elif path.suffix == ".css":
            css = path.read_text(encoding="utf-8", errors="replace")
            found = [("css url", url) for url in _css_externals(css)]
        else:
            continue
        report.extend(f"{path.relative_to(site)}: {what} {url}" for what, url in found)
    return report


def test_checker_flags_external_resources(tmp_path):
    (tmp_path / "index.html").write_text(
        """<html><head>
        <script src="https://unpkg.com/mathjax@3/es5/tex-mml-chtml.js"></script>
        <link rel="preconnect" href="https://fonts.gstatic.com" crossorigin>
        <link rel="stylesheet" href="//fonts.googleapis.com/css?family=Roboto">
        <link rel="shortcut icon" href="http://example.org/favicon.ico">
        <style>@import url("https://example.org/a.css");</style>
        </head><body>
        <img src="https://example.org/plot.png">
        <div style="background: url(https://example.org/b.png)"></div>
        </body></html>"""
    )
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "main.css").write_text(
        "@import 'https://example.org/c.css';\n"
        "@font-face { src: url(https://fonts.gstatic.com/x.woff2) format('woff2'); }"
    )
    report = find_external_resources(tmp_path)
    assert report == [
        "assets/main.css: css url https://example.org/c.css",
        "assets/main.css: css url https://fonts.gstatic.com/x.woff2",
        "index.html: script[src] https://unpkg.com/mathjax@3/es5/tex-mml-chtml.js",
        "index.html: link[rel=preconnect] https://fonts.gstatic.com",
        "index.html: link[rel=stylesheet] //fonts.googleapis.com/css?family=Roboto",
        "index.html: link[rel=icon shortcut] http://example.org/favicon.ico",
        "index.html: <style> url https://example.org/a.css",
        "index.html: img[src] https://example.org/plot.png",
        "index.html: div[style] url https://example.org/b.png",
    ]


def test_checker_ignores_hyperlinks_and_local_files(tmp_path):
    (tmp_path / "index.html").write_text(
        """<html><head>
        <link rel="canonical" href="https://example.org/docs/">
        <link rel="stylesheet" href="assets/main.css">
        <script src="../javascripts/vendor/mathjax/tex-svg-full.js"></script>
        </head><body>
        <a href="https://arxiv.org/abs/1234.5678">a paper</a>
        <img src="data:image/png;base64,AAAA">
        <p>https://example.org in text, <code>&lt;script src="https://x"&gt;</code></p>
        </body></html>"""
    )
    (tmp_path / "main.css").write_text("a { background: url(../images/x.svg); }")
    assert find_external_resources(tmp_path) == []


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The documentation site, built once for the tests below."""
    pytest.importorskip("mkdocs")
    site = tmp_path_factory.mktemp("docs") / "site"
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    return site


def test_built_site_is_offline(site):
    assert find_external_resources(site) == []
    assert (site / MATHJAX).is_file()
    # An algorithm page has equations for MathJax and loads the local copy.
    page = (site / "algorithms" / "rtrl" / "index.html").read_text(encoding="utf-8")
    assert 'class="arithmatex"' in page
    assert f'src="../../{MATHJAX}"' in page


def _shown_signature(site: Path, page: str, name: str) -> str | None:
    """The signature shown under the heading of `name` on the API page `page`, as plain text
    (`None` if the heading has none)."""
    html_text = (site / "api" / page / "index.html").read_text(encoding="utf-8")
    heading = re.escape(f'<h3 id="{name}"')
    found = re.search(
        # The signature right after the heading's own `</h3>` (not a member's further on).
        heading + r'(?:(?!</h3>).)*</h3>\s*<div class="doc-signature[^"]*"[^>]*>(.*?)</div>',
        html_text,
        re.S,
    )
    return None if found is None else html.unescape(re.sub(r"<[^>]+>", "", found.group(1))).strip()


def _documented_callables() -> list[tuple[str, str, object]]:
    """`(page, name, object)` for every class and function an API page documents, except the
    abstract classes, exceptions and enums, which users do not construct."""
    found = []
    for path in sorted((ROOT / "docs" / "api").glob("*.md")):
        for name in re.findall(r"^::: ([\w.]+)", path.read_text(encoding="utf-8"), re.M):
            module, _, attribute = name.rpartition(".")
            obj = getattr(importlib.import_module(module), attribute)
            if inspect.isclass(obj) and (
                issubclass(obj, (BaseException, enum.Enum)) or obj.__name__.startswith("Abstract")
            ):
                continue
            if callable(obj):
                found.append((path.stem, name, obj))
    return found


def _parameters(obj, hook) -> list[inspect.Parameter]:
    if inspect.isclass(obj):
        return hook.shown_parameters(obj)
    return list(inspect.signature(obj).parameters.values())


def test_api_pages_show_defaults(site):
    # What a user once had to call `inspect.signature` for.
    alif = _shown_signature(site, "nn", "eqtrace.nn.ALIF")
    assert alif is not None
    for default in ("tau_mem=20.0", "tau_adapt=200.0", "beta=0.07"):
        assert default in alif
    # Every documented constructor and function: its parameters, and each default that is a
    # literal, as the code declares them (for classes, those the griffe extension shows).
    spec = importlib.util.spec_from_file_location("griffe_signatures", HOOK)
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    for page, name, obj in _documented_callables():
        parameters = _parameters(obj, hook)
        if not parameters:
            continue
        shown = _shown_signature(site, page, name)
        assert shown is not None, f"{name} has no signature on api/{page}.md"
        tree = ast.parse(f"def f{shown[shown.index('(') :]}: pass").body[0].args
        positional = tree.posonlyargs + tree.args
        shown_defaults = dict(
            zip([a.arg for a in positional[len(positional) - len(tree.defaults) :]], tree.defaults)
        )
        shown_defaults.update(
            (a.arg, d) for a, d in zip(tree.kwonlyargs, tree.kw_defaults) if d is not None
        )
        names = [a.arg for a in positional + tree.kwonlyargs]
        assert names == [p.name for p in parameters], f"{name}: {shown}"
        for p in parameters:
            if p.default is inspect.Parameter.empty:
                assert p.name not in shown_defaults, f"{name}: {p.name} shows a default"
                continue
            assert p.name in shown_defaults, f"{name}: {p.name} shows no default"
            try:
                value = ast.literal_eval(shown_defaults[p.name])
            except ValueError:  # An expression (`2 * math.pi`, `FastSigmoid()`).
                continue
            assert value == p.default, f"{name}: {p.name}={value!r}, the code says {p.default!r}"

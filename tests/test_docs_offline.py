"""The built documentation works offline: no script, style sheet, font or image from another host.

`find_external_resources` scans a built site with the standard library only. The build test
runs `mkdocs build --strict` into a temporary directory (skipped where mkdocs is not installed,
e.g. with only the test extras); `.ci/run` runs this file after installing the docs extras.
"""

import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
# Where docs/hooks/mathjax.py puts MathJax in the site.
MATHJAX = "javascripts/vendor/mathjax/tex-svg-full.js"

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


def test_built_site_is_offline(tmp_path):
    pytest.importorskip("mkdocs")
    site = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    assert find_external_resources(site) == []
    assert (site / MATHJAX).is_file()
    # An algorithm page has equations for MathJax and loads the local copy.
    page = (site / "algorithms" / "rtrl" / "index.html").read_text(encoding="utf-8")
    assert 'class="arithmatex"' in page
    assert f'src="../../{MATHJAX}"' in page

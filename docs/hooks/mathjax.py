"""MkDocs hook: serve MathJax from the built site itself rather than from a CDN.

The files come from the `django-static-mathjax` wheel (in the `docs` extra), a verbatim copy of
the MathJax 3 npm package; only its static files are used, nothing of Django (it has no
dependencies). They are added to the site at build time, so nothing is vendored in this repo.
"""

import importlib.metadata
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files


_DISTRIBUTION = "django-static-mathjax"
_PACKAGE_ROOT = "mathjax/static/mathjax"
# Where the files land in the site; `extra_javascript` in mkdocs.yml points here.
SITE_DIR = "javascripts/vendor/mathjax"
# `tex-svg-full.js` has every TeX extension built in (nothing is autoloaded at run time) and
# renders to SVG (no font files to load), so this one script is all a page needs. MathJax is
# Apache-2.0: its licence travels with it.
FILES = {"tex-svg-full.js": "es5/tex-svg-full.js", "LICENSE": "LICENSE"}


def on_files(files: Files, config: MkDocsConfig) -> Files:
    try:
        distribution = importlib.metadata.distribution(_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise PluginError(
            f"The documentation renders its equations with the MathJax copy in the "
            f"'{_DISTRIBUTION}' package, which is not installed; install the docs extra with "
            f"`pip install -e '.[docs]'`."
        ) from None
    for name, relative in FILES.items():
        source = Path(distribution.locate_file(f"{_PACKAGE_ROOT}/{relative}"))
        if not source.is_file():
            raise PluginError(
                f"'{_DISTRIBUTION}' {distribution.version} has no '{_PACKAGE_ROOT}/{relative}'; "
                f"the docs expect the MathJax 3 layout (the `docs` extra pins '<4')."
            )
        files.append(File.generated(config, f"{SITE_DIR}/{name}", abs_src_path=str(source)))
    return files

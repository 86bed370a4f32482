"""The installed version is the newest one the changelog describes."""

import re
from pathlib import Path

import eqtrace


CHANGELOG = Path(__file__).parent.parent / "CHANGELOG.md"


def test_version_is_the_changelogs_newest():
    versions = re.findall(r"^## (\d+\.\d+\.\d+)\b", CHANGELOG.read_text(), flags=re.M)
    assert versions, "CHANGELOG.md lists no version (`## X.Y.Z (date)` headings)"
    assert eqtrace.__version__ == versions[0], (
        f"eqtrace.__version__ is {eqtrace.__version__}, but the newest version in CHANGELOG.md "
        f"is {versions[0]}: bump `version` in pyproject.toml (and reinstall) or add its entry."
    )
    listed = [tuple(map(int, v.split("."))) for v in versions]
    assert listed == sorted(listed, reverse=True), "CHANGELOG.md lists versions newest first"

"""The documentation: the site builds with no broken link or anchor, the README's links
lead somewhere, and the site's home page is the README."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from markdown.extensions.toc import slugify

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^)\s]+)\)")


def headings(page: Path) -> set[str]:
    """The anchors mkdocs gives ``page``'s headings (fenced code is not a heading)."""
    anchors, fenced = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"#{1,6} (.*)", line)):
            anchors.add(slugify(match.group(1).replace("`", ""), "-"))
    return anchors


def test_site_builds_strictly(tmp_path: Path) -> None:
    """A broken link, a missing anchor or a page left out of the nav fails the build."""
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    assert mkdocs, "mkdocs is a test dependency"
    run = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_readme_links_resolve() -> None:
    links = LINK.findall((ROOT / "README.md").read_text())
    assert len(links) >= 15
    for link in links:
        if link.startswith("http"):
            continue
        target, _, anchor = link.partition("#")
        path = ROOT / target
        assert path.exists(), f"README links to {link}, which does not exist"
        if anchor:
            assert anchor in headings(path), f"README links to {link}: no such heading in {target}"


def test_site_home_is_the_readme() -> None:
    """docs/index.md is README.md with its links made relative to docs/, so they never drift."""
    readme = (ROOT / "README.md").read_text()
    home = readme.replace("](docs/)", "](index.md)").replace("](docs/", "](")
    home = home.replace("The pages under [docs/](index.md) (built", "The pages of this site (built")
    assert (ROOT / "docs" / "index.md").read_text() == home, "docs/index.md differs from README.md: copy it again"


@pytest.mark.parametrize("page", sorted(p.name for p in (ROOT / "docs").glob("*.md")))
def test_every_page_is_in_the_nav(page: str) -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    assert f": {page}" in nav, f"docs/{page} is not in mkdocs.yml's nav"

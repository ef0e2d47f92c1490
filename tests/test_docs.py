"""The documentation: the site builds with `mkdocs build --strict` (API reference included), the README stays a
short user's guide, and every relative link in README.md and docs/ resolves to a file."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote


ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

# [text](target) and ![alt](target), outside code spans and fenced blocks (stripped below)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
ISSUE_LETTER = re.compile(r"\b[Ii]ssue [A-Z]\b")


def _prose(path: Path) -> str:
    return CODE_SPAN.sub("", FENCE.sub("", path.read_text(encoding="utf-8")))


def test_mkdocs_build_strict(tmp_path):
    """The site, API reference included, builds with no warning (`--strict`: dead links, unresolved references and
    docstring warnings fail). mkdocs and mkdocstrings are in the test extra, so a missing install fails here."""
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "site" / "api" / "index.html").is_file()


def test_readme_is_a_short_guide():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; the reference belongs in docs/"
    assert "## Speed and quality" in lines


def test_no_issue_letters():
    """Docs say what is, not which work item it came from."""
    hits = [
        f"{page.relative_to(ROOT)}:{n}: {line.strip()}"
        for page in PAGES
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
        if ISSUE_LETTER.search(line)
    ]
    assert not hits, "issue references:\n" + "\n".join(hits)


def test_lines_at_most_200_characters():
    long = [
        f"{page.relative_to(ROOT)}:{n} ({len(line)} characters)"
        for page in PAGES
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
        if len(line) > 200
    ]
    assert not long, "lines over 200 characters:\n" + "\n".join(long)


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        for target in LINK.findall(_prose(page)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):  # URLs, mailto:, in-page anchors
                continue
            path = unquote(target.split("#", 1)[0])
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "relative links to missing files:\n" + "\n".join(broken)

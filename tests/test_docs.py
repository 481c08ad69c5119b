"""The README cannot drift from the code: its settings table is checked against the model, and
the links between the README, benchmarks/README.md and docs/ resolve."""

from __future__ import annotations

import pathlib
import re

from flask_neon._settings_loader import describe_settings

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def readme_settings_rows() -> dict[str, tuple[str, str]]:
    text = README.read_text(encoding="utf-8")
    table = text.split("<!-- settings-table", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`DB_"):
            rows[cells[0].strip("`")] = (cells[1], cells[2])
    return rows


def test_readme_table_lists_every_setting_with_its_default_and_range() -> None:
    documented = readme_settings_rows()
    expected = {row["key"]: (row["default"], row["allowed"]) for row in describe_settings()}
    assert documented == expected


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", markdown, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_relative_links_in_the_docs_resolve() -> None:
    root = README.parent
    pages = [README, root / "benchmarks" / "README.md", *sorted((root / "docs").glob("*.md"))]
    for page in pages:
        text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if "://" in target:
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{page.name}: {target}"
            if anchor and linked.suffix == ".md":
                assert anchor in _anchors(linked.read_text(encoding="utf-8")), (
                    f"{page.name}: {target}"
                )

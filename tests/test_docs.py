"""The README cannot drift from the code: its settings table is checked against the model."""

from __future__ import annotations

import pathlib

from flask_neon.settings import describe_settings

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

"""docs/configuration.md is the one configuration reference: every setting, its variable, its default."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from starlette_dream_ws.settings import ENV_PREFIX, Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
ROW = re.compile(r"^\| `(?P<name>[a-z_]+)` \| `(?P<variable>[A-Z_]+)` \| (?P<default>[^|]+) \| (?P<meaning>.+) \|$")


def rows() -> dict[str, dict[str, str]]:
    found: dict[str, dict[str, str]] = {}
    for line in DOC.read_text().splitlines():
        match = ROW.match(line)
        if match:
            assert match["name"] not in found, f"{match['name']} is described twice"
            found[match["name"]] = match.groupdict()
    return found


def documented_default(value: object) -> str | None:
    """How the table writes a default (None: described in words, as 'none' or a formula)."""
    if value is None or value == ():
        return None
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        return "`" + ",".join(value) + "`"
    return f"`{value}`"


FIELDS = dataclasses.fields(Settings)


def test_every_row_is_a_setting() -> None:
    assert set(rows()) <= {field.name for field in FIELDS}


@pytest.mark.parametrize("field", FIELDS, ids=[field.name for field in FIELDS])
def test_every_setting_is_in_the_table_with_its_variable_and_default(field: dataclasses.Field[object]) -> None:
    row = rows().get(field.name)
    assert row is not None, f"{field.name} is missing from docs/configuration.md"
    assert row["variable"] == ENV_PREFIX + field.name.upper()
    expected = documented_default(field.default)
    if expected is None:
        assert not row["default"].strip().startswith("`"), f"{field.name}: the default is {field.default!r}"
    else:
        assert row["default"].strip() == expected, f"{field.name}: the default is {expected}"
    assert len(row["meaning"]) > 20


def test_the_readme_points_to_the_reference_rather_than_repeating_it() -> None:
    readme = (DOC.parents[1] / "README.md").read_text()
    assert "docs/configuration.md" in readme
    # A second table of settings would drift: the README names none with its default.
    assert "| `HEARTBEAT_INTERVAL` |" not in readme and "| `BROADCAST_URL` |" not in readme

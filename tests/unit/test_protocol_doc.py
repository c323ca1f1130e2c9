"""docs/PROTOCOL.md lists every error code the server sends, each with its close code, and the
type naming rule the dispatcher applies."""

from __future__ import annotations

import re
from pathlib import Path

from starlette_dream_ws.protocol import TYPE_NAME
from starlette_dream_ws.server.schemas import ERROR_CODES

DOC = (Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md").read_text()
ROW = re.compile(r"^\| `(?P<code>[a-z_]+)` \| (?P<meaning>[^|]+) \| (?P<close>\d{4}|—) \|$", re.MULTILINE)


def test_the_error_code_table_matches_the_codes_the_server_sends() -> None:
    table = {match["code"]: match["close"] for match in ROW.finditer(DOC)}
    expected = {code: str(close) if close is not None else "—" for code, (_, close) in ERROR_CODES.items()}
    assert table == expected


def test_the_type_rule_is_the_one_dispatch_applies() -> None:
    assert f"`{TYPE_NAME.pattern}`" in DOC

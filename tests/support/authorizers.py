"""Authorizers the tests' apps use."""

from __future__ import annotations

from starlette_dream_ws import User


def owner_only(user: User, dream_id: int) -> bool:
    """User "uN" may watch dream N; "admin" may watch all."""
    return user.id == "admin" or user.id == f"u{dream_id}"

"""Template context for console pages."""

from __future__ import annotations


def console(request) -> dict:
    return {}

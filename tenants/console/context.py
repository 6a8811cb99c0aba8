"""Template context for console pages: `console` (see tenancy.Console), computed lazily."""

from __future__ import annotations

from django.http import HttpRequest

from .tenancy import console_of


def console(request: HttpRequest) -> dict:
    # One lazy object: templates read console.tenant, console.role, console.is_admin...
    # and a page that reads none of them (500.html) costs no query.
    return {"console": console_of(request)}

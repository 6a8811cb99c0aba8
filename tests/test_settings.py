"""Settings helpers fail loudly on bad values; URLs parse into Django settings."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured

from sluice.env import database_from_url, envbool, envint, envlist


def test_booleans_accept_the_usual_spellings(monkeypatch):
    for raw, expected in [("1", True), ("yes", True), ("OFF", False), ("0", False)]:
        monkeypatch.setenv("FLAG", raw)
        assert envbool("FLAG", not expected) is expected
    monkeypatch.delenv("FLAG")
    assert envbool("FLAG", True) is True


def test_a_bad_boolean_or_integer_is_improperly_configured(monkeypatch):
    monkeypatch.setenv("FLAG", "perhaps")
    with pytest.raises(ImproperlyConfigured, match="FLAG must be a boolean"):
        envbool("FLAG", False)
    monkeypatch.setenv("COUNT", "ten")
    with pytest.raises(ImproperlyConfigured, match="COUNT must be an integer"):
        envint("COUNT", 1)
    monkeypatch.setenv("COUNT", "-3")
    with pytest.raises(ImproperlyConfigured, match="at least 0"):
        envint("COUNT", 1, minimum=0)


def test_lists_split_on_commas(monkeypatch):
    monkeypatch.setenv("HOSTS", "a.example, b.example,,")
    assert envlist("HOSTS", []) == ["a.example", "b.example"]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "postgresql://u:p%40ss@db.internal:6432/sluice?sslmode=require",
            {
                "NAME": "sluice",
                "USER": "u",
                "PASSWORD": "p@ss",
                "HOST": "db.internal",
                "PORT": "6432",
                "OPTIONS": {"sslmode": "require"},
            },
        ),
        (
            "postgres:///sluice?host=/var/run/postgresql",
            {"NAME": "sluice", "HOST": "/var/run/postgresql", "PORT": ""},
        ),
        ("postgresql://%2Ftmp%2Fpg/app", {"NAME": "app", "HOST": "/tmp/pg"}),
    ],
)
def test_database_urls(url, expected):
    parsed = database_from_url(url)
    assert parsed["ENGINE"] == "django.db.backends.postgresql"
    for name, value in expected.items():
        assert parsed[name] == value, name


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite:///db.sqlite3", "PostgreSQL only"),
        ("postgresql://host", "must name a database"),
        ("mysql://h/db", "PostgreSQL only"),
    ],
)
def test_other_databases_are_refused(url, message):
    with pytest.raises(ImproperlyConfigured, match=message):
        database_from_url(url)

"""Loaded with `-p tests.environment` before Django reads its settings.

Tests share whatever Redis REDIS_URL names (or the embedded one beside a running demo),
so every key they write goes under a prefix of their own, removed when the run ends.
"""

from __future__ import annotations

import os

os.environ.setdefault("SLUICE_REDIS_PREFIX", f"sluice-test-{os.getpid()}")
# Tests run with DEBUG off, as production does; they still need a secret.
os.environ.setdefault("SECRET_KEY", "tests-only-secret-key-not-for-production")
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sluice.settings")

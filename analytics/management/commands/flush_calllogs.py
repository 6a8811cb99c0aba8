"""python manage.py flush_calllogs [--once] [--batch N]

Drains the call-log stream from Redis into PostgreSQL (analytics.flusher) until SIGTERM
or Ctrl-C, printing a line per batch. With --once, flushes what is waiting and exits.
Several may run at once; each takes its own share of the stream.
"""

from __future__ import annotations

import signal
import threading

import redis
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DEFAULT_DB_ALIAS, DatabaseError

from analytics import flusher
from sluice.redisconn import get_redis
from workers import protocol


class Command(BaseCommand):
    help = "Write the call logs waiting in Redis to PostgreSQL, batch by batch."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--once",
            action="store_true",
            help="Flush what is waiting now, then exit (non-zero if the database is down).",
        )
        parser.add_argument("--batch", type=int, default=500, help="Entries per batch.")
        parser.add_argument(
            "--consumer",
            default="",
            help="This flusher's name in the consumer group (default: host:pid). Two "
            "running flushers must not share one.",
        )
        parser.add_argument("--database", default=DEFAULT_DB_ALIAS)

    def handle(
        self, *args, once: bool, batch: int, consumer: str, database: str, **options
    ) -> None:
        if batch < 1:
            raise CommandError("--batch must be at least 1")
        consumer = consumer or flusher.consumer_name()
        verbosity = options["verbosity"]

        def report(handled: int) -> None:
            if verbosity >= 1:
                self.stdout.write(f"flushed {handled} call logs")
                self.stdout.flush()

        if once:
            self._once(consumer=consumer, batch=batch, database=database, report=report)
            return

        stopping = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stopping.set())
        signal.signal(signal.SIGINT, lambda *_: stopping.set())
        if verbosity >= 1:
            self.stdout.write(f"flusher {consumer}: writing call logs until SIGTERM / Ctrl-C")
            self.stdout.flush()
        flusher.run(
            consumer=consumer,
            stop_event=stopping,
            count=batch,
            using=database,
            on_batch=report,
        )

    def _once(self, *, consumer: str, batch: int, database: str, report) -> None:
        # What is in the stream now, and no more: under steady traffic new records keep
        # coming, and a run from cron must end.
        try:
            waiting = get_redis().xlen(protocol.calllog_stream())
        except redis.RedisError as exc:
            raise CommandError(f"call logs not flushed: {exc}") from exc
        for _ in range(waiting // batch + 2):
            try:
                handled = flusher.flush_once(
                    consumer=consumer, count=batch, block_ms=0, using=database
                )
            except (DatabaseError, redis.RedisError) as exc:
                # The batch in hand stays pending; a running flusher claims it later.
                raise CommandError(f"call logs not flushed: {exc}") from exc
            if not handled:
                return
            report(handled)

"""The broker's bell: senders ring it, idle consumers wake on it instead of polling."""

from __future__ import annotations

import asyncio

from sluice.redisconn import get_redis
from workers import broker, protocol

from .conftest import fixed_deployment, wait_until


def rings(queue_name: str) -> int:
    return get_redis().llen(broker.bell(broker.get_broker().namespace, queue_name))


class BellTestCase:
    def test_sending_rings_the_queues_bell(self, clean_redis):
        broker.send("deploy.nobody", protocol.actor_name("nobody"), {"x": 1})
        asyncio.run(broker.send_async("deploy.nobody", protocol.actor_name("nobody"), {"x": 2}))
        assert rings("deploy.nobody") == 2
        assert get_redis().llen(f"{broker.get_broker().namespace}:deploy.nobody") == 2

    def test_it_sends_after_redis_forgot_its_scripts(self, clean_redis):
        # A Redis restart (or SCRIPT FLUSH) drops loaded scripts; sending must not fail.
        get_redis().script_flush()
        asyncio.run(broker.send_async("deploy.nobody", protocol.actor_name("nobody"), {"x": 1}))
        assert get_redis().llen(f"{broker.get_broker().namespace}:deploy.nobody") == 1

    def test_rings_for_a_queue_nobody_serves_are_capped(self, clean_redis):
        for index in range(broker.BELL_CAP + 10):
            broker.send("deploy.nobody", protocol.actor_name("nobody"), {"x": index})
        assert rings("deploy.nobody") == broker.BELL_CAP

    def test_an_idle_worker_answers_the_bell(self, transactional_db, start_worker):
        deployment = fixed_deployment("belled")
        worker = start_worker(deployment)
        runtime = worker.runtimes["belled"]
        message = {
            "request_id": "req_bell",
            "deployment": "belled",
            "task": "chat",
            "tenant_id": 1,
            "deadline_ms": protocol.now_ms() + 10_000,
            "enqueued_ms": protocol.now_ms(),
            "stream": False,
            "payload": {"messages": [{"role": "user", "content": "ding"}]},
        }
        broker.send(deployment.queue_name, protocol.actor_name("belled"), message)
        wait_until(lambda: runtime.handled == 1, what="the worker to take the message")
        wait_until(lambda: rings(deployment.queue_name) == 0, what="the ring to be heard")

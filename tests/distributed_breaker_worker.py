"""One worker process of the shared-breaker test (run by tests/test_distributed_breaker.py).

argv: redis_url namespace role go_file deadline_seconds. Prints JSON lines with wall times:
``ready``; ``tripped`` (role "trip": it recorded the failures); ``open`` (first saw its
breaker open); ``probe`` (a half-open probe was admitted here); ``closed`` (after open).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

from seawall.breaker import BreakerRegistry, BreakerState, CircuitOpenError, Outcome
from seawall.policy.breaker import BreakerPolicy
from seawall.shared_breaker import SharedBreakerState

HOST = "registry.example:443"


def say(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, "t": time.time(), **fields}), flush=True)


async def main() -> None:
    url, namespace, role, go_file, deadline = sys.argv[1:6]
    policy = BreakerPolicy(
        window="count",
        window_size=10,
        minimum_calls=5,
        open_duration=1.0,
        jitter=0.0,
        half_open_probes=2,
        probe_timeout=5.0,
    )
    registry = BreakerRegistry(policy)
    breaker = registry.get(HOST)
    async with SharedBreakerState(registry, url, namespace=namespace):
        say("ready")
        while not os.path.exists(go_file):  # noqa: ASYNC110, ASYNC240 - the harness's signal
            await asyncio.sleep(0.005)
        if role == "trip":
            for _ in range(5):
                breaker.record(breaker.admit(), Outcome.FAILURE, 0.01)
            say("tripped")
        end = time.monotonic() + float(deadline)
        seen_open = False
        pending = []
        while time.monotonic() < end:
            state = breaker.state
            if state is BreakerState.OPEN and not seen_open:
                seen_open = True
                say("open")
            if seen_open and state is BreakerState.CLOSED:
                say("closed")
                break
            if seen_open and state is BreakerState.HALF_OPEN:
                try:
                    permit = breaker.admit()
                except CircuitOpenError:
                    pass
                else:
                    say("probe", probe=permit.probe)
                    pending.append((permit, time.monotonic() + 0.2))
            for permit, at in list(pending):
                if time.monotonic() >= at:  # the upstream answered fine after 200 ms
                    breaker.record(permit, Outcome.SUCCESS, 0.2)
                    pending.remove((permit, at))
            await asyncio.sleep(0.005)
    say("done")


asyncio.run(main())

"""Added cost per call of seawall's client pipeline on the success path, against peers.

The inner transport is an ``httpx.MockTransport`` answering 200, so what is measured is
the wrapper. Two levels, same run:

* transport: ``handle_async_request`` called directly (no httpx client), the precise one;
* client: ``httpx.AsyncClient.get`` end to end, to show what share of a call it is.

Variants: the bare transport; ``ResilientTransport`` with its defaults (retry with
deadline and budget, per-host breaker, coalescing check, per-attempt timeout); the same
call wrapped in tenacity's ``AsyncRetrying`` (4 attempts, random exponential wait, retry on
transport errors); and wrapped in stamina's ``retry_context`` (4 attempts).

    .venv/bin/python benchmarks/client_overhead.py            # full run
    .venv/bin/python benchmarks/client_overhead.py --quick    # a few seconds

Goal (issue 4): seawall's whole stack adds less than tenacity's retry wrapper alone.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx
import stamina
import tenacity

from seawall.client.httpx import ResilientTransport

URL = "http://registry.test/v2/library/alpine/manifests/3.20"
Call = Callable[[], Awaitable[object]]
A = TypeVar("A")


def _answer(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, content=b"{}")


def _variants(
    bare: Callable[[A], Awaitable[object]], seawall: Callable[[A], Awaitable[object]], arg: A
) -> dict[str, Call]:
    """The four variants of one call, each calling its target directly (no extra frame);
    the peers are configured here once for both levels."""

    async def v_bare() -> object:
        return await bare(arg)

    async def v_seawall() -> object:
        return await seawall(arg)

    async def v_tenacity() -> object:
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(4),
            wait=tenacity.wait_random_exponential(multiplier=0.5, max=10),
            retry=tenacity.retry_if_exception_type(httpx.TransportError),
            reraise=True,
        )
        return await retrying(bare, arg)

    async def v_stamina() -> object:
        async for attempt in stamina.retry_context(on=httpx.TransportError, attempts=4):
            with attempt:
                return await bare(arg)
        raise AssertionError("unreachable")

    return {"bare": v_bare, "seawall": v_seawall, "tenacity": v_tenacity, "stamina": v_stamina}


def transport_variants() -> dict[str, Call]:
    bare = httpx.MockTransport(_answer)
    seawall = ResilientTransport(httpx.MockTransport(_answer))
    request = httpx.Request("GET", URL)
    return _variants(bare.handle_async_request, seawall.handle_async_request, request)


def client_variants() -> tuple[dict[str, Call], list[httpx.AsyncClient]]:
    bare = httpx.AsyncClient(transport=httpx.MockTransport(_answer))
    seawall = httpx.AsyncClient(transport=ResilientTransport(httpx.MockTransport(_answer)))
    return _variants(bare.get, seawall.get, URL), [bare, seawall]


async def per_call(fn: Call, n: int) -> float:
    """Seconds per call over ``n`` sequential calls."""
    gc.collect()
    start = time.perf_counter()
    for _ in range(n):
        await fn()
    return (time.perf_counter() - start) / n


async def measure(variants: dict[str, Call], n: int, rounds: int) -> dict[str, float]:
    for fn in variants.values():  # warm up
        await per_call(fn, max(50, n // 20))
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):  # interleave so that machine noise hits every variant alike
        for name, fn in variants.items():
            samples[name].append(await per_call(fn, n))
    return {k: statistics.median(v) for k, v in samples.items()}


def table(title: str, results: dict[str, float]) -> None:
    bare = results["bare"]
    added = {k: v - bare for k, v in results.items()}
    print(f"\n{title}")
    print(f"{'variant':<10} {'us/call':>9} {'added us':>9} {'added / tenacity':>17}")
    for name, t in results.items():
        ratio = added[name] / added["tenacity"] if added["tenacity"] > 0 else float("nan")
        print(f"{name:<10} {t * 1e6:>9.2f} {added[name] * 1e6:>9.2f} {ratio:>17.2f}")
    verdict = "MET" if added["seawall"] < added["tenacity"] else "NOT MET"
    print(f"goal (seawall adds less than tenacity's wrapper alone): {verdict}")


async def main(quick: bool) -> None:
    n, rounds = (2_000, 5) if quick else (20_000, 9)
    print(f"calls per sample: {n}, samples per variant: {rounds} (median reported)")
    table("transport level (handle_async_request)", await measure(transport_variants(), n, rounds))
    calls, clients = client_variants()
    try:
        table("client level (AsyncClient.get)", await measure(calls, n // 2, rounds))
    finally:
        for c in clients:
            await c.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds instead of a minute")
    asyncio.run(main(parser.parse_args().quick))

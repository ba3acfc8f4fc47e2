"""The README quick start: rate limiting for a FastAPI app in three lines.

.venv/bin/uvicorn examples.fastapi_quickstart:app   # or run this file for a self-check
"""

from fastapi import FastAPI

from seawall import RateLimitMiddleware, RateLimitPolicy

app = FastAPI()
app.add_middleware(RateLimitMiddleware, policy=RateLimitPolicy(limit="100/minute"))


@app.get("/artifacts/{name}")
async def artifact(name: str) -> dict[str, str]:
    return {"name": name}


if __name__ == "__main__":
    import asyncio

    import httpx

    async def check() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            codes = [(await client.get("/artifacts/x")).status_code for _ in range(101)]
            last = await client.get("/artifacts/x")
        print(
            f"{codes.count(200)} admitted, then {last.status_code}, "
            f"Retry-After: {last.headers['retry-after']}, RateLimit: {last.headers['ratelimit']}"
        )

    asyncio.run(check())

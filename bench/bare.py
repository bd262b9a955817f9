"""`python -m bench.bare --port P`: the bare baselines the goals are measured against.

FastAPI under uvicorn with the settings `unblock serve` uses (uvloop, httptools, one worker):
`POST /insert` parses the JSON body and does one durable `INSERT … ON CONFLICT DO NOTHING
RETURNING` through an asyncpg pool; `POST /ping` parses the same body and touches no database.
The database URL comes from UNBLOCK_BENCH_DATABASE_URL (the parent's fresh database).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from bench.env import LOOPBACK

TABLE_SQL = "CREATE TABLE IF NOT EXISTS bench_bare (key text PRIMARY KEY, body jsonb NOT NULL)"
INSERT_SQL = (
    "INSERT INTO bench_bare (key, body) VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING key"
)


def make_app(database_url: str) -> FastAPI:
    """The two bare endpoints; the pool is made in lifespan as unblock's is."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = await asyncpg.create_pool(database_url, min_size=2, max_size=10)
        async with pool.acquire() as conn:
            await conn.execute(TABLE_SQL)
        app.state.pool = pool
        yield
        await pool.close()

    app = FastAPI(lifespan=lifespan)

    @app.post("/insert", status_code=202)
    async def insert(request: Request) -> JSONResponse:
        raw = await request.body()
        payload = json.loads(raw)
        async with request.app.state.pool.acquire() as conn:
            key = await conn.fetchval(INSERT_SQL, payload["run_id"], raw.decode())
        return JSONResponse({"status": "accepted" if key else "duplicate"}, status_code=202)

    @app.post("/ping", status_code=202)
    async def ping(request: Request) -> JSONResponse:
        payload = json.loads(await request.body())
        return JSONResponse({"status": "ignored", "flag": payload.get("flag")}, status_code=202)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.bare")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    url = os.environ["UNBLOCK_BENCH_DATABASE_URL"]
    database_url = url.replace("postgresql+asyncpg://", "postgresql://")
    uvicorn.run(
        make_app(database_url),
        host=LOOPBACK,
        port=args.port,
        loop="uvloop",
        http="httptools",
        workers=1,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()

"""A FastAPI app: ``tiamat -k asgi examples/fastapi_app.py:app`` (or just ``tiamat
examples/fastapi_app.py:app``: an ASGI app gets the asgi worker by itself).

Shows JSON in and out, a streamed response, a WebSocket echo and lifespan state (what the
lifespan yields is in every request's ``request.state``).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, object]]:
    # open connection pools, load models ... here; the dict becomes request.state
    yield {"started_at": time.time(), "worker_pid": os.getpid()}


app = FastAPI(lifespan=lifespan)


@app.get("/")
async def index(request: Request) -> dict[str, object]:
    return {"message": "Hello, World!", "worker_pid": request.state.worker_pid,
            "started_at": request.state.started_at}


@app.post("/items/{item_id}")
async def create_item(item_id: int, item: dict[str, object]) -> dict[str, object]:
    return {"id": item_id, **item}


@app.get("/stream")
async def stream(count: int = 5) -> StreamingResponse:
    async def lines() -> AsyncIterator[bytes]:
        for i in range(count):
            yield f"line {i}\n".encode()
            await asyncio.sleep(0.01)

    return StreamingResponse(lines(), media_type="text/plain")


@app.websocket("/ws")
async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            text = await websocket.receive_text()
            await websocket.send_text(f"echo: {text}")
    except WebSocketDisconnect:
        pass

"""FastAPI app for bench/memory.py: JSON, a pydantic model, an HTML page (X-Pid header)."""

import gc
import os

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel

app = FastAPI()
PID = str(os.getpid())


class Item(BaseModel):
    id: int
    name: str
    tags: list[str] = []


@app.middleware("http")
async def add_pid(request: Request, call_next):
    response = await call_next(request)
    response.headers["X-Pid"] = str(os.getpid())
    return response


@app.get("/")
async def index():
    return {"message": "Hello, World!"}


@app.get("/json")
async def json_view():
    return {"message": "Hello, World!", "numbers": list(range(20))}


@app.get("/page", response_class=HTMLResponse)
async def page():
    return "<ul>" + "".join(f"<li>{i}</li>" for i in range(30)) + "</ul>"


@app.get("/items/{item_id}", response_model=Item)
async def item(item_id: int):
    return Item(id=item_id, name=f"item {item_id}", tags=["a", "b"])


@app.get("/gc")
async def collect():
    """A full collection, as a long-running worker eventually runs by itself."""
    return {"collected": gc.collect()}

"""The framework examples, end to end through real clients: FastAPI, Django, Flask."""

from __future__ import annotations

import httpx
import pytest
from conftest import EXAMPLES
from websockets.sync.client import connect

DJANGO = EXAMPLES / "django_project"


# --- FastAPI ----------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [["-k", "asgi"], []])
def test_fastapi_json_and_lifespan_state(tiamat_server, args):
    server = tiamat_server(*args, "-w", "2", "examples/fastapi_app.py:app")
    base = f"http://{server.host}:{server.port}"
    with httpx.Client(base_url=base, timeout=10) as client:
        index = client.get("/").json()
        assert index["message"] == "Hello, World!"
        assert index["worker_pid"] in server.worker_pids()  # set by the lifespan in that worker
        created = client.post("/items/7", json={"name": "widget", "price": 3.5})
        assert created.status_code == 200
        assert created.json() == {"id": 7, "name": "widget", "price": 3.5}
        assert client.post("/items/x", json={}).status_code == 422


def test_fastapi_streamed_response(tiamat_server):
    server = tiamat_server("-k", "asgi", "examples/fastapi_app.py:app")
    url = f"http://{server.host}:{server.port}/stream?count=4"
    with httpx.stream("GET", url, timeout=10) as response:
        assert response.headers["transfer-encoding"] == "chunked"
        lines = list(response.iter_lines())
    assert lines == ["line 0", "line 1", "line 2", "line 3"]


@pytest.mark.parametrize("ws", ["websockets", "wsproto"])
def test_fastapi_websocket_echo(tiamat_server, ws):
    server = tiamat_server("-k", "asgi", "--ws", ws, "examples/fastapi_app.py:app")
    with connect(f"ws://{server.host}:{server.port}/ws") as websocket:
        for text in ("one", "two", "x" * 10000):
            websocket.send(text)
            assert websocket.recv(5) == f"echo: {text}"


# --- Django -----------------------------------------------------------------------------------
@pytest.fixture
def django_env(tmp_path):
    return {"DJANGO_DB_PATH": str(tmp_path / "db.sqlite3")}


@pytest.mark.parametrize("args", [["mysite.wsgi:application"],
                                  ["--threads", "4", "mysite.wsgi:application"],
                                  ["-k", "asgi", "mysite.asgi:application"]])
def test_django_database_backed_view(tiamat_server, django_env, tmp_path, args):
    server = tiamat_server("-w", "2", *args, env=django_env, cwd=DJANGO)
    base = f"http://{server.host}:{server.port}"
    with httpx.Client(base_url=base, timeout=10) as client:
        assert client.get("/").text.startswith("Hello from Django")
        for name in ("ada", "grace", "linus"):
            assert client.post("/visits", data={"name": name}).status_code == 200
        visits = client.get("/visits").json()
    # every worker shares the one SQLite file in the test's temporary directory
    assert visits == {"count": 3, "names": ["ada", "grace", "linus"]}
    assert (tmp_path / "db.sqlite3").exists()


def test_django_async_view_under_asgi(tiamat_server, django_env):
    server = tiamat_server("-k", "asgi", "mysite.asgi:application", env=django_env, cwd=DJANGO)
    response = httpx.get(f"http://{server.host}:{server.port}/pause", timeout=10)
    assert response.json() == {"async": True}


# --- Flask (the example belongs to the core issue; here it runs on the thread worker) -----------
def test_flask_example_on_the_thread_worker(tiamat_server):
    server = tiamat_server("-k", "thread", "--threads", "4", "examples/flask_app.py:app")
    base = f"http://{server.host}:{server.port}"
    with httpx.Client(base_url=base, timeout=10) as client:
        assert client.get("/hello/tiamat").json()["greeting"] == "Hello, tiamat!"
        assert client.post("/echo", json={"a": [1, 2]}).json() == {"received": {"a": [1, 2]}}


def test_flask_example_under_the_asgi_worker(tiamat_server):
    server = tiamat_server("-k", "asgi", "examples/flask_app.py:app")
    response = httpx.get(f"http://{server.host}:{server.port}/hello/asgi", timeout=10)
    assert response.json()["greeting"] == "Hello, asgi!"

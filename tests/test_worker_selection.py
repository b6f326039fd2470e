"""Which worker class serves an app: ``-k``, ``--interface``, detection, custom classes."""

from __future__ import annotations

import pytest
from conftest import run_tiamat

WSGI = "tests/apps/wk_wsgi.py"
ASGI = "tests/apps/asgi_hello.py:app"


@pytest.mark.parametrize("preload", [[], ["--preload"]])
def test_asgi_app_gets_the_asgi_worker(tiamat_server, preload):
    server = tiamat_server(*preload, ASGI)
    assert server.get("/")[2] == b"asgi hello"


def test_wsgi_app_gets_the_sync_worker(tiamat_server):
    server = tiamat_server(WSGI)
    assert b"multithread=False" in server.get("/info")[2]


def test_wsgi_app_with_threads_gets_the_thread_worker(tiamat_server):
    server = tiamat_server("--preload", "--threads", "3", WSGI)
    server.wait_log(r"Using worker: tiamat\.workers\.thread:ThreadWorker")
    assert b"multithread=True" in server.get("/info")[2]


def test_wsgi_app_under_asgi_runs_through_an_adapter(tiamat_server):
    server = tiamat_server("-k", "asgi", WSGI)
    status, _, body = server.get("/info")
    assert status == 200
    assert body.startswith(b"pid=")
    import httpx

    response = httpx.post(f"http://{server.host}:{server.port}/echo", content=b"x" * 100_000)
    assert response.content == b"x" * 100_000


@pytest.mark.parametrize("args", [["-k", "sync"], ["-k", "thread"], ["-k", "sync", "--preload"],
                                  ["--interface", "asgi", "-k", "sync"]])
def test_asgi_app_under_a_wsgi_class_is_a_one_line_error(args):
    result = run_tiamat(*args, "-w", "2", "-b", "127.0.0.1:0", ASGI)
    assert result.returncode == 4, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("tiamat:")]
    assert len(errors) == 1, result.stderr
    assert "ASGI application" in errors[0] and "-k asgi" in errors[0]


def test_interface_override(tiamat_server):
    # detection says WSGI for this plain function; --interface asgi makes it an ASGI app
    server = tiamat_server("--interface", "asgi", "tests/apps/asgi_hello.py:disguised")
    assert server.get("/")[2] == b"asgi hello"
    wsgi = tiamat_server("--interface", "wsgi", "-k", "asgi", WSGI)
    assert wsgi.get("/")[2] == b"hello"


@pytest.mark.parametrize("spec", ["wk_pkg.workers:PlainWorker", "wk_pkg.workers.PlainWorker"])
def test_custom_worker_class(tiamat_server, spec):
    server = tiamat_server("--pythonpath", "tests/apps", "-k", spec, "-w", "2", WSGI)
    server.wait_log(r"Using worker: wk_pkg\.workers:PlainWorker")
    status, _, body = server.get("/")
    assert (status, body[:14]) == (200, b"custom worker ")
    server.signal(15)
    assert server.wait(10) == 0


@pytest.mark.parametrize("alias", ["uvicorn.workers.UvicornWorker", "uvicorn_worker.UvicornWorker"])
def test_uvicorn_worker_names_run_the_asgi_worker(tiamat_server, alias):
    server = tiamat_server("-k", alias, ASGI)
    server.wait_log(r"Using worker: tiamat\.workers\.asgi:AsgiWorker")
    assert alias in server.log() and "asgi" in server.log()
    assert server.get("/")[2] == b"asgi hello"


@pytest.mark.parametrize("spec, message", [
    ("nosuchclass", "unknown worker class"),
    ("wk_pkg.workers:NotAWorker", "not a subclass"),
    ("wk_pkg.nothing:Worker", "cannot load worker class"),
])
def test_bad_worker_class(spec, message):
    result = run_tiamat("--pythonpath", "tests/apps", "-k", spec, "-b", "127.0.0.1:0", WSGI)
    assert result.returncode != 0
    assert message in result.stderr


def test_asgi2_app_is_detected_and_wrapped(tiamat_server):
    server = tiamat_server("tests/apps/asgi_hello.py:Asgi2App")
    assert server.get("/two")[2] == b"asgi2 /two"

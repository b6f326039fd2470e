"""Issue 2, items 1 and 8: the shipped examples serve, and the README's set-up commands are
the ones the project really uses."""

from __future__ import annotations

import json
import re

import pytest
from conftest import ROOT


def test_hello_example(tiamat_server):
    server = tiamat_server("examples/hello.py")
    status, headers, body = server.get("/")
    assert (status, body) == (200, b"Hello, World!\n")
    assert headers["Content-Type"] == "text/plain"


def test_hello_example_as_module_attr(tiamat_server):
    server = tiamat_server("--chdir", "examples", "hello:app")
    assert server.get("/")[2] == b"Hello, World!\n"


def test_flask_example(tiamat_server):
    pytest.importorskip("flask")
    server = tiamat_server("-w", "2", "examples/flask_app.py")
    status, _, body = server.get("/")
    assert (status, body) == (200, b"Hello from Flask under tiamat!\n")
    status, headers, body = server.get("/hello/tiamat")
    data = json.loads(body)
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert data["greeting"] == "Hello, tiamat!" and data["under_tiamat"] is True
    assert data["pid"] in server.worker_pids()
    assert server.get("/missing")[0] == 404

    import http.client

    conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    try:
        conn.request("POST", "/echo", body=json.dumps({"a": [1, 2]}),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read()) == {"received": {"a": [1, 2]}}
    finally:
        conn.close()


def test_readme_opens_with_the_two_setup_commands():
    text = (ROOT / "README.md").read_text()
    commands = re.findall(r"^    (\S.*)$", text, re.MULTILINE)[:2]
    assert commands[0] == "pip install -e . && tiamat examples/hello.py"
    assert commands[1] == "pip install -e '.[test]' && python -m pytest -n 2 -q"
    assert "http://127.0.0.1:8000" in text.split(commands[0])[0]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q -e '.[test]'" in ci
    assert "\npython -m pytest -n 2 -q\n" in ci, ".ci/run runs exactly the README's test command"


def test_default_bind_is_the_readme_address():
    """``tiamat examples/hello.py`` serves http://127.0.0.1:8000, as the README says (checked
    through --print-config, since port 8000 may be taken on a shared machine)."""
    from conftest import run_tiamat

    result = run_tiamat("--print-config", "examples/hello.py", env={"PORT": ""})
    assert re.search(r"^bind\s+= \['127\.0\.0\.1:8000'\]$", result.stdout, re.MULTILINE)

"""The first thing a user does: serve examples/hello.py and get the greeting."""

from conftest import run_tiamat


def test_hello_example_serves(tiamat_server):
    server = tiamat_server("examples/hello.py", "-w", "2")
    status, headers, body = server.get("/")
    assert status == 200
    assert body == b"Hello, World!\n"
    assert headers["Server"] == "tiamat"


def test_version():
    result = run_tiamat("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("tiamat ")

"""Shared fixtures: start the real ``tiamat`` as a subprocess and stop it by its own group.

``server = tiamat_server("examples/hello.py", "-w", "2")`` starts ``python -m tiamat`` in a
new session (its own process group) bound to 127.0.0.1:0, waits until it answers HTTP, and
reads the chosen port from the "Listening at" log line.  Every server a test starts is
killed by its process group at teardown, whatever the test did.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
APPS = Path(__file__).resolve().parent / "apps"
LISTENING = re.compile(r"Listening at: (\S+)")


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02,
             message: str = "condition") -> object:
    """Poll ``predicate`` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def read_response(sock: socket.socket, buffer: bytes = b"", head_only: bool = False
                  ) -> tuple[bytes, bytes, bytes]:
    """One response (Content-Length or chunked) from ``sock``; returns (head, body, rest).
    ``head_only``: the answer to a HEAD request, whose framing fields promise no body."""
    while b"\r\n\r\n" not in buffer:
        data = sock.recv(65536)
        assert data, f"connection closed mid-head: {buffer!r}"
        buffer += data
    head, _, buffer = buffer.partition(b"\r\n\r\n")
    if head_only:
        return head, b"", buffer
    lower = head.lower()
    if b"content-length:" in lower:
        length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
        while len(buffer) < length:
            data = sock.recv(65536)
            assert data
            buffer += data
        return head, buffer[:length], buffer[length:]
    if b"transfer-encoding: chunked" in lower:
        body = b""
        while True:
            while b"\r\n" not in buffer:
                buffer += sock.recv(65536)
            size_line, _, buffer = buffer.partition(b"\r\n")
            size = int(size_line, 16)
            while len(buffer) < size + 2:
                buffer += sock.recv(65536)
            body += buffer[:size]
            buffer = buffer[size + 2:]
            if size == 0:
                return head, body, buffer
    return head, b"", buffer


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the peer sends until it closes (a reset, the socket's timeout or any other
    socket error ends it too: what arrived before is returned)."""
    chunks = []
    while True:
        try:
            data = sock.recv(65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def read_to_end(sock: socket.socket, timeout: float = 10.0) -> tuple[bytes, str]:
    """Everything the peer sends, and how the connection ended: "eof" (a clean close),
    "reset" (the kernel's RST: what the client had not read yet may be lost) or "timeout"."""
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            more = sock.recv(65536)
        except ConnectionResetError:
            return data, "reset"
        except TimeoutError:
            break
        if not more:
            return data, "eof"
        data += more
    return data, "timeout"


class TiamatServer:
    """A running ``tiamat`` process and the ways a test talks to it."""

    def __init__(self, args: list[str], tmp_path: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.args = args
        self.log_path = tmp_path / f"tiamat-{len(list(tmp_path.glob('tiamat-*.log')))}.log"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.env.pop("TIAMAT", None)
        self.cwd = cwd or ROOT
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.host = "127.0.0.1"
        self.port = 0

    # --- process ---------------------------------------------------------------------
    def start(self, wait: bool = True, timeout: float = 15.0) -> TiamatServer:
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tiamat", *self.args], cwd=self.cwd, env=self.env,
            stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
            start_new_session=True)
        if wait:
            self.wait_listening(timeout)
            self.wait_answering(timeout)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_listening(self, timeout: float = 15.0) -> str:
        def listening() -> str | None:
            match = LISTENING.search(self.log())
            if match is None and self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"tiamat exited with {self.proc.returncode}:\n{self.log()}")
            return match.group(1) if match else None

        self.url = str(wait_for(listening, timeout, message="'Listening at' in the log"))
        if self.url.startswith("http"):
            hostport = self.url.split("://", 1)[1]
            host, _, port = hostport.rpartition(":")
            self.host, self.port = host.strip("[]"), int(port)
        return self.url

    def wait_answering(self, timeout: float = 15.0, path: str = "/") -> None:
        def answers() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"tiamat exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=2) as sock:
                    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
                                 .encode())
                    return sock.recv(16).startswith(b"HTTP/1.")
            except OSError:
                return False

        wait_for(answers, timeout, interval=0.05, message="the server to answer")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def wait(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """Teardown: kill the whole process group, whatever state it is in."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._log_file.close()

    # --- observing -------------------------------------------------------------------
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern: str, timeout: float = 10.0, count: int = 1) -> re.Match[str]:
        regex = re.compile(pattern)

        def found() -> re.Match[str] | None:
            matches = list(regex.finditer(self.log()))
            return matches[count - 1] if len(matches) >= count else None

        return wait_for(found, timeout, message=f"{pattern!r} in the log")  # type: ignore[return-value]

    def worker_pids(self) -> list[int]:
        """Pids of the master's live children (read from /proc)."""
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        try:
            return [int(p) for p in children.read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            return []

    def stop_mid_response(self, sock: socket.socket, request: bytes, started: bytes,
                          ended: bytes, then: bytes) -> tuple[bytes, bytes]:
        """Send ``request`` on ``sock``; once the response shows ``started``, begin a
        graceful stop (SIGTERM, logged by the master); once the response ends with
        ``ended``, send ``then`` at once, as a keep-alive client may.  Returns the response
        and everything after it until the server closed.  What a client sees when a stop
        comes while its response (or the app's work after it) is still under way."""
        sock.sendall(request)
        data = b""
        while started not in data:
            more = sock.recv(4096)
            assert more, data
            data += more
        self.signal(signal.SIGTERM)
        self.wait_log(r"Shutting down: graceful")
        while not data.endswith(ended):
            more = sock.recv(4096)
            assert more, data
            data += more
        sock.sendall(then)
        return data, read_until_closed(sock)

    def refuses(self) -> bool:
        """Whether a new client is refused (the listener closed, as a stop does at once),
        not accepted or left waiting in the backlog."""
        try:
            with socket.create_connection((self.host, self.port), timeout=1):
                return False
        except ConnectionRefusedError:
            return True
        except OSError:
            return False

    def worker_sockets(self) -> set[tuple[int, str]]:
        """(pid, socket inode) of every socket the workers hold.  Take it before a client
        connects; a socket more in :meth:`wait_accepted` is its connection, accepted.  (A
        fixed sleep instead fails on a loaded machine: the connection is still in the
        listen backlog when the test goes on, and a stop closes the listener under it.)"""
        found = set()
        for pid in self.worker_pids():
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except (FileNotFoundError, ProcessLookupError):
                continue
            for fd in fds:
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except (FileNotFoundError, ProcessLookupError):
                    continue
                if link.startswith("socket:"):
                    found.add((pid, link))
        return found

    def wait_accepted(self, before: set[tuple[int, str]], count: int = 1,
                      timeout: float = 10.0) -> None:
        """Wait until the workers hold ``count`` sockets more than ``before``
        (:meth:`worker_sockets`): the clients' connections are accepted."""
        wait_for(lambda: len(self.worker_sockets() - before) >= count, timeout, interval=0.005,
                 message=f"{count} connection(s) accepted by a worker")

    def request(self, raw: bytes, timeout: float = 5.0) -> bytes:
        """Send raw bytes on a new connection and read until the server closes it."""
        with socket.create_connection((self.host, self.port), timeout=timeout) as sock:
            sock.sendall(raw)
            return read_until_closed(sock)

    def get(self, path: str = "/", timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
        import http.client

        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()


@pytest.fixture
def tiamat_server(tmp_path: Path) -> Iterator[Callable[..., TiamatServer]]:
    """Factory: ``tiamat_server(*args, env=None, cwd=None, wait=True)`` -> a started server.

    ``-b 127.0.0.1:0`` is added unless the args bind themselves (``-b``, ``--bind``, ``-p``,
    ``-c``).
    """
    started: list[TiamatServer] = []

    def start(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
              wait: bool = True, timeout: float = 15.0) -> TiamatServer:
        argv = list(args)
        if not any(a in ("-b", "--bind", "-p", "--port", "-c", "--config") or
                   a.startswith(("--bind=", "--port=")) for a in argv):
            argv = ["-b", "127.0.0.1:0", *argv]
        server = TiamatServer(argv, tmp_path, env=env, cwd=cwd)
        started.append(server)
        return server.start(wait=wait, timeout=timeout)

    yield start
    for server in started:
        server.stop()


def run_tiamat(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
               timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run ``python -m tiamat`` to completion (for commands that exit: errors, --version ...).

    On a timeout the whole process group is killed and the test fails.
    """
    full_env = {**os.environ, **(env or {})}
    full_env.pop("TIAMAT", None)
    proc = subprocess.Popen([sys.executable, "-m", "tiamat", *args], cwd=cwd or ROOT,
                            env=full_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"tiamat {' '.join(args)} did not exit in {timeout}s:\n{err}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

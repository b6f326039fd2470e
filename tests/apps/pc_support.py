"""Helpers shared by the process-control tests: process tree, HTTP, a bounded load loop."""

from __future__ import annotations

import http.client
import os
import re
import socket
import threading
from pathlib import Path

_TITLE = re.compile(r"tiamat: worker (\d+)")


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def proc_state(pid: int) -> str:
    """The one-letter state from /proc/PID/stat ('' once gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return ""


def alive(pid: int) -> bool:
    return proc_state(pid) not in ("", "Z", "X")


def worker_slots(master_pid: int) -> dict[int, list[int]]:
    """slot -> pids of the master's live worker processes (from their process titles)."""
    slots: dict[int, list[int]] = {}
    for pid in children(master_pid):
        match = _TITLE.search(cmdline(pid))
        if match and alive(pid):
            slots.setdefault(int(match.group(1)), []).append(pid)
    return slots


def one_per_slot(master_pid: int, count: int) -> dict[int, int] | None:
    """{slot: pid} when exactly slots 0..count-1 each have one worker, else None."""
    slots = worker_slots(master_pid)
    if sorted(slots) == list(range(count)) and all(len(p) == 1 for p in slots.values()) \
            and len(children(master_pid)) == count:
        return {slot: pids[0] for slot, pids in slots.items()}
    return None


def get(host: str, port: int, path: str = "/", timeout: float = 5.0) -> tuple[int, str]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def try_get(host: str, port: int, path: str = "/", timeout: float = 5.0) -> str | None:
    try:
        status, body = get(host, port, path, timeout)
    except OSError:
        return None
    return body if status == 200 else None


def unix_get(path: str, target: str = "/", timeout: float = 5.0) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


class Load:
    """``clients`` threads, each doing ``per_client`` requests (a new connection each), and
    recording every failure; bounded, so a broken server ends the test instead of hanging.
    :meth:`finish` ends it early (each client stops after its current request)."""

    def __init__(self, host: str, port: int, clients: int = 8, per_client: int = 400,
                 path: str = "/") -> None:
        self.host, self.port, self.path = host, port, path
        self.per_client = per_client
        self.done = 0
        self.failures: list[str] = []
        self.bodies: set[str] = set()
        self._lock = threading.Lock()
        self._finish = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def start(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def _run(self) -> None:
        for _ in range(self.per_client):
            if self._finish.is_set():
                return
            try:
                status, body = get(self.host, self.port, self.path, timeout=10)
                error = None if status == 200 else f"status {status}"
            except OSError as exc:
                error, body = f"{type(exc).__name__}: {exc}", ""
            with self._lock:
                self.done += 1
                if error:
                    self.failures.append(error)
                else:
                    self.bodies.add(body.rsplit(" ", 1)[-1])

    def finish(self) -> None:
        self._finish.set()

    def join(self, timeout: float = 60.0) -> None:
        for thread in self.threads:
            thread.join(timeout)

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self.threads)


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def kill_tree(pid: int, sig: int = 9) -> None:
    """Stop a server this test started outside the fixture (its whole process group)."""
    try:
        os.killpg(os.getpgid(pid), sig)
    except (ProcessLookupError, PermissionError):
        pass


def listening_from(server, log_file: Path, timeout: float = 15.0) -> None:
    """For a server started with ``wait=False`` whose error log goes to ``log_file``: read
    its address from there and wait until it answers."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        text = log_file.read_text() if log_file.exists() else ""
        match = re.search(r"Listening at: http://([\d.]+):(\d+)", text)
        if match:
            server.host, server.port = match.group(1), int(match.group(2))
            break
        if time.monotonic() > deadline or server.proc.poll() is not None:
            raise AssertionError(f"no 'Listening at' in {log_file}:\n{text}\n{server.log()}")
        time.sleep(0.02)
    server.wait_answering(timeout)

#!/usr/bin/env python3
"""Memory of tiamat and its peers: PSS/USS of the master and each worker, after warm-up.

    python bench/memory.py                      # every app, every server (about 5 minutes)
    python bench/memory.py --apps flask --servers 'tiamat|gunicorn'
    python bench/memory.py --workers 4 --warmup 150

For the Flask, Django and FastAPI apps in bench/memory_apps/, with 4 workers: tiamat
(default, --preload, --refork-after, both), gunicorn (default, --preload, --preload plus a
hand-written gc.freeze() in its when_ready hook, and the uvicorn worker for FastAPI),
uvicorn --workers and granian.  Each server is started, warmed up until every worker has
served at least --warmup requests (a mix of the app's pages, each on a new connection, from
8 client threads), given a second to settle, then measured from /proc/PID/smaps_rollup:

* PSS (proportional set size): shared pages split between the processes sharing them; the
  total over the master and its workers is what the server costs the machine;
* USS (unique set size): the pages only that process maps.

The peers and frameworks are installed by the script itself into bench/memory_apps/.venv
(pinned in bench/memory_apps/requirements.txt, which includes bench/requirements.txt), and
tiamat runs from this tree on that same interpreter.  Every server runs in its own process
group, which is stopped at the end, also on errors or Ctrl-C.  Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import http.client
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
APPS_DIR = os.path.join(BENCH, "memory_apps")
VENV = os.path.join(APPS_DIR, ".venv")
VPY = os.path.join(VENV, "bin", "python")
REQUIREMENTS = os.path.join(APPS_DIR, "requirements.txt")
sys.path.insert(0, ROOT)

from tiamat import memory  # noqa: E402 - after the path is set

MB = 1024 * 1024
REFORK_AFTER = "100"


# --- environment -------------------------------------------------------------------------
def ensure_venv() -> None:
    """bench/memory_apps/.venv with the pinned requirements (only when they changed)."""
    stamp = os.path.join(VENV, ".requirements")
    wanted = "".join(open(path).read() for path in  # noqa: SIM115
                     (REQUIREMENTS, os.path.join(BENCH, "requirements.txt")))
    have = open(stamp).read() if os.path.exists(stamp) else None  # noqa: SIM115
    if have == wanted:
        return
    print("# installing bench/memory_apps/.venv ...", file=sys.stderr, flush=True)
    if not os.path.exists(VPY):
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    subprocess.run([VPY, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "-r", REQUIREMENTS], check=True)
    with open(stamp, "w") as f:
        f.write(wanted)


def versions() -> dict[str, str]:
    code = ("import importlib.metadata as m, sys; print(sys.version.split()[0]); "
            "[print(n, m.version(n)) for n in "
            "('gunicorn', 'uvicorn', 'granian', 'flask', 'django', 'fastapi', 'uvloop', 'httptools')]")
    out = subprocess.run([VPY, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    found = {"python": out[0]}
    for line in out[1:]:
        if line.strip():
            name, version = line.split()
            found[name] = version
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    found["tiamat"] = commit or "?"
    return found


# --- what is measured --------------------------------------------------------------------
@dataclass
class App:
    name: str
    wsgi: str | None
    asgi: str | None
    paths: list[str]
    env: dict[str, str] = field(default_factory=dict)


APPS = [
    App("flask", "flask_app:app", None, ["/", "/json", "/page", "/gc"]),
    App("django", "djproject.wsgi:application", None, ["/", "/json", "/page", "/admin/login/", "/gc"],
        {"DJANGO_SETTINGS_MODULE": "djproject.settings"}),
    App("fastapi", None, "fastapi_app:app", ["/", "/json", "/page", "/items/7", "/gc"]),
]


@dataclass
class Server:
    name: str
    argv: list[str]
    #: a log line to wait for before the measured warm-up (the refork transition)
    wait_for: str | None = None


def servers_for(app: App, workers: int, port: int) -> list[Server]:
    bind = f"127.0.0.1:{port}"
    target = app.wsgi or app.asgi
    assert target is not None
    w = str(workers)
    tiamat = [VPY, "-m", "tiamat", "-w", w, "-b", bind, target]
    done = r"Refork: generation 1 complete"
    result = [
        Server("tiamat", tiamat),
        Server("tiamat --preload", [*tiamat, "--preload"]),
        Server(f"tiamat --refork-after {REFORK_AFTER}", [*tiamat, "--refork-after", REFORK_AFTER], done),
        Server(f"tiamat --preload --refork-after {REFORK_AFTER}",
               [*tiamat, "--preload", "--refork-after", REFORK_AFTER], done),
    ]
    gunicorn = [VPY, "-m", "gunicorn", "-w", w, "-b", bind]
    if app.asgi:
        gunicorn += ["-k", "uvicorn.workers.UvicornWorker"]
    freeze = os.path.join(APPS_DIR, "gunicorn_freeze.py")
    result += [
        Server("gunicorn" + (" -k uvicorn" if app.asgi else ""), [*gunicorn, target]),
        Server("gunicorn --preload" + (" -k uvicorn" if app.asgi else ""), [*gunicorn, "--preload", target]),
        Server("gunicorn --preload + gc.freeze()" + (" -k uvicorn" if app.asgi else ""),
               [*gunicorn, "--preload", "-c", freeze, target]),
    ]
    if app.asgi:
        result.append(Server("uvicorn --workers", [VPY, "-m", "uvicorn", "--workers", w, "--host",
                                                   "127.0.0.1", "--port", str(port), "--log-level",
                                                   "warning", target]))
    interface = "asgi" if app.asgi else "wsgi"
    result.append(Server("granian", [VPY, "-m", "granian", "--interface", interface, "--workers", w,
                                     "--host", "127.0.0.1", "--port", str(port), target]))
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Running:
    """A server in its own process group, its log in memory; stopped by its group."""

    def __init__(self, server: Server, app: App, port: int) -> None:
        self.port = port
        self.log_path = f"/tmp/tiamat-bench-memory-{os.getpid()}-{port}.log"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([APPS_DIR, ROOT]), **app.env}
        env.pop("TIAMAT", None)
        self.log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(server.argv, cwd=APPS_DIR, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self.log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def get(self, path: str) -> int | None:
        """One request on a new connection; the pid that answered (X-Pid), or None."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                return None
            return int(response.getheader("X-Pid", "0")) or None
        except (OSError, http.client.HTTPException, ValueError):
            return None
        finally:
            conn.close()

    def wait_answering(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with {self.proc.returncode}:\n{self.log()[-2000:]}")
            if self.get("/") is not None:
                return
            time.sleep(0.1)
        raise RuntimeError("did not answer in time")

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            try:
                self.proc.wait(wait)
                deadline = time.monotonic() + wait
                while _group_alive(self.proc.pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                if not _group_alive(self.proc.pid):
                    break
            except subprocess.TimeoutExpired:
                continue
        self.log_file.close()
        try:
            os.unlink(self.log_path)
        except OSError:
            pass


def _group_alive(pgid: int) -> bool:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def warm_up(run: Running, app: App, workers: int, per_worker: int, limit: float) -> dict[int, int]:
    """Traffic until ``workers`` worker pids each served ``per_worker`` requests (or ``limit`` s)."""
    counts: dict[int, int] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def client(offset: int) -> None:
        i = offset
        while not stop.is_set():
            pid = run.get(app.paths[i % len(app.paths)])
            i += 1
            if pid is not None:
                with lock:
                    counts[pid] = counts.get(pid, 0) + 1

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(8)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + limit
    try:
        while time.monotonic() < deadline:
            with lock:
                live = {pid: n for pid, n in counts.items() if os.path.exists(f"/proc/{pid}")}
            if len(live) >= workers and sorted(live.values())[-workers] >= per_worker:
                break
            time.sleep(0.1)
    finally:
        stop.set()
        for thread in threads:
            thread.join(15)
    return {pid: n for pid, n in counts.items() if os.path.exists(f"/proc/{pid}")}


@dataclass
class Measured:
    server: str
    command: str
    master: memory.Usage | None = None
    workers: list[memory.Usage] = field(default_factory=list)
    others: list[tuple[str, memory.Usage]] = field(default_factory=list)
    served: dict[int, int] = field(default_factory=dict)
    error: str | None = None

    @property
    def total_pss(self) -> int:
        every = [self.master] if self.master else []
        return sum(u.pss for u in every + self.workers + [u for _, u in self.others])

    @property
    def total_uss(self) -> int:
        every = [self.master] if self.master else []
        return sum(u.uss for u in every + self.workers + [u for _, u in self.others])


def _role(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"
    match = re.match(r"tiamat: (mold|worker|master)", cmdline)
    if match:
        return match.group(1)
    if "resource_tracker" in cmdline:
        return "resource_tracker"
    return "worker"


def measure(app: App, server: Server, workers: int, per_worker: int) -> Measured:
    port = int(server.argv[server.argv.index("-b") + 1].rsplit(":", 1)[1]) if "-b" in server.argv \
        else int(server.argv[server.argv.index("--port") + 1])
    result = Measured(server.name, " ".join(os.path.basename(a) if a == VPY else a for a in server.argv))
    run = Running(server, app, port)
    try:
        run.wait_answering()
        if server.wait_for:
            warm_up(run, app, workers, int(REFORK_AFTER) * 2, 60.0)
            deadline = time.monotonic() + 30
            while not re.search(server.wait_for, run.log()) and time.monotonic() < deadline:
                warm_up(run, app, workers, 10, 2.0)
            if not re.search(server.wait_for, run.log()):
                raise RuntimeError(f"no {server.wait_for!r} in the log")
        result.served = warm_up(run, app, workers, per_worker, 60.0)
        time.sleep(1.0)
        master = run.proc.pid
        result.master = memory.Usage.of(master)
        for pid in memory.descendants(master):
            usage = memory.Usage.of(pid)
            if usage is None:
                continue
            role = _role(pid)
            if role == "worker":
                result.workers.append(usage)
            else:
                result.others.append((role, usage))
    except Exception as exc:  # a server that fails gives a FAILED row, not a crash
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        run.stop()
    return result


# --- output ------------------------------------------------------------------------------
def mb(value: int) -> str:
    return f"{value / MB:.1f}"


def table(app: App, rows: list[Measured]) -> str:
    base = next((r.total_pss for r in rows if r.server.startswith("gunicorn") and "preload" not in r.server
                 and not r.error), 0)
    lines = [f"### {app.name}", "",
             "| server | total PSS MB | vs gunicorn | master PSS | mold PSS | workers PSS (each) "
             "| total USS MB | requests per worker |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.server} | FAILED: {r.error.splitlines()[0][:80]} | | | | | | |")
            continue
        molds = [u for role, u in r.others if role == "mold"]
        ratio = f"{r.total_pss / base:.2f}x" if base else "-"
        lines.append(
            f"| {r.server} | **{mb(r.total_pss)}** | {ratio} | {mb(r.master.pss) if r.master else '-'} | "
            f"{', '.join(mb(u.pss) for u in molds) or '-'} | {', '.join(mb(u.pss) for u in r.workers)} | "
            f"{mb(r.total_uss)} | {min(r.served.values()) if r.served else 0}+ |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--apps", default="flask|django|fastapi", help="regex of app names")
    parser.add_argument("--servers", default=".", help="regex of server names")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=150, help="requests each worker serves first")
    parser.add_argument("--no-install", action="store_true", help="use bench/memory_apps/.venv as is")
    args = parser.parse_args()
    if not args.no_install:
        ensure_venv()
    if not os.path.exists(VPY):
        sys.exit("bench/memory_apps/.venv is missing (run without --no-install)")
    found = versions()
    print(f"# Memory, {args.workers} workers, after each worker served {args.warmup}+ requests "
          f"({platform.machine()}, {os.cpu_count()} CPUs, Linux {platform.release()})")
    print("# " + ", ".join(f"{k} {v}" for k, v in found.items()))
    commands = []
    for app in APPS:
        if not re.search(args.apps, app.name):
            continue
        rows = []
        for server in servers_for(app, args.workers, free_port()):
            if not re.search(args.servers, server.name):
                continue
            print(f"# {app.name}: {server.name} ...", file=sys.stderr, flush=True)
            rows.append(measure(app, server, args.workers, args.warmup))
            commands.append(f"{app.name}: {rows[-1].command}")
        print()
        print(table(app, rows), flush=True)
    print("\nCommands (run in bench/memory_apps with PYTHONPATH=.:../.. and its .venv's python):")
    for line in commands:
        line = line.replace(APPS_DIR + os.sep, "")
        print(f"    {re.sub(r'127.0.0.1:[0-9]+|--port [0-9]+', 'PORT', line)}")


if __name__ == "__main__":
    main()

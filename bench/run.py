#!/usr/bin/env python3
"""tiamat's benchmark: tiamat against gunicorn, uvicorn and granian on the same apps.

    python bench/run.py            # full run: 3 interleaved rounds of 8 s per server and app
    python bench/run.py --quick    # one round of 2 s: under 2 minutes
    python bench/run.py --only 'hello' --servers 'tiamat|granian'
    python bench/run.py --balance  # CPU share of each of 2 workers under 64 keep-alive connections
    python bench/run.py --startstop  # start-to-first-answer and idle graceful-stop times
    python bench/run.py --profile wsgi-hello  # py-spy profile of the tiamat worker under load
    python bench/run.py --instructions  # valgrind instructions per request: steady under noise

It installs what it needs itself: the peers, the bench apps' frameworks and tiamat's own
dependencies from PyPI into bench/.venv (pinned in bench/requirements.txt, so tiamat and every
peer run on the same interpreter with the same httptools/uvloop), and wrk from Debian.  The
server runs pinned to CPU 0 and the load generator to CPU 1; everything it starts is stopped
by pid (its own process group) at the end, also on Ctrl-C or an error.  A server that fails to
start or answer gives a FAILED row, not a crash.  Results go to stdout and bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
APPS = os.path.join(BENCH, "apps")
VENV = os.path.join(BENCH, ".venv")
VPY = os.path.join(VENV, "bin", "python")
RESULTS = os.path.join(BENCH, "results")
#: where tiamat is imported from (the working tree; --src or --head change it)
SRC = ROOT
HOST = "127.0.0.1"
SERVER_CPU = "0"
CLIENT_CPU = "1"

# --------------------------------------------------------------------------------------------
# installing what the benchmark needs


def ensure_tools(skip_install: bool) -> None:
    """bench/.venv with the pinned requirements, and wrk; both only when missing."""
    stamp = os.path.join(VENV, ".requirements")
    with open(os.path.join(BENCH, "requirements.txt")) as f:
        wanted = f.read()
    have = open(stamp).read() if os.path.exists(stamp) else None  # noqa: SIM115
    if have != wanted and not skip_install:
        print("# installing the benchmark environment into bench/.venv ...", flush=True)
        if not os.path.exists(VPY):
            subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
        subprocess.run([VPY, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "-r", os.path.join(BENCH, "requirements.txt")], check=True)
        with open(stamp, "w") as f:
            f.write(wanted)
    if not os.path.exists(VPY):
        sys.exit("bench/.venv is missing (run without --no-install)")
    ensure_debian_tool("wrk", skip_install)
    if shutil.which("taskset") is None:
        sys.exit("taskset (util-linux) is missing")
    sys.path.insert(0, APPS)
    import bench_file  # the 1 MiB file the file apps serve

    bench_file.ensure()


def ensure_debian_tool(name: str, skip_install: bool) -> str:
    """The path of a command from the Debian package of the same name, installed if missing."""
    found = shutil.which(name)
    if found is None:
        if skip_install:
            sys.exit(f"{name} is missing (run without --no-install, or apt-get install {name})")
        print(f"# installing {name} from Debian ...", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", name], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        found = shutil.which(name)
    if found is None:
        sys.exit(f"{name} is still missing after apt-get install")
    return found


def versions() -> dict[str, str]:
    code = ("import importlib.metadata as m, sys, json; print(json.dumps({'python': sys.version.split()[0], "
            "**{n: m.version(n) for n in ('gunicorn', 'uvicorn', 'granian', 'flask', 'fastapi', "
            "'httptools', 'uvloop', 'websockets')}}))")
    out = subprocess.run([VPY, "-c", code], capture_output=True, text=True, check=True).stdout
    found = json.loads(out)
    code = "import tiamat, sys; print(tiamat.__version__, tiamat.__file__)"
    out = subprocess.run([VPY, "-c", code], capture_output=True, text=True, check=True, cwd=APPS,
                         env={**os.environ, "PYTHONPATH": SRC}).stdout.split()
    where = "working tree" if SRC == ROOT else os.path.relpath(SRC, ROOT)
    found["tiamat"] = f"{out[0]} ({where} at {git_head()}, {os.path.relpath(out[1], ROOT)})"
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0]
    found["wrk"] = wrk.split(" [")[0]
    return found


def compile_sources() -> None:
    """Byte-compile tiamat's source and the bench apps, as ``pip install`` does for the peers.

    The servers run tiamat from a source tree; under PYTHONDONTWRITEBYTECODE (set in many
    CI and container environments) every start would compile each module again, about 50 ms
    that an installed tiamat never pays, while the peers load their installed .pyc files.
    Reading .pyc files still works with the variable set; only this step writes them."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([VPY, "-m", "compileall", "-q", os.path.join(SRC, "tiamat"), APPS], env=env,
                   stdout=subprocess.DEVNULL, check=False)


def git_head() -> str:
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


# --------------------------------------------------------------------------------------------
# servers


def tiamat(kind: str, threads: int = 0) -> Callable[[str, int, int], list[str]]:
    def argv(app: str, port: int, workers: int) -> list[str]:
        extra = ["--threads", str(threads)] if threads else []
        return [VPY, "-m", "tiamat", "-b", f"{HOST}:{port}", "-w", str(workers), "-k", kind, *extra,
                "--log-level", "warning", app]
    return argv


def gunicorn(kind: str, threads: int = 0) -> Callable[[str, int, int], list[str]]:
    def argv(app: str, port: int, workers: int) -> list[str]:
        extra = ["--threads", str(threads)] if threads else []
        return [os.path.join(VENV, "bin", "gunicorn"), "-b", f"{HOST}:{port}", "-w", str(workers),
                "-k", kind, *extra, "--log-level", "warning", app]
    return argv


def uvicorn(app: str, port: int, workers: int) -> list[str]:
    return [os.path.join(VENV, "bin", "uvicorn"), "--host", HOST, "--port", str(port),
            "--workers", str(workers), "--loop", "uvloop", "--http", "httptools",
            "--log-level", "warning", "--no-access-log", app]


def granian(interface: str, threads: int = 0) -> Callable[[str, int, int], list[str]]:
    def argv(app: str, port: int, workers: int) -> list[str]:
        extra = ["--blocking-threads", str(threads)] if threads else []
        return [os.path.join(VENV, "bin", "granian"), "--interface", interface, "--host", HOST,
                "--port", str(port), "--workers", str(workers), *extra, "--log-level", "warning", app]
    return argv


@dataclass
class Server:
    label: str
    argv: Callable[[str, int, int], list[str]]

    @property
    def is_tiamat(self) -> bool:
        return self.label.startswith("tiamat")


@dataclass
class Scenario:
    name: str
    wsgi_app: str | None
    asgi_app: str | None
    servers: list[Server]
    connections: int = 64
    workers: int = 1
    path: str = "/"
    script: str | None = None
    websocket: bool = False
    note: str = ""


THREADS = 128  # for the 10 ms sleep: 2 workers x 128 threads x 100/s = 25.6k/s ceiling

WSGI_SERVERS = [Server("tiamat -k sync", tiamat("sync")), Server("gunicorn sync", gunicorn("sync")),
                Server("granian wsgi", granian("wsgi"))]
ASGI_SERVERS = [Server("tiamat -k asgi", tiamat("asgi")), Server("uvicorn", uvicorn),
                Server("granian asgi", granian("asgi"))]

SCENARIOS = [
    Scenario("wsgi-hello", "wsgi_hello:app", None,
             [*WSGI_SERVERS[:2], Server("gunicorn gthread(8)", gunicorn("gthread", 8)), WSGI_SERVERS[2]]),
    Scenario("flask-hello", "flask_hello:app", None, WSGI_SERVERS),
    Scenario("asgi-hello", None, "asgi_hello:app",
             [*ASGI_SERVERS, Server("gunicorn -k asgi", gunicorn("asgi"))]),
    Scenario("fastapi-hello", None, "fastapi_hello:app", ASGI_SERVERS),
    Scenario("wsgi-sleep10ms", "wsgi_sleep:app", None,
             [Server(f"tiamat -k thread({THREADS})", tiamat("thread", THREADS)),
              Server(f"gunicorn gthread({THREADS})", gunicorn("gthread", THREADS)),
              Server(f"granian wsgi({THREADS})", granian("wsgi", THREADS))],
             connections=256, workers=2, note=f"2 workers x {THREADS} threads"),
    Scenario("asgi-sleep10ms", None, "asgi_sleep:app", ASGI_SERVERS, connections=256, workers=2,
             note="2 workers"),
    Scenario("wsgi-file-1MiB", "wsgi_file:app", None, WSGI_SERVERS, note="wsgi.file_wrapper"),
    Scenario("asgi-file-1MiB", None, "asgi_file:app", ASGI_SERVERS,
             note="pathsend where offered (not uvicorn: one body message)"),
    Scenario("wsgi-upload-1MiB", "wsgi_upload:app", None, WSGI_SERVERS, script="upload.lua"),
    Scenario("asgi-upload-1MiB", None, "asgi_upload:app", ASGI_SERVERS, script="upload.lua"),
    Scenario("ws-echo", None, "asgi_ws:app", ASGI_SERVERS, websocket=True,
             note="bench/wsload.py: 64 clients, 32-byte text echo, no compression"),
]


class Running:
    """One server process in its own process group; stopped by its pid."""

    instances: dict[int, Running] = {}

    def __init__(self, argv: list[str], log_path: str, pin: str | None = SERVER_CPU,
                 env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.log_path = log_path
        self.log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([APPS, SRC]), "PYTHONUNBUFFERED": "1",
               **(env or {})}
        env.pop("WEB_CONCURRENCY", None)
        command = ["taskset", "-c", pin, *argv] if pin else argv
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(command, cwd=APPS, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid
        Running.instances[self.pid] = self

    def wait_ready(self, port: int, timeout: float = 20.0) -> float:
        """Seconds from the start until the first complete HTTP answer; raises if none comes."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with {self.proc.returncode}: {self.tail()}")
            if http_answers(port):
                return time.perf_counter() - self.started
            time.sleep(0.002)
        raise RuntimeError(f"no answer within {timeout:.0f} s: {self.tail()}")

    def tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode(errors="replace").strip().splitlines()
            return " | ".join(line.strip() for line in lines[-3:])[-300:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> float:
        """Signal the process group, wait for the master; SIGKILL the group after ``timeout``."""
        start = time.perf_counter()
        if self.proc.poll() is None:
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        elapsed = time.perf_counter() - start
        try:  # whatever of the group is left (workers of a master that died first)
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(5)
        self.log.close()
        Running.instances.pop(self.pid, None)
        return elapsed

    @classmethod
    def stop_all(cls) -> None:
        for running in list(cls.instances.values()):
            running.stop(signal.SIGKILL, 2.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def http_answers(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            return s.recv(16).startswith(b"HTTP/1.")
    except OSError:
        return False


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc: no psutil needed)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, from /proc/PID/stat (fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def group_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of ``pid`` and every process below it."""
    found = {}
    for each in [pid, *descendants(pid)]:
        try:
            found[each] = cpu_seconds(each)
        except OSError:
            pass
    return found


def tcp_sockets(pid: int) -> int:
    """How many sockets a process holds open (its connections, less a baseline taken idle)."""
    count = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                    count += 1
            except OSError:
                pass
    except OSError:
        pass
    return count


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------
# load generators


@dataclass
class Sample:
    rps: float = 0.0
    p99_ms: float = 0.0
    errors: int = 0
    failed: str = ""
    requests: int = 0
    #: server CPU (every process of it) per request, in microseconds: unlike req/s, barely
    #: moved by other load on the machine
    cpu_us: float = 0.0


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def run_wrk(port: int, scenario: Scenario, duration: float, connections: int | None = None,
            pin: str | None = CLIENT_CPU, during: Callable[[], None] | None = None) -> Sample:
    """One wrk run; ``during`` is called once, half-way through it."""
    conns = connections or scenario.connections
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{duration:g}s", "--latency", "--timeout", "5s"]
    if scenario.script:
        argv += ["-s", os.path.join(APPS, scenario.script)]
    argv.append(f"http://{HOST}:{port}{scenario.path}")
    if pin:
        argv = ["taskset", "-c", pin, *argv]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as proc:
        try:
            if during is not None:
                time.sleep(duration / 2)
                during()
            out, _ = proc.communicate(timeout=duration + 30)
        finally:
            if proc.poll() is None:
                proc.kill()
    return parse_wrk(out)


def parse_wrk(out: str) -> Sample:
    sample = Sample()
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not match:
        sample.failed = "wrk printed no result: " + out.strip()[-200:]
        return sample
    sample.rps = float(match.group(1))
    match = re.search(r"(\d+) requests in", out)
    if match:
        sample.requests = int(match.group(1))
    match = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
    if match:
        sample.p99_ms = float(match.group(1)) * _UNITS[match.group(2)]
    match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if match:
        sample.errors += sum(int(g) for g in match.groups())
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if match:
        sample.errors += int(match.group(1))
    return sample


def run_ws(port: int, scenario: Scenario, duration: float) -> Sample:
    argv = ["taskset", "-c", CLIENT_CPU, VPY, os.path.join(BENCH, "wsload.py"), f"ws://{HOST}:{port}/",
            "--connections", str(scenario.connections), "--duration", str(duration)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return Sample(failed="wsload failed: " + (proc.stderr or proc.stdout).strip()[-200:])
    return Sample(result["rps"], result["p99_ms"], result["errors"], requests=result["messages"])


# --------------------------------------------------------------------------------------------
# the throughput table


@dataclass
class Row:
    scenario: Scenario
    server: Server
    samples: list[Sample] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    command: str = ""

    def median(self) -> float | None:
        values = [s.rps for s in self.samples if not s.failed]
        return statistics.median(values) if values else None

    def p99(self) -> float | None:
        values = [s.p99_ms for s in self.samples if not s.failed]
        return statistics.median(values) if values else None

    def cpu_us(self) -> float | None:
        values = [s.cpu_us for s in self.samples if not s.failed and s.cpu_us]
        return statistics.median(values) if values else None

    def errors(self) -> int:
        return sum(s.errors for s in self.samples)


def measure(row: Row, duration: float, warmup: float, log_dir: str) -> None:
    scenario, server = row.scenario, row.server
    app = scenario.wsgi_app or scenario.asgi_app
    assert app is not None
    port = free_port()
    argv = server.argv(app, port, scenario.workers)
    row.command = " ".join(["taskset -c " + SERVER_CPU, *(os.path.relpath(a, ROOT) if a.startswith(BENCH)
                                                          else a for a in argv)]).replace(str(port), "PORT")
    name = re.sub(r"[^\w.-]+", "_", f"{scenario.name}-{server.label}")
    running = Running(argv, os.path.join(log_dir, name + ".log"))
    try:
        running.wait_ready(port)
        load = run_ws if scenario.websocket else run_wrk
        if warmup:
            load(port, scenario, warmup)
        before = group_cpu(running.pid)
        sample = load(port, scenario, duration)
        after = group_cpu(running.pid)
        if not sample.failed and not sample.requests:
            sample.failed = f"no request completed ({sample.errors} errors): {running.tail()}"
        used = sum(after[pid] - before.get(pid, 0.0) for pid in after)
        if sample.requests:
            sample.cpu_us = used / sample.requests * 1e6
        if running.proc.poll() is not None:
            sample.failed = sample.failed or f"server died: {running.tail()}"
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
        sample = Sample(failed=str(exc))
    finally:
        running.stop()
    if sample.failed:
        row.failures.append(sample.failed)
    row.samples.append(sample)
    state = f"FAILED {sample.failed[:150]}" if sample.failed else \
        (f"{sample.rps:10.0f} req/s  p99 {sample.p99_ms:7.2f} ms  errors {sample.errors}  "
         f"CPU {sample.cpu_us:6.1f} µs/req")
    print(f"  {scenario.name:18} {server.label:24} {state}", flush=True)


def throughput(args: argparse.Namespace, log_dir: str) -> list[Row]:
    only = re.compile(args.only) if args.only else None
    servers = re.compile(args.servers) if args.servers else None
    rows = [Row(sc, sv) for sc in SCENARIOS if not only or only.search(sc.name)
            for sv in sc.servers if not servers or sv.is_tiamat or servers.search(sv.label)]
    for number in range(args.rounds):
        print(f"# round {number + 1} of {args.rounds}", flush=True)
        # interleaved: every server of every app once per round, so drift hits all alike
        for row in rows:
            measure(row, args.duration, args.warmup, log_dir)
    return rows


def fmt_num(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def table(rows: list[Row]) -> str:
    lines = ["| app | server | req/s (median) | p99 ms | errors | tiamat/peer | server CPU µs/req | "
             "peer/tiamat CPU |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        tiamat_row = next((r for r in rows if r.scenario is row.scenario and r.server.is_tiamat), None)
        median, cpu = row.median(), row.cpu_us()
        ratio = cpu_ratio = "—"
        if not row.server.is_tiamat and tiamat_row is not None:
            mine, my_cpu = tiamat_row.median(), tiamat_row.cpu_us()
            if mine is not None and median:
                ratio = f"{mine / median:.2f}x"
            if my_cpu and cpu:
                cpu_ratio = f"{cpu / my_cpu:.2f}x"
        elif row.server.is_tiamat:
            ratio = cpu_ratio = "(tiamat)"
        rps = fmt_num(median)
        if row.failures:
            rps = f"FAILED ({len(row.failures)}/{len(row.samples)}): {row.failures[0][:80]}"
            if median is not None:
                rps = f"{fmt_num(median)} ({len(row.failures)} failed)"
        lines.append(f"| {row.scenario.name} | {row.server.label} | {rps} | {fmt_num(row.p99(), 2)} | "
                     f"{row.errors()} | {ratio} | {fmt_num(cpu, 1)} | {cpu_ratio} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# even load across workers


BALANCE_SERVERS = [
    ("tiamat -k sync -w 2", tiamat("sync"), "wsgi_hello:app"),
    ("tiamat -k sync -w 2 --reuse-port", lambda a, p, w: [*tiamat("sync")(a, p, w)[:-1], "--reuse-port", a],
     "wsgi_hello:app"),
    ("tiamat -k asgi -w 2", tiamat("asgi"), "asgi_hello:app"),
    ("uvicorn --workers 2", uvicorn, "asgi_hello:app"),
    ("granian wsgi --workers 2", granian("wsgi"), "wsgi_hello:app"),
]


def balance(args: argparse.Namespace, log_dir: str) -> str:
    """CPU share of each of 2 workers under 64 keep-alive connections.

    Unpinned, as the issue and peers.md measure it: the scheduler's placement of wrk next to
    one worker can skew the CPU shares even when the connections are split evenly, so the
    connections each worker holds are shown too.  With ``--balance-pinned`` both workers share
    CPU 0 (wrk on CPU 1): then the CPU shares are ~50/50 unless a worker starves outright."""
    pin = SERVER_CPU if args.balance_pinned else None
    lines = ["| server | worker CPU seconds | shares | connections held | req/s | larger share, each round "
             "| within 40-60% |",
             "|---|---|---|---|---:|---|---|"]
    servers = re.compile(args.servers) if args.servers else None
    for label, argv_of, app in BALANCE_SERVERS:
        if servers and not label.startswith("tiamat") and not servers.search(label):
            continue
        shares_all: list[list[float]] = []
        cpu_all: list[list[float]] = []
        conns_all: list[list[int]] = []
        rps: list[float] = []
        failure = ""
        for _ in range(args.rounds):
            port = free_port()
            running = Running(argv_of(app, port, 2), os.path.join(log_dir, "balance.log"), pin=pin)
            try:
                running.wait_ready(port)
                workers = wait_workers(running.pid, 2)
                time.sleep(1.0)  # let both workers finish booting: the split of a warm server counts
                idle = {pid: tcp_sockets(pid) for pid in workers}
                held: dict[int, int] = {}
                before = {pid: cpu_seconds(pid) for pid in workers}

                def count(held: dict[int, int] = held, idle: dict[int, int] = idle,
                          workers: list[int] = workers) -> None:
                    held.update({pid: tcp_sockets(pid) - idle[pid] for pid in workers})

                sample = run_wrk(port, Scenario("balance", app, None, []), args.duration,
                                 pin=CLIENT_CPU if pin else None, during=count)
                used = {pid: cpu_seconds(pid) - before[pid] for pid in workers}
                order = sorted(workers, key=lambda pid: -used[pid])
                total = sum(used.values()) or 1e-9
                shares_all.append([used[pid] / total for pid in order])
                cpu_all.append([used[pid] for pid in order])
                conns_all.append([held.get(pid, -1) for pid in order])
                rps.append(sample.rps)
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
                failure = str(exc)[:150]
            finally:
                running.stop()
        if not shares_all:
            lines.append(f"| {label} | FAILED: {failure} | | | | | |")
            continue
        worst = min(shares_all, key=lambda s: s[-1])
        cpu = cpu_all[shares_all.index(worst)]
        conns = conns_all[shares_all.index(worst)]
        ok = all(0.4 <= s <= 0.6 for shares in shares_all for s in shares)
        lines.append(f"| {label} | {' / '.join(f'{c:.2f}' for c in cpu)} (worst of {len(shares_all)}) | "
                     f"{' / '.join(f'{s:.0%}' for s in worst)} | {' / '.join(map(str, conns))} | "
                     f"{statistics.median(rps):,.0f} | "
                     f"{', '.join(f'{shares[0]:.0%}' for shares in shares_all)} | "
                     f"{'yes' if ok else 'NO'} |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def wait_workers(master: int, count: int, timeout: float = 10.0) -> list[int]:
    """The worker processes below ``master`` (helpers like multiprocessing's resource tracker
    are left out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [pid for pid in descendants(master) if "resource_tracker" not in cmdline(pid)
                and not cmdline(pid).startswith("taskset")]
        if len(pids) >= count:
            return pids
        time.sleep(0.02)
    raise RuntimeError(f"expected {count} workers below pid {master}")


# --------------------------------------------------------------------------------------------
# start and stop


STARTSTOP_SERVERS = [
    ("tiamat -w 2", tiamat("sync"), "flask_hello:app"),
    ("gunicorn -w 2", gunicorn("sync"), "flask_hello:app"),
    ("uvicorn --workers 2 (FastAPI)", uvicorn, "fastapi_hello:app"),
    ("tiamat -w 2 -k asgi (FastAPI)", tiamat("asgi"), "fastapi_hello:app"),
    ("granian --workers 2", granian("wsgi"), "flask_hello:app"),
]


def startstop(args: argparse.Namespace, log_dir: str) -> str:
    """Start to first answered request, and graceful stop (SIGTERM) of an idle server."""
    lines = ["| server | app | start → first answer (median ms) | idle graceful stop (median ms) |",
             "|---|---|---:|---:|"]
    rounds = max(3, args.rounds)
    for label, argv_of, app in STARTSTOP_SERVERS:
        starts, stops, failure = [], [], ""
        for _ in range(rounds):
            port = free_port()
            running = Running(argv_of(app, port, 2), os.path.join(log_dir, "startstop.log"), pin=None)
            try:
                starts.append(running.wait_ready(port))
                wait_workers(running.pid, 2)
                time.sleep(0.3)  # idle: no request in flight, workers settled
                stops.append(running.stop(signal.SIGTERM))
            except (RuntimeError, OSError) as exc:
                failure = str(exc)[:150]
            finally:
                running.stop(signal.SIGKILL)
        if not starts:
            lines.append(f"| {label} | {app} | FAILED: {failure} | |")
            continue
        lines.append(f"| {label} | {app} | {statistics.median(starts) * 1000:.0f} | "
                     f"{statistics.median(stops) * 1000:.0f} |" if stops else "FAILED |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# instructions per request (valgrind): a measure the machine's noise does not move

INSTRUCTION_ROWS = ("wsgi-hello", "flask-hello", "asgi-hello", "fastapi-hello")




def keepalive_requests(port: int, count: int, connections: int, timeout: float = 120.0) -> None:
    """``count`` GETs over ``connections`` keep-alive connections: one request on each, then
    every answer (read by its Content-Length), again and again; a plain client, as wrk's."""
    request = f"GET / HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode()
    deadline = time.monotonic() + timeout
    socks = [socket.create_connection((HOST, port), timeout=timeout) for _ in range(connections)]
    try:
        done = 0
        while done < count:
            batch = socks[:min(connections, count - done)]
            for sock in batch:
                sock.sendall(request)
            for sock in batch:
                data = b""
                while b"\r\n\r\n" not in data:
                    more = sock.recv(65536)
                    if not more or time.monotonic() > deadline:
                        raise RuntimeError("the server closed or stalled")
                    data += more
                head, _, body = data.partition(b"\r\n\r\n")
                length = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
                if length is None:
                    raise RuntimeError("an answer without Content-Length")
                while len(body) < int(length.group(1)):
                    more = sock.recv(65536)
                    if not more:
                        raise RuntimeError("the server closed mid-body")
                    body += more
            done += len(batch)
    finally:
        for sock in socks:
            sock.close()


def instructions_for(valgrind: str, server: Server, app: str, requests: int,
                     log_dir: str, tag: str) -> int:
    """User-space instructions of the server's busiest process after ``requests`` requests
    (valgrind cachegrind, following the fork into the worker), start-up included."""
    out_dir = os.path.join(log_dir, f"cg-{tag}")
    os.makedirs(out_dir, exist_ok=True)
    port = free_port()
    argv = [valgrind, "--tool=cachegrind", "--cache-sim=no", "--trace-children=yes",
            f"--cachegrind-out-file={out_dir}/cg.%p", *server.argv(app, port, 1)]
    running = Running(argv, os.path.join(log_dir, f"cg-{tag}.log"), pin=None)
    try:
        running.wait_ready(port, timeout=180.0)
        keepalive_requests(port, 20, 1)
        keepalive_requests(port, requests, 32)
    finally:
        running.stop(timeout=60.0)
    counts = []
    for name in os.listdir(out_dir):
        with open(os.path.join(out_dir, name)) as f:
            for line in f:
                if line.startswith("summary:"):
                    counts.append(int(line.split()[1]))
    if not counts:
        raise RuntimeError(f"no cachegrind output: {running.tail()}")
    return max(counts)


#: start-up, counted as the requests are: the servers whose config files take gunicorn's hooks
STARTUP_SERVERS = [("tiamat -w 1", tiamat("sync")), ("gunicorn -w 1", gunicorn("sync"))]
STARTUP_APP = "flask_hello:app"
#: a config file whose post_worker_init hook ends the start being counted: the worker notes
#: its pid, kills its master (no count of the master's own is wanted) and exits
STARTUP_HOOK = """import os, signal
def post_worker_init(worker):
    with open(os.environ["BENCH_READY_PID"], "w") as f:
        f.write(str(os.getpid()))
    os.kill(os.getppid(), signal.SIGKILL)
    os._exit(0)
"""


def startup_instructions(valgrind: str, label: str, argv_of: Callable[[str, int, int], list[str]],
                         log_dir: str) -> int:
    """User-space instructions from the command's start until its first worker has loaded
    the app: that worker's count, which includes its master's up to the fork (cachegrind's
    counters are copied by fork()) -- the path a first answer waits for, less the few
    instructions of that answer.  PYTHONHASHSEED=0 makes it repeat exactly."""
    tag = re.sub(r"[^a-z0-9]+", "-", label.lower())
    out_dir = os.path.join(log_dir, f"cg-start-{tag}")
    os.makedirs(out_dir, exist_ok=True)
    hook = os.path.join(log_dir, "startup_hook.py")
    with open(hook, "w") as f:
        f.write(STARTUP_HOOK)
    ready = os.path.join(out_dir, "ready.pid")
    argv = [valgrind, "--tool=cachegrind", "--cache-sim=no", "--trace-children=yes",
            f"--cachegrind-out-file={out_dir}/cg.%p", *argv_of(STARTUP_APP, free_port(), 1), "-c", hook]
    running = Running(argv, os.path.join(log_dir, f"cg-start-{tag}.log"), pin=None,
                      env={"PYTHONHASHSEED": "0", "BENCH_READY_PID": ready})
    deadline = time.monotonic() + 180.0
    try:
        while time.monotonic() < deadline:
            try:
                with open(ready) as f:
                    pid = f.read().strip()
                with open(os.path.join(out_dir, f"cg.{pid}")) as f:
                    for line in f:
                        if line.startswith("summary:"):
                            return int(line.split()[1])
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
    finally:
        running.stop(timeout=10.0)
    raise RuntimeError(f"no worker became ready: {running.tail()}")


def instructions(args: argparse.Namespace, log_dir: str) -> str:
    """Instructions per request of each server's worker on the hello apps: the difference
    between a run of 1000 and one of 3000 requests, over 2000 (start-up cancels out).

    Req/s on a shared 2-core machine swing by 2-3x between runs; instruction counts repeat
    within about 1 %, so they show whether a change to the hot path helped.  They leave out
    the kernel (the same read/write/epoll per request for every server here) and are not
    time: a C server's instructions run faster than the interpreter's."""
    valgrind = ensure_debian_tool("valgrind", args.no_install)
    servers_re = re.compile(args.servers) if args.servers else None
    # peer/tiamat, as the CPU column of the throughput table: above 1, tiamat does less work
    lines = ["| app | server | instructions/request | peer/tiamat |", "|---|---|---:|---:|"]
    for scenario in SCENARIOS:
        if scenario.name not in INSTRUCTION_ROWS or (args.only and not re.search(args.only, scenario.name)):
            continue
        app = scenario.wsgi_app or scenario.asgi_app
        assert app is not None
        results: list[tuple[Server, int | None, str]] = []
        for server in scenario.servers:
            if not server.is_tiamat and servers_re is not None and not servers_re.search(server.label):
                continue
            tag = f"{scenario.name}-{re.sub(r'[^a-z0-9]+', '-', server.label.lower())}"
            try:
                low = instructions_for(valgrind, server, app, 1000, log_dir, tag + "-1000")
                high = instructions_for(valgrind, server, app, 3000, log_dir, tag + "-3000")
                results.append((server, (high - low) // 2000, ""))
            except (RuntimeError, OSError) as exc:
                results.append((server, None, str(exc)[:120]))
            print(f"# {scenario.name} / {server.label}: {results[-1][1] or results[-1][2]}", flush=True)
        ours = next((n for sv, n, _ in results if sv.is_tiamat), None)
        for server, count, error in results:
            if count is None:
                lines.append(f"| {scenario.name} | {server.label} | FAILED: {error} | |")
                continue
            ratio = "(tiamat)" if server.is_tiamat else (f"{count / ours:.2f}x" if ours else "")
            lines.append(f"| {scenario.name} | {server.label} | {count:,} | {ratio} |")
    if not args.only or re.search(args.only, "start"):
        lines += ["", "Start: from the command to its first worker having loaded "
                  f"{STARTUP_APP} (`-w 1`), in instructions:", "",
                  "| server | instructions | peer/tiamat |", "|---|---:|---:|"]
        counts = []
        for label, argv_of in STARTUP_SERVERS:
            try:
                counts.append((label, startup_instructions(valgrind, label, argv_of, log_dir)))
            except (RuntimeError, OSError) as exc:
                counts.append((label, None))
                print(f"# start / {label}: {str(exc)[:120]}", flush=True)
            print(f"# start / {label}: {counts[-1][1]}", flush=True)
        ours = counts[0][1]
        for label, count in counts:
            ratio = ("(tiamat)" if label.startswith("tiamat")
                     else f"{count / ours:.2f}x" if ours and count else "")
            lines.append(f"| {label} | {f'{count:,}' if count else 'FAILED'} | {ratio} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# profile


def profile(args: argparse.Namespace, log_dir: str) -> str:
    """Run py-spy on the (single) tiamat worker while wrk loads it; print the top functions.

    Only samples holding the GIL count (``--gil``): time blocked in epoll/send/recv, which
    release it, is left out, so the table shows where the Python-level time goes."""
    scenario = next(sc for sc in SCENARIOS if sc.name == args.profile)
    server = next(sv for sv in scenario.servers if sv.is_tiamat)
    app = scenario.wsgi_app or scenario.asgi_app
    assert app is not None
    port = free_port()
    running = Running(server.argv(app, port, scenario.workers), os.path.join(log_dir, "profile.log"))
    out = os.path.join(log_dir, f"profile-{scenario.name}.txt")
    try:
        running.wait_ready(port)
        worker = wait_workers(running.pid, 1)[-1]
        spy = subprocess.Popen([os.path.join(VENV, "bin", "py-spy"), "record", "--format", "raw",
                                "--nonblocking", "--gil", "-r", "500", "-d", str(int(args.duration)),
                                "-p", str(worker), "-o", out],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sample = (run_ws if scenario.websocket else run_wrk)(port, scenario, args.duration)
        spy.wait(30)
    finally:
        running.stop()
    return f"{sample.rps:,.0f} req/s under py-spy\n\n" + summarize_profile(out)


def summarize_profile(path: str, top: int = 25) -> str:
    """Self and inclusive share per function from py-spy's collapsed stacks (the raw file,
    with line numbers, stays next to the logs)."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count_text = line.rstrip().rpartition(" ")
            count = int(count_text)
            # "func (file.py:123)" -> "func (file.py)": one row per function, not per line
            frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
            total += count
            own[frames[-1]] = own.get(frames[-1], 0) + count
            for frame in set(frames):
                inclusive[frame] = inclusive.get(frame, 0) + count
    lines = ["| self % | total % | function |", "|---:|---:|---|"]
    for frame, count in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| {100 * count / total:.1f} | {100 * inclusive[frame] / total:.1f} | `{frame}` |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one round of 2 s per server: under 2 minutes")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3, --quick 1)")
    parser.add_argument("--duration", type=float,
                        help="seconds of wrk per measurement (default 8, --quick 2)")
    parser.add_argument("--warmup", type=float, help="seconds of load before each measurement (default 1)")
    parser.add_argument("--only", help="regex: only the apps (rows) whose name matches")
    parser.add_argument("--servers",
                        help="regex: only the peers whose label matches (tiamat always runs)")
    parser.add_argument("--balance", action="store_true", help="only the per-worker CPU share check")
    parser.add_argument("--balance-pinned", action="store_true",
                        help="--balance with the server on CPU 0 and wrk on CPU 1")
    parser.add_argument("--startstop", action="store_true", help="only the start/stop timings")
    parser.add_argument("--all", action="store_true", help="throughput, balance and start/stop")
    parser.add_argument("--profile", metavar="APP", help="py-spy the tiamat worker on one app row")
    parser.add_argument("--instructions", action="store_true",
                        help="valgrind instructions per request on the hello apps (steady on a "
                             "noisy machine; installs valgrind)")
    parser.add_argument("--no-install", action="store_true", help="fail instead of installing")
    parser.add_argument("--src", help="import tiamat from this source tree instead of the working tree")
    parser.add_argument("--head", action="store_true",
                        help="benchmark the committed HEAD (exported to bench/results/src-SHA), not "
                             "the working tree with others' uncommitted edits")
    args = parser.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.duration = args.duration or (2.0 if args.quick else 8.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else 1.0)
    if (os.cpu_count() or 1) < 2:
        print("# warning: fewer than 2 CPUs; server and wrk share one", file=sys.stderr)

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    ensure_tools(args.no_install)
    global SRC
    if args.head:
        SRC = os.path.join(RESULTS, "src-" + git_head())
        if not os.path.isdir(SRC):
            os.makedirs(SRC)
            archive = subprocess.run(["git", "-C", ROOT, "archive", "HEAD", "tiamat"], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", SRC], input=archive, check=True)
    elif args.src:
        SRC = os.path.abspath(args.src)
    compile_sources()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    log_dir = os.path.join(RESULTS, stamp)
    os.makedirs(log_dir, exist_ok=True)
    found = versions()
    report = [f"# tiamat benchmark {stamp} UTC", "",
              "Versions: " + ", ".join(f"{k} {v}" for k, v in found.items()), "",
              f"Settings: server on CPU {SERVER_CPU}, load generator on CPU {CLIENT_CPU}; "
              f"wrk -t1 -c64 (256 for the sleep rows) -d{args.duration:g}s --latency; "
              f"{args.rounds} interleaved round(s), {args.warmup:g} s warm-up; 1 worker unless noted.", ""]
    print("\n".join(report), flush=True)
    try:
        if args.profile:
            report.append(profile(args, log_dir))
        elif args.instructions:
            report += ["## Instructions per request (valgrind, user space, 1 worker)", "",
                       instructions(args, log_dir), ""]
        else:
            args.balance = args.balance or args.balance_pinned
            if args.all or not (args.balance or args.startstop):
                rows = throughput(args, log_dir)
                report += ["## Throughput", "", table(rows), ""]
                notes = [f"- {sc.name}: {sc.note}" for sc in SCENARIOS if sc.note
                         and any(r.scenario is sc for r in rows)]
                commands = [f"- {r.scenario.name} / {r.server.label}: `{r.command}`" for r in rows]
                report += [*notes, "", "Command lines:", "", *commands, ""]
            if args.balance or args.all:
                where = "workers on CPU 0, wrk on CPU 1" if args.balance_pinned else "unpinned"
                report += [f"## Even load across 2 workers (64 keep-alive connections, {where})", "",
                           balance(args, log_dir), ""]
            if args.startstop or args.all:
                report += ["## Start and stop (2 workers, unpinned)", "", startstop(args, log_dir), ""]
    except KeyboardInterrupt:
        print("\n# interrupted: stopping every server started", file=sys.stderr)
        return 130
    finally:
        Running.stop_all()
    text = "\n".join(report)
    with open(os.path.join(RESULTS, f"{stamp}.md"), "w") as f:
        f.write(text + "\n")
    print("\n" + text)
    print(f"\n# saved bench/results/{stamp}.md (server logs in bench/results/{stamp}/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Metrics aggregated by the master: Prometheus text on --metrics-bind, StatsD over UDP."""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import threading
import time

from conftest import APPS, wait_for

from tiamat import metrics

APP = str(APPS / "ops_app.py")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    """``{'name{labels}': value}`` from the metrics endpoint."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type", "").startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    finally:
        conn.close()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def _metrics_server(tiamat_server, *args: str, **kw):
    port = _free_port()
    server = tiamat_server(APP, "--metrics-bind", f"127.0.0.1:{port}", *args, **kw)
    server.metrics_port = port
    return server


def test_counters_after_known_traffic(tiamat_server):
    server = _metrics_server(tiamat_server, "-w", "2")
    # the fixture's readiness probe is one request: wait until it is counted, then take deltas
    wait_for(lambda: scrape(server.metrics_port)['tiamat_request_duration_seconds_count'] >= 1)
    before = scrape(server.metrics_port)
    for _ in range(7):
        assert server.get("/")[0] == 200
    for _ in range(3):
        assert server.get("/missing")[0] == 404

    def settled() -> dict[str, float] | None:
        now = scrape(server.metrics_port)
        done = now["tiamat_request_duration_seconds_count"] - before[
            "tiamat_request_duration_seconds_count"]
        return now if done >= 10 else None

    after = wait_for(settled, message="10 requests counted")
    assert after['tiamat_requests_total{status="2xx"}'] - before['tiamat_requests_total{status="2xx"}'] == 7
    assert after['tiamat_requests_total{status="4xx"}'] - before['tiamat_requests_total{status="4xx"}'] == 3
    assert after['tiamat_requests_total{status="5xx"}'] == 0
    assert after["tiamat_request_duration_seconds_count"] - before[
        "tiamat_request_duration_seconds_count"] == 10
    inf = after['tiamat_request_duration_seconds_bucket{le="+Inf"}']
    assert inf == after["tiamat_request_duration_seconds_count"]
    buckets = [v for k, v in after.items() if k.startswith("tiamat_request_duration_seconds_bucket")]
    assert buckets == sorted(buckets)  # cumulative
    assert after["tiamat_request_duration_seconds_sum"] > 0
    assert after["tiamat_requests_in_flight"] == 0
    assert after['tiamat_workers{state="idle"}'] == 2
    assert after["tiamat_workers_target"] == 2
    for reason in ("timeout", "crash", "max-requests", "reload"):
        assert after[f'tiamat_worker_restarts_total{{reason="{reason}"}}'] == 0
    listener = f"127.0.0.1:{server.port}"
    assert after[f'tiamat_listen_backlog{{listener="{listener}"}}'] == 0
    assert after[f'tiamat_listen_backlog_limit{{listener="{listener}"}}'] > 0


def test_busy_in_flight_and_duration_buckets(tiamat_server, tmp_path):
    release = tmp_path / "release"
    server = _metrics_server(tiamat_server, "-w", "2", env={"OPS_RELEASE": str(release)})
    sock = socket.create_connection((server.host, server.port), timeout=30)
    try:
        sock.sendall(b"GET /block HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        wait_for(lambda: (m := scrape(server.metrics_port)) and m["tiamat_requests_in_flight"] == 1
                 and m['tiamat_workers{state="busy"}'] == 1
                 and m['tiamat_workers{state="idle"}'] == 1, message="one busy, one idle")
        during = scrape(server.metrics_port)  # and it stays so while the request is blocked
        assert during["tiamat_requests_in_flight"] == 1
        assert during['tiamat_workers{state="busy"}'] == 1
        release.write_text("go")
        assert sock.recv(100).startswith(b"HTTP/1.1 200")
    finally:
        sock.close()
    server.get("/sleep?0.3")
    after = wait_for(lambda: (m := scrape(server.metrics_port))
                     and m["tiamat_requests_in_flight"] == 0
                     and m['tiamat_request_duration_seconds_bucket{le="+Inf"}']
                     - m['tiamat_request_duration_seconds_bucket{le="0.25"}'] >= 1 and m,
                     message="the 0.3 s request above the 0.25 s bucket")
    assert after['tiamat_workers{state="busy"}'] == 0


def _per_slot(values: dict[str, float], name: str) -> dict[int, float]:
    return {int(m.group(1)): value for key, value in values.items()
            if (m := re.fullmatch(name + r'\{slot="(\d+)"\}', key))}


def test_connections_and_cpu_load_per_worker(tiamat_server):
    """What the workers balance by, per slot: held keep-alive connections, and the CPU a
    worker that keeps answering CPU-bound requests used over its last loop tick."""
    server = _metrics_server(tiamat_server, "-w", "2")
    idle = [socket.create_connection((server.host, server.port), timeout=10) for _ in range(3)]
    burning = threading.Event()
    burner = http.client.HTTPConnection(server.host, server.port, timeout=10)

    def burn() -> None:  # (http.client reconnects when a response says Connection: close)
        deadline = time.monotonic() + 20
        while not burning.is_set() and time.monotonic() < deadline:
            burner.request("GET", "/burn?0.05")
            burner.getresponse().read()

    thread = threading.Thread(target=burn, daemon=True)
    try:
        for sock in idle:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            assert sock.recv(1000).startswith(b"HTTP/1.1 200")
        held = wait_for(lambda: (c := _per_slot(scrape(server.metrics_port),
                                                "tiamat_worker_connections"))
                        and sum(c.values()) == 3 and c, message="3 connections held")
        assert sorted(held) == [0, 1]
        thread.start()
        busy = wait_for(lambda: (loads := _per_slot(scrape(server.metrics_port),
                                                    "tiamat_worker_cpu_load"))
                        and sorted(loads) == [0, 1] and max(loads.values()) >= 0.2 and loads,
                        timeout=15, message="both loads, one above 0.2")
        assert min(busy.values()) >= 0
    finally:
        burning.set()
        if thread.is_alive():
            thread.join(30)
        burner.close()
        for sock in idle:
            sock.close()
    wait_for(lambda: sum(_per_slot(scrape(server.metrics_port),
                                   "tiamat_worker_connections").values()) == 0,
             message="no connection held")


def test_restarts_by_reason_and_counters_survive_them(tiamat_server):
    server = _metrics_server(tiamat_server, "-w", "1", "--max-requests", "3", "--timeout", "1")
    wait_for(lambda: scrape(server.metrics_port)["tiamat_request_duration_seconds_count"] >= 1)
    # one worker balances with no one: it keeps neither figure, and none is exported
    assert not any(key.startswith("tiamat_worker_c") for key in scrape(server.metrics_port))
    for _ in range(3):
        server.get("/")
    wait_for(lambda: scrape(server.metrics_port)[
        'tiamat_worker_restarts_total{reason="max-requests"}'] >= 1, message="max-requests restart")
    server.wait_answering()
    counted = scrape(server.metrics_port)['tiamat_requests_total{status="2xx"}']
    assert counted >= 3  # the exited worker's requests are still counted

    pid = wait_for(lambda: server.worker_pids() and server.worker_pids()[0])
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: scrape(server.metrics_port)['tiamat_worker_restarts_total{reason="crash"}'] == 1,
             message="crash restart")
    server.wait_answering()

    threading.Thread(target=lambda: _quietly(server.get, "/sleep?5", 10), daemon=True).start()
    wait_for(lambda: scrape(server.metrics_port)['tiamat_worker_restarts_total{reason="timeout"}'] == 1,
             timeout=15, message="timeout restart")
    final = scrape(server.metrics_port)
    assert final['tiamat_requests_total{status="2xx"}'] >= counted


def _quietly(func, *args):
    try:
        func(*args)
    except OSError:
        pass


def test_statsd_push(tiamat_server):
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(10)
    try:
        target = f"127.0.0.1:{receiver.getsockname()[1]}"
        server = tiamat_server(APP, "--statsd-host", target, "--statsd-prefix", "shop",
                               "--statsd-interval", "0.2")
        for _ in range(4):
            server.get("/missing")
        seen: list[str] = []

        def four_404s() -> bool:
            seen.extend(receiver.recv(65536).decode().splitlines())
            total = sum(int(m.group(1)) for line in seen
                        if (m := re.fullmatch(r"shop\.requests\.4xx:(\d+)\|c", line)))
            return total == 4

        wait_for(four_404s, timeout=15, message="4 x 404 pushed to statsd")
        assert any(re.fullmatch(r"shop\.workers\.idle:\d+\|g", line) for line in seen)
        assert any(re.fullmatch(r"shop\.request\.duration:[\d.]+\|ms", line) for line in seen)
    finally:
        receiver.close()


def test_metrics_off_by_default_and_404_elsewhere(tiamat_server):
    server = tiamat_server(APP)
    assert "Metrics at" not in server.log()
    port_server = _metrics_server(tiamat_server)
    conn = http.client.HTTPConnection("127.0.0.1", port_server.metrics_port, timeout=5)
    conn.request("GET", "/nope")
    assert conn.getresponse().status == 404
    conn.close()


def test_prometheus_rendering_unit():
    snap = metrics.Snapshot(status=[0, 0, 7, 0, 3, 0], count=10, sum_seconds=0.5,
                            buckets=[5, 5] + [0] * (len(metrics.BUCKETS) - 1), in_flight=1,
                            workers={"booting": 0, "idle": 1, "busy": 1, "stopping": 0}, target=2,
                            restarts={"timeout": 1, "crash": 0, "max-requests": 2, "reload": 0},
                            backlog={"127.0.0.1:80": (4, 128)},
                            balance={0: (3, 0.25), 1: (2, None)})
    text = metrics.render_prometheus(snap)
    assert 'tiamat_requests_total{status="2xx"} 7\n' in text
    assert 'tiamat_request_duration_seconds_bucket{le="0.005"} 5\n' in text
    assert 'tiamat_request_duration_seconds_bucket{le="0.01"} 10\n' in text
    assert 'tiamat_request_duration_seconds_bucket{le="+Inf"} 10\n' in text
    assert 'tiamat_worker_restarts_total{reason="max-requests"} 2\n' in text
    assert 'tiamat_listen_backlog{listener="127.0.0.1:80"} 4\n' in text
    assert "# TYPE tiamat_request_duration_seconds histogram" in text
    assert 'tiamat_worker_connections{slot="0"} 3\n' in text
    assert 'tiamat_worker_connections{slot="1"} 2\n' in text
    assert 'tiamat_worker_cpu_load{slot="0"} 0.25\n' in text
    assert 'tiamat_worker_cpu_load{slot="1"}' not in text  # (not measured yet)


def test_accept_backlog_while_the_only_worker_is_busy(tiamat_server, tmp_path):
    release = tmp_path / "release"
    server = _metrics_server(tiamat_server, "-w", "1", env={"OPS_RELEASE": str(release)})
    listener = f'tiamat_listen_backlog{{listener="127.0.0.1:{server.port}"}}'
    blocker = socket.create_connection((server.host, server.port), timeout=30)
    waiting = []
    try:
        blocker.sendall(b"GET /block HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        wait_for(lambda: scrape(server.metrics_port)["tiamat_requests_in_flight"] == 1)
        # the sync worker is inside the app: new connections wait in the kernel's queue
        for _ in range(3):
            waiting.append(socket.create_connection((server.host, server.port), timeout=30))
        wait_for(lambda: scrape(server.metrics_port)[listener] == 3, message="3 queued")
        release.write_text("go")
        wait_for(lambda: scrape(server.metrics_port)[listener] == 0, message="queue drained")
    finally:
        release.write_text("go")
        for sock in (blocker, *waiting):
            sock.close()


def test_reload_restarts_are_counted(tiamat_server):
    server = _metrics_server(tiamat_server, "-w", "2")
    old = set(server.worker_pids())
    server.signal(signal.SIGHUP)
    wait_for(lambda: scrape(server.metrics_port)['tiamat_worker_restarts_total{reason="reload"}'] == 2,
             timeout=20, message="2 reload restarts")
    assert not set(server.worker_pids()) & old


def test_stalled_scrapers_do_not_hold_the_master(tiamat_server):
    server = _metrics_server(tiamat_server, "-w", "1")
    stalled = [socket.create_connection(("127.0.0.1", server.metrics_port), timeout=10)
               for _ in range(3)]
    try:
        stalled[0].sendall(b"GET /metr")  # half a request line, then silence
        # the master still scrapes for others and still replaces a dead worker
        assert "tiamat_workers_target" in " ".join(scrape(server.metrics_port))
        pid = wait_for(lambda: server.worker_pids() and server.worker_pids()[0])
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: server.worker_pids() and server.worker_pids()[0] != pid,
                 message="a replacement worker")
        server.wait_answering()
        # and a stalled client is dropped after a deadline rather than kept forever
        stalled[0].settimeout(15)
        assert stalled[0].recv(10) == b""
    finally:
        for sock in stalled:
            sock.close()


def test_bad_or_busy_metrics_address_is_one_line_and_exit_1():
    from conftest import run_tiamat

    bad = run_tiamat(APP, "-b", "127.0.0.1:0", "--metrics-bind", "nope")
    assert bad.returncode == 1
    assert "tiamat: cannot start: --metrics-bind 'nope'" in bad.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = run_tiamat(APP, "-b", "127.0.0.1:0", "--metrics-bind",
                          f"127.0.0.1:{taken.getsockname()[1]}")
    assert busy.returncode == 1
    assert "--metrics-bind" in busy.stderr and "in use" in busy.stderr


def test_counters_exact_across_a_refork_generation(tiamat_server):
    server = _metrics_server(tiamat_server, "-w", "2", "--refork-after", "5")
    wait_for(lambda: scrape(server.metrics_port)["tiamat_request_duration_seconds_count"] >= 1)
    before = scrape(server.metrics_port)
    for _ in range(20):
        server.get("/")
    server.wait_log(r"generation 1 complete", timeout=20)
    for _ in range(10):
        server.get("/missing")

    def counted() -> dict[str, float] | None:
        now = scrape(server.metrics_port)
        return now if now["tiamat_request_duration_seconds_count"] - before[
            "tiamat_request_duration_seconds_count"] >= 30 else None

    after = wait_for(counted, message="30 requests counted")
    assert after['tiamat_requests_total{status="2xx"}'] - before['tiamat_requests_total{status="2xx"}'] == 20
    assert after['tiamat_requests_total{status="4xx"}'] == 10
    assert after['tiamat_workers{state="mold"}'] == 1
    assert after['tiamat_workers{state="idle"}'] == 2


def test_asgi_worker_counts_the_same_way(tiamat_server):
    port = _free_port()
    server = tiamat_server(str(APPS / "asgi_hello.py"), "-w", "2", "--metrics-bind",
                           f"127.0.0.1:{port}")
    wait_for(lambda: scrape(port)["tiamat_request_duration_seconds_count"] >= 1)
    before = scrape(port)
    for _ in range(7):
        assert server.get("/")[0] == 200
    for _ in range(3):
        assert server.get("/missing")[0] == 404
    after = wait_for(lambda: (m := scrape(port)) and m["tiamat_request_duration_seconds_count"]
                     - before["tiamat_request_duration_seconds_count"] >= 10 and m)
    assert after['tiamat_requests_total{status="2xx"}'] - before['tiamat_requests_total{status="2xx"}'] == 7
    assert after['tiamat_requests_total{status="4xx"}'] - before['tiamat_requests_total{status="4xx"}'] == 3
    assert after["tiamat_requests_in_flight"] == 0

"""Worker life cycle: --max-requests recycling (one at a time, no lost request), --preload."""

from __future__ import annotations

import re

import pytest
from apps.pc_support import Load, one_per_slot, try_get
from conftest import wait_for

APP = "tests/apps/pc_app.py"
GRANT = re.compile(r"Worker (\d+) \(pid (\d+)\) reached max-requests; replacing it")
EXITED = re.compile(r"Worker (\d+) \(pid (\d+)\) exited \(recycle\)")
#: worker class -> the app and arguments it runs with
CLASSES = {
    "sync": (APP, "-k", "sync"),
    "thread": (APP, "-k", "thread", "--threads", "4"),
    "asgi": ("tests/apps/pc_asgi_app.py", "-k", "asgi"),
}


@pytest.mark.parametrize("kind", list(CLASSES))
def test_max_requests_recycles_one_worker_at_a_time_without_failures(tiamat_server, kind):
    server = tiamat_server(*CLASSES[kind], "-w", "3", "--max-requests", "15",
                           "--max-requests-jitter", "5")
    # every worker booted, so the load is shared (one worker alone would ask only once)
    server.wait_log(r"Ready: 3 worker")
    load = Load(server.host, server.port, clients=6, per_client=60).start()
    load.join(60)
    assert not load.running and load.done == 360
    assert load.failures == [], f"{load.failures[:5]}\n{server.log()[-4000:]}"
    # every worker that reached its quota gets its turn, one after the other
    asked = len(re.findall(r"asking to be replaced", server.log()))
    assert asked >= 2
    wait_for(lambda: len(EXITED.findall(server.log())) >= asked, timeout=30,
             message=f"{asked} recycled workers")
    wait_for(lambda: one_per_slot(server.pid, 3), timeout=20, message="3 workers again")
    events = []
    for line in server.log().splitlines():
        if match := GRANT.search(line):
            events.append(("grant", int(match.group(2))))
        elif match := EXITED.search(line):
            events.append(("exit", int(match.group(2))))
    recycling = None
    for kind, pid in events:  # never a second grant before the previous recycled worker left
        if kind == "grant":
            assert recycling is None, f"{pid} granted while {recycling} was still recycling"
            recycling = pid
        elif pid == recycling:
            recycling = None


def test_max_requests_jitter_spreads_the_quotas(tiamat_server):
    server = tiamat_server(APP, "-w", "2", "--max-requests", "5", "--max-requests-jitter", "50",
                           "--log-level", "info")
    wait_for(lambda: one_per_slot(server.pid, 2), message="2 workers")
    load = Load(server.host, server.port, clients=2, per_client=60).start()
    load.join(60)
    assert load.failures == []
    quotas = {int(n) for n in re.findall(r"served (\d+) requests \(max_requests\)", server.log())}
    assert quotas and all(5 <= q <= 55 for q in quotas)


def test_preload_loads_the_app_once_in_the_master(tiamat_server, tmp_path):
    marker = tmp_path / "imports"
    app = tmp_path / "counted.py"
    app.write_text(
        "import os\n"
        f"with open({str(marker)!r}, 'a') as f: f.write(f'{{os.getpid()}}\\n')\n"
        "def application(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Length', '2')])\n"
        "    return [b'ok']\n")
    server = tiamat_server(str(app), "-w", "3", "--preload")
    wait_for(lambda: one_per_slot(server.pid, 3), message="3 workers")
    assert marker.read_text().split() == [str(server.pid)]
    assert try_get(server.host, server.port) == "ok"

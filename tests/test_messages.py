"""Worker <-> master messages over the channel: post_message, on_message, broadcast."""

from __future__ import annotations

import json
import re

from apps.pc_support import get, one_per_slot
from conftest import wait_for


def test_broadcast_example_invalidates_every_workers_cache(tiamat_server):
    server = tiamat_server("examples/broadcast.py", "-w", "3")
    pids = set(wait_for(lambda: one_per_slot(server.pid, 3), message="3 workers").values())
    state: dict[int, str] = {}

    def seen_all(pattern: str) -> bool:
        body = get(server.host, server.port)[1]
        match = re.match(r"worker (\d) pid (\d+) (hit|miss) invalidations=(\d+)", body)
        assert match, body
        if re.search(pattern, body):
            state[int(match.group(2))] = body
        return set(state) == pids

    wait_for(lambda: seen_all(r"invalidations=0"), timeout=20, message="every worker warm")
    assert get(server.host, server.port, "/invalidate")[0] == 200
    state.clear()
    wait_for(lambda: seen_all(r"invalidations=1"), timeout=20,
             message="every worker invalidated once")
    assert all("invalidations=1" in body for body in state.values())


def test_post_message_reaches_the_hook_which_answers_one_worker(tiamat_server, tmp_path):
    hook_log = tmp_path / "messages.jsonl"
    server = tiamat_server("tests/apps/pc_messages.py", "-c", "tests/apps/pc_messages_conf.py",
                           "-b", "127.0.0.1:0", env={"PC_HOOK_LOG": str(hook_log)})
    workers = wait_for(lambda: one_per_slot(server.pid, 2), message="2 workers")
    status, body = get(server.host, server.port, "/post?m=hello")
    assert status == 200
    sender = int(body.split()[0])
    record = json.loads(wait_for(lambda: hook_log.exists() and hook_log.read_text(),
                                 message="on_message").splitlines()[0])
    assert record["pid"] == sender and record["message"]["m"] == "hello"
    assert workers[record["slot"]] == sender and record["message"]["slot"] == record["slot"]

    replies: dict[int, str] = {}

    def both_reported() -> bool:
        pid, _, text = get(server.host, server.port)[1].partition(" ")
        replies[int(pid)] = text
        return len(replies) == 2 and "ack hello" in replies.get(sender, "")

    wait_for(both_reported, timeout=20, message="the reply in the sender")
    other = next(pid for pid in replies if pid != sender)
    assert "ack" not in replies[other]  # server.send reached that one worker only


def test_the_api_is_harmless_outside_a_worker():
    from tiamat import worker

    assert worker.worker_id() is None or isinstance(worker.worker_id(), int)
    assert worker.post_message("x") is False
    assert worker.broadcast("x") is False

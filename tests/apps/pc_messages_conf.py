"""on_message(server, worker, message): record, then reply to that worker only."""

import json
import os

workers = 2


def on_message(server, worker, message):
    with open(os.environ["PC_HOOK_LOG"], "a") as f:
        f.write(json.dumps({"pid": worker.pid, "slot": worker.slot, "message": message}) + "\n")
    server.send(worker, f"ack {message['m']}")

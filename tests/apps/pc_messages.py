"""App + config for the message tests: /post?m=X posts to the master, whose on_message hook
(in tests/apps/pc_messages_conf.py) records it and answers this worker alone."""

import os
from urllib.parse import parse_qs

from tiamat import worker

received = []
worker.on_message(received.append)


def application(environ, start_response):
    query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    if environ["PATH_INFO"] == "/post":
        worker.post_message({"m": query.get("m"), "slot": worker.worker_id()})
    body = f"{os.getpid()} {worker.worker_id()} {received!r}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]

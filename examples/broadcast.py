"""One request invalidates a cache in every worker: ``tiamat examples/broadcast.py -w 3``.

Each worker keeps its own cache (here: a computed greeting).  ``GET /invalidate`` asks the
master, over the worker's channel, to broadcast ``"invalidate"`` to every worker; each one
clears its cache in its own loop, between requests.  ``GET /`` shows which worker answered,
whether its cache was warm, and how many invalidations it has received.

    curl localhost:8000/            # "worker 1 pid 4242 hit invalidations=0"
    curl localhost:8000/invalidate  # every worker drops its cache
"""

import os
import time

from tiamat import worker

cache: dict[str, str] = {}
invalidations = 0


@worker.on_message
def on_message(message):
    global invalidations
    if message == "invalidate":
        cache.clear()
        invalidations += 1


def expensive_greeting():
    time.sleep(0.01)  # stands for a database query
    return "Hello from the cache"


def application(environ, start_response):
    if environ["PATH_INFO"] == "/invalidate":
        delivered = worker.broadcast("invalidate")
        body = b"invalidating every worker\n" if delivered else b"not running under tiamat\n"
    else:
        state = "hit" if "greeting" in cache else "miss"
        cache.setdefault("greeting", expensive_greeting())
        body = (f"worker {worker.worker_id()} pid {os.getpid()} {state} "
                f"invalidations={invalidations}\n").encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


app = application

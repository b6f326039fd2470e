"""A WSGI app for the memory and refork tests.

``/`` answers ``pid served`` where ``served`` counts the requests this process (and, for a
worker forked by the mold, the mold before it) has served: a worker forked from the master
starts at 0, one forked from a warm mold starts at the mold's count.
``/grow?mb=N[&sleep=S][&mark=PATH]`` keeps N more MB (touched, so resident), creates the
file PATH if given (the test learns the request is in the app), then sleeps S seconds.
``/gc[?sleep=S]`` runs a full collection (as a busy app eventually does by itself).
"""

import gc
import os
import time
from urllib.parse import parse_qs

SERVED = 0
_KEPT: list[bytes] = []
#: many small tracked objects, built at import: shared with the workers when preloaded
OBJECTS = [{"n": i, "s": str(i), "l": [i, i + 1]} for i in range(int(os.environ.get("MEM_OBJECTS", "0")))]


def application(environ, start_response):
    global SERVED
    SERVED += 1
    path = environ["PATH_INFO"]
    query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    if path == "/grow":
        _KEPT.append(b"\1" * (int(query.get("mb", "10")) * 1024 * 1024))
        if "mark" in query:
            open(query["mark"], "w").close()
        time.sleep(float(query.get("sleep", "0")))
    elif path == "/gc":
        gc.collect()
        time.sleep(float(query.get("sleep", "0")))
    body = f"{os.getpid()} {SERVED}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]

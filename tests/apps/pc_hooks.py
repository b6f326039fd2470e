"""Config for the hooks test: every hook appends one JSON line to $PC_HOOK_LOG saying what
it was given (argument type names, and the few values the test checks)."""

import json
import os

workers = 2


def _record(name, *args, **extra):
    kinds = [type(a).__name__ for a in args]
    with open(os.environ["PC_HOOK_LOG"], "a") as f:
        f.write(json.dumps({"hook": name, "pid": os.getpid(), "args": kinds, **extra}) + "\n")


def on_starting(server):
    _record("on_starting", server)


def when_ready(server):
    _record("when_ready", server, workers=len(server.workers))


def on_reload(server):
    _record("on_reload", server, generation=server.generation)


def pre_fork(server, worker):
    _record("pre_fork", server, worker, slot=worker.slot)


def post_fork(server, worker):
    _record("post_fork", server, worker, slot=worker.slot,
            worker_id=os.environ.get("TIAMAT_WORKER_ID"))


def post_worker_init(worker):
    _record("post_worker_init", worker, slot=worker.slot, app=callable(worker.app))


def worker_int(worker):
    _record("worker_int", worker, slot=worker.slot)


def pre_exec(server):
    _record("pre_exec", server)


def pre_request(worker, req):
    _record("pre_request", worker, req, path=req.path.decode(), slot=worker.slot)


def post_request(worker, req, environ, resp):
    _record("post_request", worker, req, environ, resp, path=environ["PATH_INFO"],
            status=resp.status)


def child_exit(server, worker):
    _record("child_exit", server, worker, slot=worker.slot, pid_of=worker.pid)


def worker_exit(server, worker):
    _record("worker_exit", server, worker, slot=worker.slot)


def nworkers_changed(server, new, old):
    _record("nworkers_changed", server, new=new, old=old)


def on_exit(server):
    _record("on_exit", server)

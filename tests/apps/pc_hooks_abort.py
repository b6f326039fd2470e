"""Config for the timeout test: worker_abort leaves a trace in $PC_HOOK_LOG."""

import os


def worker_abort(worker):
    with open(os.environ["PC_HOOK_LOG"], "a") as f:
        f.write(f"worker_abort {worker.slot} {os.getpid()}\n")

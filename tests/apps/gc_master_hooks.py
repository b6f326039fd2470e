"""Config for tests/test_startup_gc.py: the master writes whether its collector is on, each
time a worker exits (the ``child_exit`` hook runs in the master)."""

import gc
import os

bind = "127.0.0.1:0"
workers = 1


def child_exit(server, worker):
    with open(os.environ["GC_REPORT"], "a") as report:
        report.write(f"{int(gc.isenabled() and gc.get_threshold()[0] > 0)}\n")

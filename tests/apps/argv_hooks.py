"""Config for tests/test_argv.py: the master writes whether click was imported by the time
it starts (``on_starting`` runs in the master, before the first fork)."""

import os
import sys

bind = "127.0.0.1:0"


def on_starting(server):
    with open(os.environ["ARGV_REPORT"], "w") as report:
        report.write(str("click" in sys.modules))

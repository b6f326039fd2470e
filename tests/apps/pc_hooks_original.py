"""The original tiamat's hook names, taking no arguments (load() form of the config)."""

import os


def _note(text):
    with open(os.environ["PC_HOOK_LOG"], "a") as f:
        f.write(f"{text} {os.getpid()}\n")


def load():
    return {
        "before_fork": lambda: _note("before_fork"),
        "after_fork": lambda: _note("after_fork"),
        "before_exec": lambda: _note("before_exec"),
    }

"""gunicorn config for "--preload plus a hand-written gc.freeze()": freeze after the app is
loaded in the master (--preload) and before the first worker is forked."""

import gc


def when_ready(server):
    gc.collect()
    gc.freeze()

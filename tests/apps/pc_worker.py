"""Worker classes that misbehave on purpose, for the liveness tests."""

import time

from tiamat.workers.sync import SyncWorker


class StallingWorker(SyncWorker):
    """Reports ready, then its loop stops (no beats, not in a request): a wedged event loop."""

    def loop(self) -> None:
        while True:
            time.sleep(0.1)

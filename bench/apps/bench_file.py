"""The 1 MiB file the file apps serve; created once, next to the apps (gitignored)."""

import os

SIZE = 1024 * 1024
PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "file-1MiB.bin")


def ensure() -> str:
    if not os.path.exists(PATH) or os.path.getsize(PATH) != SIZE:
        with open(PATH + ".tmp", "wb") as f:
            f.write(os.urandom(SIZE))
        os.replace(PATH + ".tmp", PATH)
    return PATH

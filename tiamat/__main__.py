"""``python -m tiamat``: the same command as ``tiamat``."""

from tiamat.cli import run

if __name__ == "__main__":
    run()

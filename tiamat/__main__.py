"""``python -m tiamat``: the same command as ``tiamat``."""

from tiamat.cli import main

if __name__ == "__main__":
    main()

"""``python -m tiamat`` and the ``tiamat`` command."""

import gc


def main() -> None:
    gc.disable()  # before anything is imported: see tiamat.memory.collector_paused
    from tiamat import memory

    memory.pause_collector()
    from tiamat.cli import run

    run()


if __name__ == "__main__":
    main()

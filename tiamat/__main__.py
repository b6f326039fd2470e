"""``python -m tiamat`` and the ``tiamat`` command."""

import gc
import sys


def main() -> None:
    gc.disable()  # before anything is imported: see tiamat.memory.collector_paused
    from tiamat import argv, memory

    memory.pause_collector()
    args = sys.argv[1:]
    parsed = argv.parse(args)  # a plain command line, read without click (see there)
    if parsed is None:
        from tiamat.cli import run

        run()
        return
    from tiamat import launch

    try:
        launch.run(*parsed)
    except launch.UsageProblem as exc:
        from tiamat.cli import usage_error

        usage_error(str(exc), args)


if __name__ == "__main__":
    main()

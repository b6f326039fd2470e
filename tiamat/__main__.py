"""``python -m tiamat`` and the ``tiamat`` command."""

import gc
import sys


def main() -> None:
    # before anything is imported, the collector's start-up pause (see tiamat.memory)
    threshold = gc.get_threshold()[0]
    gc.set_threshold(0)
    from tiamat import argv, memory

    memory.pause_collector(threshold)
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

"""What ``tiamat [OPTIONS] APP`` does once its command line is read.

Both readers of the command line end here: :mod:`tiamat.argv` (a plain command line,
without importing click) and the click command in :mod:`tiamat.cli` (``--help``,
``--version``, the control subcommands, and every command line :mod:`tiamat.argv` leaves
to it, errors included).  So nothing here may import click: it costs about 87 M
instructions, some 15 ms, of every start (see docs/benchmarks.md, "Start and stop").
"""

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

from tiamat import apploader, logs
from tiamat.config import Config, ConfigError, load_config


class UsageProblem(Exception):
    """A command line that reads but makes no sense; shown as click shows a usage error."""


def start(cli: dict[str, Any], app_arg: str | None) -> NoReturn:
    """Read the configuration over the command-line settings ``cli`` (only what the user
    typed) and the APP argument, then serve, check or print it; never returns."""
    if app_arg:
        if "app" in cli and cli["app"] != app_arg:
            raise UsageProblem("give the app once: as APP or with -s/--script, not both")
        cli["app"] = app_arg
    try:
        cfg = load_config(cli)
    except ConfigError as exc:
        _say(f"tiamat: error: {exc}")
        sys.exit(ConfigError.exit_code)
    for warning in cfg.warnings:
        _say(f"tiamat: warning: {warning}")
    if cfg.print_config:
        sys.stdout.write(cfg.describe() + "\n")
        sys.stdout.flush()  # (a closed pipe shows here, as with click.echo: see run)
        sys.exit(0)
    if not cfg.app:
        raise UsageProblem("missing APP (module:attr, path/to/file.py, or -s SCRIPT)")
    # the app sees TIAMAT=1 wherever it is imported (workers, --preload, --check-config),
    # so ``if not os.environ.get("TIAMAT"): app.run()`` never binds a second server
    os.environ["TIAMAT"] = "1"
    started_in = os.getcwd()
    from tiamat import master

    master.START_CWD = started_in  # a USR2 re-exec starts where this command did
    if cfg.chdir:
        os.chdir(cfg.chdir)
    apploader.prepare_sys_path(None, cfg.pythonpath, also=started_in)
    if cfg.stdout_path and not cfg.daemon:
        _redirect_stdout(cfg.stdout_path)
    if cfg.umask is not None:
        os.umask(cfg.umask)
    logs.setup(cfg)
    if cfg.check_config:
        sys.exit(check(cfg))
    sys.exit(serve(cfg))


def run(cli: dict[str, Any], app_arg: str | None) -> NoReturn:
    """:func:`start` with the endings click's command gives it (tiamat.cli): Ctrl-C before
    the master handles signals prints "Aborted!" and exits 1, and so does a closed stdout
    (``--print-config | head``) instead of a traceback."""
    try:
        start(cli, app_arg)
    except (EOFError, KeyboardInterrupt):
        _say("\nAborted!")
        sys.exit(1)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # nothing left to flush into the closed pipe
        sys.exit(1)


def _say(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _redirect_stdout(path: str) -> None:
    """The original tiamat's stdout_path: the server's (and the app's) stdout goes to a file."""
    sys.stdout.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.close(fd)


def check(cfg: Config) -> int:
    """``--check-config``: load the app once and report, without binding anything."""
    from tiamat.workers import WorkerClassError, resolve

    try:
        app = apploader.load_app(cfg.app, cfg)
    except apploader.AppLoadError as exc:
        _say(f"tiamat: {exc}")
        if exc.details and cfg.loglevel == "debug":
            _say(exc.details)
        return exc.exit_code
    interface = cfg.interface
    if interface == "auto":
        interface = "asgi" if apploader.is_asgi(app) else "wsgi"
    try:
        resolve(cfg.worker_class, interface, cfg.threads)
    except WorkerClassError as exc:
        _say(f"tiamat: error: {exc}")
        return ConfigError.exit_code
    _say(f"tiamat: configuration and app {cfg.app!r} are OK")
    return 0


def serve(cfg: Config) -> int:
    from tiamat import master

    if cfg.daemon:
        from tiamat import daemon

        daemon.daemonize(cfg)
    code = master.start(cfg)
    _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """End the master without the interpreter's teardown (30-100 ms of freeing modules and
    objects on a stop, measured with strace: issue 6).  What an exit must still do is done
    first: atexit callbacks (logging.shutdown flushes and closes the log files; a preloaded
    app's own handlers) and the std streams.  With a non-daemon thread still running (a
    preloaded app's), the normal exit is kept: it waits for that thread."""
    import atexit
    import threading

    if any(not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        return
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)

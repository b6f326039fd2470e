"""The ``tiamat`` command, generated from the settings table.

Every option comes from :data:`tiamat.settings.SETTINGS`; this module only adds the APP
argument, ``--version``, and what happens once the configuration is read.  Only options
the user actually typed are passed on, so the precedence CLI > environment > config file >
defaults is decided in one place (:func:`tiamat.config.load_config`).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from tiamat import __version__, apploader, logs
from tiamat.config import Config, ConfigError, load_config
from tiamat.settings import SETTINGS, Setting


def _option(setting: Setting) -> click.Option | None:
    name = setting.name
    metavar = setting.metavar or setting.kind.upper()
    if setting.kind == "bool":
        if setting.flags and setting.off_flags:
            decls = [f"{setting.flags[-1]}/{setting.off_flags[0]}", name]
            return click.Option(decls, default=None, help=setting.help)
        if setting.flags:
            return click.Option([*setting.flags, name], is_flag=True, flag_value=True,
                                default=None, help=setting.help)
        if setting.off_flags:
            return click.Option([*setting.off_flags, name], is_flag=True, flag_value=False,
                                default=None, help=setting.help)
        return None
    if not setting.flags:
        return None
    if setting.kind == "choice":
        metavar = "[" + "|".join(setting.choices) + "]"
    return click.Option([*setting.flags, name], type=str, default=None,
                        multiple=setting.kind == "list", metavar=metavar, help=setting.help)


def _given(ctx: click.Context, params: dict[str, Any]) -> dict[str, Any]:
    """The options typed on the command line (not click's defaults)."""
    given = {}
    for key, value in params.items():
        source = ctx.get_parameter_source(key)
        if source is click.core.ParameterSource.COMMANDLINE and value not in (None, ()):
            given[key] = list(value) if isinstance(value, tuple) else value
    return given


def _run(ctx: click.Context, app_arg: str | None, **params: Any) -> None:
    cli = _given(ctx, params)
    if app_arg:
        if "app" in cli and cli["app"] != app_arg:
            raise click.UsageError("give the app once: as APP or with -s/--script, not both")
        cli["app"] = app_arg
    try:
        cfg = load_config(cli)
    except ConfigError as exc:
        click.echo(f"tiamat: error: {exc}", err=True)
        sys.exit(ConfigError.exit_code)
    for warning in cfg.warnings:
        click.echo(f"tiamat: warning: {warning}", err=True)
    if cfg.print_config:
        click.echo(cfg.describe())
        sys.exit(0)
    if not cfg.app:
        raise click.UsageError("missing APP (module:attr, path/to/file.py, or -s SCRIPT)")
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
        click.echo(f"tiamat: {exc}", err=True)
        if exc.details and cfg.loglevel == "debug":
            click.echo(exc.details, err=True)
        return exc.exit_code
    interface = cfg.interface
    if interface == "auto":
        interface = "asgi" if apploader.is_asgi(app) else "wsgi"
    try:
        resolve(cfg.worker_class, interface, cfg.threads)
    except WorkerClassError as exc:
        click.echo(f"tiamat: error: {exc}", err=True)
        return ConfigError.exit_code
    click.echo(f"tiamat: configuration and app {cfg.app!r} are OK", err=True)
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


def build_command() -> click.Command:
    params: list[click.Parameter] = [click.Argument(["app_arg"], required=False, metavar="APP")]
    params += [opt for opt in map(_option, SETTINGS) if opt is not None]
    command = click.Command(
        "tiamat", callback=click.pass_context(_run), params=params,
        help="A pre-fork application server for WSGI and ASGI apps.\n\n"
             "APP is module:attr, module:factory(), path/to/file.py[:attr], or a script "
             "whose run(config) returns the app.",
        context_settings={"max_content_width": 100, "help_option_names": ["-h", "--help"]})
    return click.version_option(__version__, "--version", prog_name="tiamat",
                                message="%(prog)s %(version)s")(command)


#: :data:`tiamat.control.SUBCOMMANDS`, repeated so that starting a server does not import
#: tiamat.control (tests/test_docs.py checks that both agree)
SUBCOMMANDS = ("status", "reload", "stop", "scale", "reopen-logs")


def with_subcommands(command: click.Command) -> click.Command:
    """``tiamat status|reload|stop|scale|reopen-logs ...`` talk to a running master through
    its control socket (:mod:`tiamat.control`); every other command line is ``tiamat
    [OPTIONS] APP`` exactly as before.  (An app module really named ``status`` is still
    reachable as ``tiamat status:app`` or ``tiamat -s status``.)"""
    serve_main = command.main

    def main(args: Any = None, prog_name: str | None = None, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        if argv and argv[0] in SUBCOMMANDS:
            from tiamat import control  # only here: a server start does not pay for it

            return control.control_cli.main(args=argv, prog_name=prog_name or "tiamat", **extra)
        return serve_main(args=argv, prog_name=prog_name, **extra)

    command.main = main  # type: ignore[method-assign]
    command.help = (command.help or "") + (
        "\n\nA running server (started with --control-socket or --pid) is driven with: "
        "tiamat status [--json], tiamat reload, tiamat stop, tiamat scale N, "
        "tiamat reopen-logs (each takes --control-socket PATH, --pid FILE or -c CONFIG).")
    return command


main = with_subcommands(build_command())


def run() -> None:
    """Entry point of ``python -m tiamat``: the same command, shown as ``tiamat``."""
    main(prog_name="tiamat")

"""The ``tiamat`` command, generated from the settings table.

Every option comes from :data:`tiamat.settings.SETTINGS`; this module only adds the APP
argument, ``--version``, ``--help`` and the control subcommands.  Only options the user
actually typed are passed on, so the precedence CLI > environment > config file > defaults
is decided in one place (:func:`tiamat.config.load_config`); what follows is
:func:`tiamat.launch.start`.  A plain command line does not get here at all:
:mod:`tiamat.argv` reads it without importing click (see there).
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import click

from tiamat import __version__, launch
from tiamat.argv import SUBCOMMANDS, switches
from tiamat.settings import SETTINGS, Setting


def _option(setting: Setting) -> click.Option | None:
    name = setting.name
    metavar = setting.metavar or setting.kind.upper()
    if setting.kind == "bool":
        on, off = switches(setting)
        if on and off:
            return click.Option([f"{on[0]}/{off[0]}", name], default=None, help=setting.help)
        if on or off:
            return click.Option([*(on or off), name], is_flag=True, flag_value=bool(on),
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
    try:
        launch.start(_given(ctx, params), app_arg)
    except launch.UsageProblem as exc:
        raise click.UsageError(str(exc), ctx) from None


def usage_error(message: str, args: list[str]) -> NoReturn:
    """Show a usage error found after :mod:`tiamat.argv` read the line, exactly as this
    command shows its own (exit 2)."""
    ctx = main.make_context("tiamat", list(args), resilient_parsing=True)
    click.UsageError(message, ctx).show()
    sys.exit(2)


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

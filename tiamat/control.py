"""The control socket: ``tiamat status``, ``reload``, ``stop``, ``scale N``, ``reopen-logs``.

Server side (in the master): a unix socket opened only when asked — ``--control-socket
PATH``, or ``PIDFILE.sock`` next to ``--pid`` — created with mode 0600, so only the user the
server runs as (and root) can drive it.  Each connection carries one JSON request line and
gets one JSON answer; the master serves it with non-blocking sockets from its own loop
(:class:`SocketService`, also used for the metrics endpoint), so a slow or stuck client
never holds the master up.  Commands become the very actions the master runs for signals
(HUP, TERM, TTIN/TTOU, USR1): one code path, whichever way an operator asks.

Client side: :func:`cli_main` implements the subcommands; ``tiamat.cli`` hands it argv when
the first argument is one of :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable
from typing import Any

import click

log = logging.getLogger("tiamat.error")

SUBCOMMANDS = ("status", "reload", "stop", "scale", "reopen-logs")
MAX_REQUEST = 64 * 1024
CLIENT_DEADLINE = 5.0
ACCEPT_BATCH = 16
#: clients served at once; more wait in the listen backlog (the master's work stays bounded)
MAX_CLIENTS = 64


def socket_path(cfg: Any) -> str | None:
    """Where the control socket is: ``control_socket``, else ``<pidfile>.sock``, else None."""
    if cfg.control_socket:
        return str(cfg.control_socket)
    if cfg.pidfile:
        return str(cfg.pidfile) + ".sock"
    return None


# --- a tiny non-blocking request/response server for the master's loop ----------------------
class _Conn:
    __slots__ = ("deadline", "inbuf", "outbuf", "sock")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.inbuf = b""
        self.outbuf: memoryview | None = None


class SocketService:
    """Accepts connections, reads one request, writes one response, closes.

    Everything is non-blocking and driven by :meth:`step`, which the master calls once per
    loop pass; the sockets are registered in the master's selector only so that its sleep
    wakes up when they are ready.
    """

    def __init__(self, sock: socket.socket, selector: selectors.BaseSelector,
                 complete: Callable[[bytes], bool], respond: Callable[[bytes], bytes]) -> None:
        self.sock = sock
        self.selector = selector
        self.complete = complete
        self.respond = respond
        self.conns: list[_Conn] = []
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, self)
        self.listening = True

    def step(self, now: float) -> None:
        for _ in range(min(ACCEPT_BATCH, MAX_CLIENTS - len(self.conns))):
            try:
                client, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.debug("control/metrics accept failed: %s", exc)
                break
            client.setblocking(False)
            conn = _Conn(client, now + CLIENT_DEADLINE)
            self.conns.append(conn)
            self.selector.register(client, selectors.EVENT_READ, self)
        for conn in list(self.conns):
            if not self._serve(conn) or now > conn.deadline:
                self._close(conn)
        # while full, stop watching the listener, or a waiting client would wake the loop
        # over and over (the selector is level-triggered)
        self._watch_listener(len(self.conns) < MAX_CLIENTS)

    def _watch_listener(self, on: bool) -> None:
        if on == self.listening:
            return
        if on:
            self.selector.register(self.sock, selectors.EVENT_READ, self)
        else:
            self.selector.unregister(self.sock)
        self.listening = on

    def _serve(self, conn: _Conn) -> bool:
        """Make what progress is possible now; False once the connection is finished."""
        if conn.outbuf is None:
            try:
                data = conn.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return False
            conn.inbuf += data
            if not data or len(conn.inbuf) > MAX_REQUEST or self.complete(conn.inbuf):
                if not conn.inbuf:
                    return False
                try:
                    answer = self.respond(conn.inbuf)
                except Exception:
                    log.exception("control/metrics request failed")
                    return False
                conn.outbuf = memoryview(answer)
                self.selector.modify(conn.sock, selectors.EVENT_WRITE, self)
            else:
                return True
        try:
            sent = conn.sock.send(conn.outbuf)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        conn.outbuf = conn.outbuf[sent:]
        return len(conn.outbuf) > 0

    def _close(self, conn: _Conn) -> None:
        self.conns.remove(conn)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn.sock)
        conn.sock.close()

    def close(self) -> None:
        for conn in list(self.conns):
            self._close(conn)
        if self.listening:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(self.sock)
        self.sock.close()


# --- server side ---------------------------------------------------------------------------
def _owner(path: str) -> int | None:
    """The pid of the master answering on ``path``, 0 if something else answers, None if
    nothing does (a stale file)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return None
        except OSError:
            return 0
    try:
        return int(request(path, {"command": "status"}, timeout=3.0)["master"]["pid"])
    except (ControlError, KeyError, TypeError, ValueError):
        return 0


def bind_unix(path: str) -> socket.socket:
    """Bind the control socket with mode 0600.

    A stale socket file is replaced.  A live one is only taken over from this process's
    parent — the old master after USR2, which then leaves the path alone on exit; any other
    live owner means a second server was pointed at the same path, which is an error.
    """
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            owner = _owner(path)
            if owner is not None and owner != os.getppid():
                raise OSError(f"control socket {path} is in use by another server"
                              + (f" (pid {owner})" if owner else ""))
            os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    sock.listen(16)
    return sock


class ControlServer:
    """The master's control socket and the commands it understands."""

    def __init__(self, state: Any, path: str, ops_metrics: Any) -> None:
        self.state = state
        self.path = os.path.abspath(path)
        self.metrics = ops_metrics
        sock = bind_unix(self.path)
        self.inode = os.stat(self.path).st_ino
        self.service = SocketService(sock, state.selector, lambda b: b"\n" in b, self.respond)

    def step(self, now: float) -> None:
        self.service.step(now)

    def close(self) -> None:
        self.service.close()
        try:  # only remove the path if it is still ours (a USR2 child may have taken it)
            if os.stat(self.path).st_ino == self.inode:
                os.unlink(self.path)
        except OSError:
            pass

    def respond(self, request: bytes) -> bytes:
        try:
            message = json.loads(request.split(b"\n", 1)[0])
            command = message["command"]
        except (ValueError, KeyError, TypeError):
            return _answer({"ok": False, "error": "bad request: expected a JSON line"})
        try:
            result = self.run(command, message)
        except ValueError as exc:
            return _answer({"ok": False, "error": str(exc)})
        return _answer({"ok": True, **result})

    def run(self, command: str, message: dict[str, Any]) -> dict[str, Any]:
        from tiamat import master

        state = self.state
        actions = master.SIGNAL_ACTIONS
        if command == "status":
            return status(state, self.metrics)
        if state.stopping and command != "stop":
            raise ValueError("the server is shutting down")
        if command == "stop":
            log.info("Control socket: stop")
            actions[signal.SIGTERM](state)
            return {}
        if command == "reopen-logs":
            log.info("Control socket: reopen logs")
            actions[signal.SIGUSR1](state)
            return {}
        if command == "reload":
            log.info("Control socket: reload")
            reload_workers(state)
            return {}
        if command == "scale":
            wanted = message.get("workers")
            if not isinstance(wanted, int) or not 1 <= wanted <= 4096:
                raise ValueError("scale needs a worker count between 1 and 4096")
            if wanted != state.target:  # what TTIN/TTOU do, in one step
                master.set_target(state, wanted, "Control socket: scale")
            return {"workers": state.target}
        raise ValueError(f"unknown command {command!r}")


def reload_workers(state: Any) -> None:
    """What HUP does (the control socket's ``reload`` and --reload's file changes)."""
    from tiamat import master

    master.on_hup(state)


def _answer(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def status(state: Any, ops_metrics: Any) -> dict[str, Any]:
    """The master and every worker, as ``tiamat status --json`` prints it."""
    from tiamat import __version__
    from tiamat.memory import rss as rss_bytes
    from tiamat.scoreboard import BUSY

    now = time.monotonic()
    restarts = getattr(ops_metrics, "restarts_by_slot", {})
    workers = []
    for worker in sorted(state.workers.values(), key=lambda w: (w.slot, w.started)):
        record = state.board.read(worker.board_index)
        name = record.state_name
        if worker.stop_deadline is not None and name in ("idle", "booting"):
            name = "stopping"
        if name == "empty":
            name = "booting"
        if worker.slot < 0:
            name = "mold"  # --refork-after: forks the workers, serves nobody
        busy = record.state == BUSY and record.pid == worker.pid
        workers.append({
            "slot": worker.slot, "pid": worker.pid, "state": name,
            "request": record.label if busy else None,
            "request_age": round(now - record.request_start, 3) if busy else None,
            "requests": record.requests if record.pid == worker.pid else 0,
            # (both kept only by workers that balance: -w > 1; the load with
            # --rebalance-keepalive, from the worker's second loop tick on)
            "connections": record.connections if record.pid == worker.pid else 0,
            "cpu": round(record.load, 3) if record.pid == worker.pid and record.load >= 0 else None,
            "rss": rss_bytes(worker.pid), "uptime": round(now - worker.started, 3),
            "restarts": restarts.get(worker.slot, 0), "generation": worker.generation,
        })
    started = getattr(ops_metrics, "started", time.time())
    return {
        "master": {
            "pid": state.pid, "version": __version__, "uptime": round(time.time() - started, 3),
            "target": state.target, "workers": len(state.workers),
            "generation": state.generation, "stopping": state.stopping,
            "rss": rss_bytes(state.pid), "app": state.cfg.app,
            "restarts": dict(getattr(ops_metrics, "restarts", {})),
        },
        "workers": workers,
    }


# --- client side ---------------------------------------------------------------------------
class ControlError(Exception):
    """The control socket could not be reached or refused the command (exit code 1)."""


def request(path: str, message: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one command and return the master's answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            sock.sendall(json.dumps(message).encode() + b"\n")
            chunks = []
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
        except FileNotFoundError:
            raise ControlError(f"no control socket at {path} (is tiamat running with "
                               "--control-socket or --pid?)") from None
        except ConnectionRefusedError:
            raise ControlError(f"nothing listens on {path} (stale socket?)") from None
        except OSError as exc:
            raise ControlError(f"{path}: {exc.strerror or exc}") from None
    try:
        answer = json.loads(b"".join(chunks))
    except ValueError:
        raise ControlError("the master sent no answer") from None
    if not answer.get("ok"):
        raise ControlError(str(answer.get("error", "command failed")))
    return answer  # type: ignore[no-any-return]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    return f"{hours // 24}d{hours % 24:02d}h"


def _size(value: int | None) -> str:
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "K", "M", "G"):
        if size < 1024 or unit == "G":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return str(value)  # pragma: no cover


def format_status(info: dict[str, Any]) -> str:
    """The human table of ``tiamat status``."""
    m = info["master"]
    lines = [f"master  pid {m['pid']}  tiamat {m['version']}  up {_duration(m['uptime'])}  "
             f"workers {m['workers']}/{m['target']}  rss {_size(m['rss'])}  "
             f"app {m['app'] or '-'}" + ("  STOPPING" if m["stopping"] else "")]
    header = ("SLOT", "PID", "STATE", "REQUESTS", "CONNS", "CPU", "RSS", "UPTIME", "RESTARTS",
              "CURRENT REQUEST")
    rows = [header]
    for w in info["workers"]:
        current = "-"
        if w["request"]:
            current = f"{w['request']} ({_duration(w['request_age'])})"
        cpu = "-" if w["cpu"] is None else f"{100 * w['cpu']:.0f}%"
        rows.append((str(w["slot"]), str(w["pid"]), w["state"], str(w["requests"]),
                     str(w["connections"]), cpu, _size(w["rss"]), _duration(w["uptime"]),
                     str(w["restarts"]), current))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    for r in rows:
        lines.append("  ".join(c.ljust(widths[i]) for i, c in enumerate(r[:-1])) + "  " + r[-1])
    return "\n".join(lines)


def _resolve(control_socket: str | None, pidfile: str | None, config: str | None) -> str:
    from tiamat.config import ConfigError, load_config

    given: dict[str, Any] = {}
    if control_socket:
        given["control_socket"] = control_socket
    if pidfile:
        given["pidfile"] = pidfile
    if config:
        given["config"] = config
    try:
        cfg = load_config(given)
    except ConfigError as exc:
        raise ControlError(str(exc)) from None
    path = socket_path(cfg)
    if path is None:
        raise ControlError("no control socket given: pass --control-socket PATH or --pid FILE "
                           "(or set them in -c CONFIG / TIAMAT_CONTROL_SOCKET)")
    return path


def _where(f: Callable[..., Any]) -> Callable[..., Any]:
    for option in (
        click.option("-c", "--config", metavar="FILE", help="Read the socket path from this config."),
        click.option("--pid", "pidfile", metavar="FILE", help="The server's pidfile; the socket "
                     "is FILE.sock."),
        click.option("--control-socket", metavar="PATH", help="The server's control socket."),
    ):
        f = option(f)
    return f


def _call(ctx_args: tuple[str | None, str | None, str | None], message: dict[str, Any]) -> dict[str, Any]:
    try:
        return request(_resolve(*ctx_args), message)
    except ControlError as exc:
        click.echo(f"tiamat: {exc}", err=True)
        sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def control_cli() -> None:
    """Talk to a running tiamat master through its control socket."""


@control_cli.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
@_where
def status_command(as_json: bool, control_socket: str | None, pidfile: str | None,
                   config: str | None) -> None:
    """Show the master and every worker: state, current request, requests, RSS, uptime."""
    answer = _call((control_socket, pidfile, config), {"command": "status"})
    answer.pop("ok", None)
    click.echo(json.dumps(answer, indent=2) if as_json else format_status(answer))


def _simple(name: str, help: str) -> None:
    @_where
    def command(control_socket: str | None, pidfile: str | None, config: str | None) -> None:
        _call((control_socket, pidfile, config), {"command": name})
        click.echo(f"tiamat: {name}: done")

    command.__doc__ = help
    control_cli.command(name)(command)


_simple("reload", "Reload the configuration and replace the workers gracefully (as HUP).")
_simple("stop", "Stop gracefully: finish in-flight requests, then exit (as TERM).")
_simple("reopen-logs", "Reopen every log file, after logrotate moved them (as USR1).")


@control_cli.command("scale")
@click.argument("workers", type=click.IntRange(1, 4096))
@_where
def scale_command(workers: int, control_socket: str | None, pidfile: str | None,
                  config: str | None) -> None:
    """Set the number of workers (as repeated TTIN / TTOU)."""
    answer = _call((control_socket, pidfile, config), {"command": "scale", "workers": workers})
    click.echo(f"tiamat: scale: workers {answer.get('workers')}")


def cli_main(argv: list[str]) -> None:
    """Run one subcommand (``argv[0]`` is its name); exits."""
    control_cli.main(args=argv, prog_name="tiamat")

"""The master's operability hooks in one place: metrics, the control socket, --reload.

``tiamat.master`` calls five functions from here at fixed points of its life cycle —
:func:`start` before the loop, :func:`step` once per loop pass, :func:`before_fork` in
``spawn``, :func:`worker_exited` in ``reap`` and :func:`close` in ``finish`` — so the loop
stays readable and every detail lives in :mod:`tiamat.metrics`, :mod:`tiamat.control` and
:mod:`tiamat.reloader`.  All of it is non-blocking: the master never waits on a client.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import sys
import time
from typing import TYPE_CHECKING, Any

from tiamat import metrics, sockets

if TYPE_CHECKING:
    from tiamat import control, reloader

# control and reloader are imported only when their setting is on: every master start would
# otherwise pay for them before its first fork (issue 6, start-up time)

log = logging.getLogger("tiamat.error")


class Ops:
    """The master's optional services (a plain class: see tiamat.settings.Setting)."""

    exporter: control.SocketService | None = None
    control: control.ControlServer | None = None
    statsd: metrics.StatsD | None = None
    reloader: reloader.Reloader | None = None
    next_push: float = 0.0

    def __init__(self, metrics: metrics.MasterMetrics) -> None:
        self.metrics = metrics


_current: Ops | None = None


def start(state: Any) -> bool:
    """Create the metrics table and open what the settings ask for.  On failure the error
    is recorded as the master's fatal error (exit 1) and False is returned."""
    cfg = state.cfg
    global _current
    ops = state.ops = _current = Ops(metrics=metrics.setup(cfg, state.board.capacity))
    reload_error: type[Exception] = OSError
    try:
        if cfg.metrics_bind:
            ops.exporter = _open_exporter(state, cfg.metrics_bind, ops.metrics)
            log.info("Metrics at: http://%s/metrics", sockets.describe(ops.exporter.sock)
                     .removeprefix("http://"))
        path = cfg.control_socket or cfg.pidfile  # control.socket_path() is None without both
        if path:
            from tiamat import control

            path = control.socket_path(cfg)
            ops.control = control.ControlServer(state, path, ops.metrics)
            log.info("Control socket at: %s", ops.control.path)
        if cfg.statsd_host:
            ops.statsd = metrics.StatsD(cfg.statsd_host, cfg.statsd_prefix)
            ops.next_push = time.monotonic() + cfg.statsd_interval
        if cfg.reload:
            from tiamat import reloader

            reload_error = reloader.ReloadError
            ops.reloader = reloader.Reloader(cfg)
            state.selector.register(ops.reloader.read_fd, selectors.EVENT_READ, ops)
            ops.reloader.start()
    except (OSError, ValueError, reload_error) as exc:  # socket.gaierror is an OSError
        text = getattr(exc, "strerror", None) or str(exc)
        state.fatal = f"cannot start: {text}"
        state.exit_code = 1
        close(state)
        return False
    return True


def _close_in_child() -> None:
    """After any fork from the master: the child must not keep the master's listening
    sockets (a lingering worker would hold the metrics port or the control socket).  Only
    the descriptors are closed — the selector is shared with the parent through fork, so
    it must not be touched here."""
    global _current
    ops, _current = _current, None  # once: later forks (in a worker) must not close reused fds
    if ops is None:
        return
    socks: list[socket.socket] = []
    for service in (ops.exporter, ops.control.service if ops.control else None):
        if service is not None:
            socks.append(service.sock)
            socks.extend(conn.sock for conn in service.conns)
    for sock in socks:
        try:
            sock.close()
        except OSError:
            pass
    if ops.reloader is not None:
        for fd in (ops.reloader.read_fd, ops.reloader.write_fd):
            try:
                os.close(fd)
            except OSError:
                pass
    if ops.statsd is not None:
        ops.statsd.sock.close()


os.register_at_fork(after_in_child=_close_in_child)


def _open_exporter(state: Any, bind: str, master_metrics: metrics.MasterMetrics
                   ) -> control.SocketService:
    from tiamat import control

    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--metrics-bind {bind!r}: expected HOST:PORT (or :PORT for every "
                         "interface)")
    host = host.strip("[]") or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # after USR2 the new master binds the same port while the old one still runs
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, int(port)))
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"--metrics-bind {bind}: {exc.strerror}") from None

    def respond(request: bytes) -> bytes:
        return metrics.http_response(request, metrics.render_prometheus(
            master_metrics.snapshot(state)))

    return control.SocketService(sock, state.selector, lambda b: b"\r\n\r\n" in b
                                 or b"\n\n" in b, respond)


def step(state: Any) -> None:
    """Serve scrapes and control requests, push StatsD, act on file changes."""
    ops: Ops | None = state.ops
    if ops is None:
        return
    now = time.monotonic()
    if ops.exporter is not None:
        ops.exporter.step(now)
    if ops.control is not None:
        ops.control.step(now)
    if ops.statsd is not None and now >= ops.next_push:
        ops.next_push = now + state.cfg.statsd_interval
        ops.statsd.push(ops.metrics.snapshot(state))
    if ops.reloader is not None:
        changed = ops.reloader.take_changes()
        if changed and not state.stopping:
            from tiamat import control, reloader

            log.info("Reloading: %s changed", reloader.describe(changed))
            control.reload_workers(state)


def before_fork(state: Any, worker: Any) -> None:
    ops: Ops | None = state.ops
    if ops is not None:
        ops.metrics.before_fork(worker)


def worker_exited(state: Any, worker: Any, code: int) -> None:
    ops: Ops | None = state.ops
    if ops is not None:
        ops.metrics.worker_exited(state, worker, code)


def close(state: Any) -> None:
    ops: Ops | None = state.ops
    if ops is None:
        return
    for part in (ops.exporter, ops.control, ops.statsd, ops.reloader):
        if part is None:
            continue
        if part is ops.reloader:
            try:
                state.selector.unregister(ops.reloader.read_fd)
            except (KeyError, ValueError):
                pass
        try:
            part.close()
        except Exception as exc:  # closing must never stop the master from finishing
            print(f"tiamat: closing {type(part).__name__}: {exc}", file=sys.stderr)
    ops.exporter = ops.control = ops.statsd = ops.reloader = None
    global _current
    _current = None

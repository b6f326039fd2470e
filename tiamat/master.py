"""The master process: binds once, forks workers, watches them, and obeys signals.

The whole loop is :func:`run_loop`; one pass reaps exited children, handles queued
signals, reads worker channels, acts on liveness deadlines, tops the worker count up (or
down) and sleeps on the signal pipe and the channels.  Signal handlers only append to
``state.signals``; ``signal.set_wakeup_fd`` wakes the sleep.  All mutable master state is
in one :class:`MasterState` passed to small functions, so each step can be read alone.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import random
import selectors
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from tiamat import apploader, hooks, logs, ops, pidfile, sockets
from tiamat.channel import Channel
from tiamat.scoreboard import BOOTING, BUSY, Scoreboard
from tiamat.workers import WorkerClassError, resolve
from tiamat.workers.base import (
    EXIT_APP_LOAD_ERROR,
    EXIT_BOOT_ERROR,
    Worker,
    set_title,
    worker_main,
)

log = logging.getLogger("tiamat.error")

HANDLED_SIGNALS = (signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM, signal.SIGINT, signal.SIGTTIN,
                   signal.SIGTTOU, signal.SIGWINCH, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD)
STOP_SIGNALS = {signal.SIGTERM, signal.SIGQUIT, signal.SIGINT}
BOOT_ERRORS = (EXIT_BOOT_ERROR, EXIT_APP_LOAD_ERROR)
MAX_BACKOFF = 30.0
TICK = 1.0


@dataclass
class WorkerProc:
    """What the master knows about one live worker process."""

    slot: int
    pid: int
    channel: Channel
    started: float
    generation: int = 0
    booted: bool = False
    #: set once the worker was told to stop (graceful), with the time it must be gone by
    stop_deadline: float | None = None
    boot_error: str | None = None
    #: the traceback behind boot_error, logged at debug level only
    boot_details: str = ""
    #: why the master ended it, for the log and metrics (timeout, reload, max-requests ...)
    reason: str | None = None


@dataclass
class MasterState:
    """Everything the master loop reads and changes."""

    cfg: Any
    listeners: list[Any]
    board: Scoreboard
    worker_class: type[Worker] | None
    app: Any = None
    pid: int = field(default_factory=os.getpid)
    target: int = 1
    workers: dict[int, WorkerProc] = field(default_factory=dict)
    signals: deque[int] = field(default_factory=deque)
    wake_r: int = -1
    wake_w: int = -1
    selector: selectors.BaseSelector = field(default_factory=selectors.DefaultSelector)
    #: None while serving; "graceful" or "quick" once stopping
    stopping: str | None = None
    stop_deadline: float = 0.0
    ever_booted: bool = False
    ready_announced: bool = False
    #: per-slot earliest time a replacement may be forked (back-off after boot failures)
    not_before: dict[int, float] = field(default_factory=dict)
    backoff: float = 0.0
    generation: int = 0
    exit_code: int = 0
    fatal: str | None = None
    #: unix socket paths this master bound, removed on exit
    unix_paths: list[str] = field(default_factory=list)


# --- start-up ----------------------------------------------------------------------------
def start(cfg: Any) -> int:
    """Bind, fork the first workers and run the loop; returns the process exit code."""
    state = MasterState(cfg=cfg, listeners=[], board=Scoreboard(max(1024, cfg.workers * 2)),
                        worker_class=None, target=cfg.workers)
    hooks.call(cfg, "on_starting", state)
    if cfg.preload_app:
        try:
            state.app = apploader.load_app(cfg.app, cfg)
        except apploader.AppLoadError as exc:
            log.debug("%s", exc.details.rstrip())
            print(f"tiamat: {exc}", file=sys.stderr)
            return EXIT_APP_LOAD_ERROR
    try:
        state.worker_class = pick_worker_class(cfg, state.app)
    except WorkerClassError as exc:
        print(f"tiamat: {exc}", file=sys.stderr)
        return 2
    try:
        state.listeners = sockets.create_listeners(
            cfg.bind_addresses(), cfg.backlog, cfg.reuse_port,
            explicit=cfg.sources.get("bind", "default") != "default"
            or cfg.sources.get("port", "default") != "default")
    except OSError as exc:
        print(f"tiamat: {exc.strerror or exc}", file=sys.stderr)
        return 1
    state.unix_paths = [s.getsockname() for s in state.listeners
                        if s.family == sockets.socket.AF_UNIX]
    if state.app is not None and cfg.gc_freeze:
        gc.collect()
        gc.freeze()  # keep the preloaded app's objects out of the collector: pages stay shared
    if cfg.pidfile:
        try:
            pidfile.write(cfg.pidfile, state.pid)
        except (pidfile.PidfileError, OSError) as exc:
            print(f"tiamat: {exc}", file=sys.stderr)
            for sock in state.listeners:
                sock.close()
            return 1
    set_title("master", cfg)
    install_signals(state)
    log.info("Starting tiamat %s", _version())
    for sock in state.listeners:
        log.info("Listening at: %s (%s)", sockets.describe(sock), state.pid)
    if state.worker_class is not None:
        log.info("Using worker: %s", _class_name(state.worker_class))
    try:
        if ops.start(state):  # metrics, control socket, --reload (tiamat.ops)
            run_loop(state)
    finally:
        finish(state)
    if state.fatal:
        print(f"tiamat: {state.fatal}", file=sys.stderr)
    return state.exit_code


def pick_worker_class(cfg: Any, app: Any) -> type[Worker] | None:
    """The worker class, or None when ``auto`` must wait for the app to be loaded in a worker."""
    if cfg.worker_class == "auto" and app is None and cfg.interface == "auto":
        return None
    interface = cfg.interface
    if interface == "auto":
        interface = "asgi" if app is not None and apploader.is_asgi(app) else "wsgi"
    return resolve(cfg.worker_class, interface, cfg.threads)


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _version() -> str:
    from tiamat import __version__

    return __version__


def install_signals(state: MasterState) -> None:
    """Handlers only queue the signal; the wake-up fd makes the loop's sleep return."""
    state.wake_r, state.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(state.wake_w, warn_on_full_buffer=False)

    def queue(signum: int, frame: Any) -> None:
        if signum != signal.SIGCHLD:
            state.signals.append(signum)

    for sig in HANDLED_SIGNALS:
        signal.signal(sig, queue)
    state.selector.register(state.wake_r, selectors.EVENT_READ, None)


# --- the loop ----------------------------------------------------------------------------
def run_loop(state: MasterState) -> None:
    while True:
        reap(state)
        handle_signals(state)
        read_channels(state)
        check_liveness(state)
        ops.step(state)
        if state.stopping:
            if not state.workers:
                return
            enforce_stop_deadline(state)
        else:
            maintain_workers(state)
        sleep(state)


def sleep(state: MasterState) -> None:
    timeout = TICK
    if state.not_before:
        timeout = max(0.0, min(timeout, min(state.not_before.values()) - time.monotonic()))
    for key, _ in state.selector.select(timeout):
        if key.data is None:
            try:
                while os.read(state.wake_r, 4096):
                    pass
            except (BlockingIOError, InterruptedError):
                pass


# --- reaping -----------------------------------------------------------------------------
def reap(state: MasterState) -> None:
    """Collect every exited child (no zombies) and decide what its exit means."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        except InterruptedError:
            continue
        if pid == 0:
            return
        worker = state.workers.pop(pid, None)
        if worker is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        # a message sent just before exiting (boot_error) must be read before the channel closes
        for message in worker.channel.receive() or ():
            handle_message(state, worker, message)
        _forget(state, worker)
        hooks.call(state.cfg, "child_exit", state, worker)
        ops.worker_exited(state, worker, code)
        if worker.boot_error is None and code in BOOT_ERRORS and not worker.booted:
            worker.boot_error = f"worker {worker.slot} exited with code {code} while booting"
        if worker.boot_error is not None and not worker.booted:
            boot_failed(state, worker, code)
        elif code != 0 and worker.stop_deadline is None and not state.stopping:
            how = f"signal {-code}" if code < 0 else f"code {code}"
            log.warning("Worker %s (pid %s) exited with %s%s", worker.slot, pid, how,
                        f" ({worker.reason})" if worker.reason else "")
        else:
            log.info("Worker %s (pid %s) exited", worker.slot, pid)


def _forget(state: MasterState, worker: WorkerProc) -> None:
    try:
        state.selector.unregister(worker.channel.sock)
    except (KeyError, ValueError):
        pass
    worker.channel.close()
    state.board.clear(worker.slot)


def boot_failed(state: MasterState, worker: WorkerProc, code: int) -> None:
    """A worker could not boot.  Before any worker ever booted this ends the server (the
    app is broken, respawning cannot help); afterwards old workers keep serving and the
    slot is retried with exponential back-off."""
    if not state.ever_booted and not state.stopping:
        state.fatal = worker.boot_error
        state.exit_code = code if code in BOOT_ERRORS else EXIT_BOOT_ERROR
        if worker.boot_details:
            log.debug("%s", worker.boot_details)
        begin_stop(state, graceful=False)
        return
    if state.fatal is not None:
        return  # the other workers failed the same way: the one line is printed at exit
    state.backoff = min(MAX_BACKOFF, max(1.0, state.backoff * 2))
    state.not_before[worker.slot] = time.monotonic() + state.backoff
    log.error("%s; retrying in %.0fs", worker.boot_error, state.backoff)


# --- signals -----------------------------------------------------------------------------
def handle_signals(state: MasterState) -> None:
    while state.signals:
        signum = state.signals.popleft()
        action = SIGNAL_ACTIONS.get(signum)
        if action is not None:
            action(state)


def on_term(state: MasterState) -> None:
    begin_stop(state, graceful=True)


def on_int(state: MasterState) -> None:
    begin_stop(state, graceful=False)


def on_ttin(state: MasterState) -> None:
    if state.stopping:
        return
    old = state.target
    state.target += 1
    log.info("TTIN: workers %s -> %s", old, state.target)
    hooks.call(state.cfg, "nworkers_changed", state, state.target, old)


def on_ttou(state: MasterState) -> None:
    if state.stopping or state.target <= 1:
        return
    old = state.target
    state.target -= 1
    log.info("TTOU: workers %s -> %s", old, state.target)
    hooks.call(state.cfg, "nworkers_changed", state, state.target, old)


def on_usr1(state: MasterState) -> None:
    logs.reopen()
    for worker in state.workers.values():
        worker.channel.send("reopen_logs")


def on_unsupported(state: MasterState) -> None:
    log.warning("signal not supported yet; ignored")


SIGNAL_ACTIONS = {
    signal.SIGTERM: on_term,
    signal.SIGQUIT: on_term,
    signal.SIGINT: on_int,
    signal.SIGTTIN: on_ttin,
    signal.SIGTTOU: on_ttou,
    signal.SIGUSR1: on_usr1,
    signal.SIGHUP: on_unsupported,
    signal.SIGUSR2: on_unsupported,
    signal.SIGWINCH: on_unsupported,
}


# --- channels ----------------------------------------------------------------------------
def read_channels(state: MasterState) -> None:
    for worker in list(state.workers.values()):
        messages = worker.channel.receive()
        for message in messages or ():
            handle_message(state, worker, message)


def handle_message(state: MasterState, worker: WorkerProc, message: tuple[Any, ...]) -> None:
    kind = message[0]
    if kind == "ready":
        worker.booted = True
        state.backoff = 0.0
        state.not_before.pop(worker.slot, None)
        if not state.ever_booted:
            state.ever_booted = True
        if not state.ready_announced and _all_ready(state):
            state.ready_announced = True
            hooks.call(state.cfg, "when_ready", state)
    elif kind == "boot_error":
        worker.boot_error = str(message[2])
        worker.boot_details = str(message[3]).rstrip() if len(message) > 3 else ""
    elif kind == "message":
        hooks.call(state.cfg, "on_message", state, worker, message[1])


def _all_ready(state: MasterState) -> bool:
    booted = sum(1 for w in state.workers.values() if w.booted)
    return booted >= state.target


# --- liveness ----------------------------------------------------------------------------
def check_liveness(state: MasterState) -> None:
    """Kill workers stuck in a request, with a stalled loop, or hanging while booting."""
    cfg = state.cfg
    timeout = cfg.timeout
    boot_timeout = cfg.effective_boot_timeout
    now = time.monotonic()
    for worker in list(state.workers.values()):
        if worker.reason == "timeout":
            continue
        record = state.board.read(worker.slot)
        if not worker.booted or record.state == BOOTING:
            if boot_timeout and now - worker.started > boot_timeout:
                log.error("Worker %s (pid %s) did not boot within %.0fs; killing",
                          worker.slot, worker.pid, boot_timeout)
                kill_worker(state, worker, "boot-timeout")
            continue
        if not timeout:
            continue
        if record.state == BUSY and now - record.request_start > timeout:
            log.error("WORKER TIMEOUT: worker %s (pid %s) spent %.1fs on %s; killing",
                      worker.slot, worker.pid, now - record.request_start, record.label or "?")
            kill_worker(state, worker, "timeout")
        elif record.state != BUSY and now - record.beat > timeout:
            log.error("WORKER TIMEOUT: worker %s (pid %s) stopped beating %.1fs ago; killing",
                      worker.slot, worker.pid, now - record.beat)
            kill_worker(state, worker, "timeout")


def kill_worker(state: MasterState, worker: WorkerProc, reason: str) -> None:
    worker.reason = reason
    _signal(worker.pid, signal.SIGKILL)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# --- worker count ------------------------------------------------------------------------
def maintain_workers(state: MasterState) -> None:
    """Fork workers for empty slots below the target; retire slots above it (highest first)."""
    now = time.monotonic()
    active = {w.slot: w for w in state.workers.values() if w.stop_deadline is None}
    for slot in sorted(active, reverse=True):
        if slot >= state.target:
            retire(state, active.pop(slot), "scale-down")
    for slot in range(state.target):
        if slot in active or any(w.slot == slot for w in state.workers.values()):
            continue
        if state.not_before.get(slot, 0.0) > now:
            continue
        state.not_before.pop(slot, None)
        spawn(state, slot)


def retire(state: MasterState, worker: WorkerProc, reason: str) -> None:
    """Ask a worker to stop gracefully; it is killed if still there after graceful_timeout."""
    worker.reason = reason
    worker.stop_deadline = time.monotonic() + state.cfg.graceful_timeout
    _signal(worker.pid, signal.SIGTERM)


def spawn(state: MasterState, slot: int) -> WorkerProc | None:
    """Fork one worker into ``slot``."""
    cfg = state.cfg
    parent_end, child_end = Channel.pair()
    now = time.monotonic()
    info = WorkerProc(slot=slot, pid=0, channel=parent_end, started=now,
                      generation=state.generation)
    hooks.call(cfg, "pre_fork", state, info)
    ops.before_fork(state, info)
    state.board.reset(slot, 0, now)
    for handler in logging.getLogger("tiamat.error").handlers:
        handler.flush()
    # A stop signal must not land in the child while it still has the master's handlers
    # (they would only queue it in the child's copy of the state, and the worker would
    # never stop): block them across the fork; the child resets them before unblocking.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        pid = os.fork()
    except OSError as exc:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        log.error("fork failed: %s", exc)
        parent_end.close()
        child_end.close()
        state.not_before[slot] = now + 1.0
        return None
    if pid == 0:  # the child: become the worker and never return
        for sig in STOP_SIGNALS:
            signal.signal(sig, _exit_before_boot)  # until the worker installs its own
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        _become_worker(state, slot, parent_end, child_end)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    child_end.close()
    info.pid = pid
    state.workers[pid] = info
    state.selector.register(parent_end.sock, selectors.EVENT_READ, info)
    log.info("Booting worker %s with pid %s", slot, pid)
    return info


def _exit_before_boot(signum: int, frame: Any) -> None:
    """A stop signal for a worker that is not serving yet: nothing to finish, just go."""
    os._exit(128 + signum)


def _become_worker(state: MasterState, slot: int, parent_end: Channel, child_end: Channel) -> None:
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        os.close(state.wake_r)
        os.close(state.wake_w)
        parent_end.close()
        for other in state.workers.values():
            other.channel.close()
        os.environ["TIAMAT"] = "1"
        os.environ["TIAMAT_WORKER_ID"] = str(slot)
        for item in state.cfg.raw_env:
            key, _, value = item.partition("=")
            os.environ[key] = value
        random.seed()
        worker_class, app = state.worker_class, state.app
        if worker_class is None:
            worker_class, app = _load_and_pick(state, child_end)
        board = state.board.writer(slot)
        state.board.reset(slot, os.getpid(), time.monotonic())
        worker = worker_class(slot=slot, cfg=state.cfg, listeners=state.listeners,
                              channel=child_end, board=board, app=app,
                              master_pid=state.pid, generation=state.generation)
        worker_main(worker)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        log.exception("worker %s failed before booting", slot)
    os._exit(code)


def _load_and_pick(state: MasterState, channel: Channel) -> tuple[type[Worker], Any]:
    """``-k auto`` without --preload: load the app here, in the worker, then pick its class."""
    try:
        app = apploader.load_app(state.cfg.app, state.cfg)
        return pick_worker_class(state.cfg, app), app  # type: ignore[return-value]
    except apploader.AppLoadError as exc:
        channel.send("boot_error", EXIT_APP_LOAD_ERROR, str(exc), exc.details)
        raise SystemExit(EXIT_APP_LOAD_ERROR) from None
    except WorkerClassError as exc:
        channel.send("boot_error", EXIT_BOOT_ERROR, str(exc))
        raise SystemExit(EXIT_BOOT_ERROR) from None


# --- stopping ----------------------------------------------------------------------------
def begin_stop(state: MasterState, graceful: bool) -> None:
    """QUIT/TERM: workers finish in-flight requests (up to graceful_timeout); INT: at once."""
    if state.stopping == "quick" or (state.stopping and graceful):
        return
    state.stopping = "graceful" if graceful else "quick"
    state.stop_deadline = time.monotonic() + (state.cfg.graceful_timeout if graceful else 1.0)
    log.info("Shutting down: %s", "graceful" if graceful else "quick")
    for sock in state.listeners:
        sock.close()
    for worker in state.workers.values():
        _signal(worker.pid, signal.SIGTERM if graceful else signal.SIGINT)


def enforce_stop_deadline(state: MasterState) -> None:
    now = time.monotonic()
    for worker in state.workers.values():
        deadline = worker.stop_deadline
        if state.stopping:
            deadline = min(deadline or state.stop_deadline, state.stop_deadline)
        if deadline is not None and now > deadline and worker.reason != "killed":
            log.warning("Worker %s (pid %s) did not stop in time; killing", worker.slot, worker.pid)
            worker.reason = "killed"
            _signal(worker.pid, signal.SIGKILL)


def finish(state: MasterState) -> None:
    """Last steps: every child reaped, unix sockets removed, on_exit called."""
    for worker in list(state.workers.values()):
        _signal(worker.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while state.workers and time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        worker = state.workers.pop(pid, None)
        if worker is not None:
            _forget(state, worker)
    for sock in state.listeners:
        sock.close()
    for path in state.unix_paths:
        _unlink_unix(path)
    if state.cfg.pidfile:
        pidfile.remove(state.cfg.pidfile, state.pid)
    ops.close(state)
    hooks.call(state.cfg, "on_exit", state)
    log.info("Shutdown complete")


def _unlink_unix(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.warning("could not remove %s: %s", path, exc)

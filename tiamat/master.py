"""The master process: binds once, forks workers, watches them, and obeys signals.

The whole loop is :func:`run_loop`; one pass reaps exited children, handles queued
signals, reads worker channels, acts on liveness deadlines, tops the worker count up (or
down) and sleeps on the signal pipe and the channels.  Signal handlers only append to
``state.signals``; ``signal.set_wakeup_fd`` wakes the sleep.  All mutable master state is
in one :class:`MasterState` passed to small functions, so each step can be read alone.

Workers have stable slots 0..N-1.  A slot may briefly hold two workers: the one serving
and its replacement (after HUP, or a max-requests recycle); the old one is retired only
once the new one has reported ready, so a reload never lowers capacity and a reload that
fails to boot leaves the old workers serving.  Each process has its own scoreboard record
(``board_index``), distinct from its slot for that reason.  docs/signals.md describes
every signal and hook.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import selectors
import signal
import sys
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

from tiamat import apploader, daemon, hooks, logs, memory, ops, pidfile, refork, sockets, systemd
from tiamat.channel import Channel
from tiamat.scoreboard import BOOTING, BUSY, Scoreboard
from tiamat.settings import BY_NAME
from tiamat.workers import WorkerClassError, resolve
from tiamat.workers.base import (
    EXIT_APP_LOAD_ERROR,
    EXIT_BOOT_ERROR,
    Worker,
    install_stack_dump,
    run_child,
    set_title,
)

log = logging.getLogger("tiamat.error")

HANDLED_SIGNALS = (signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM, signal.SIGINT, signal.SIGTTIN,
                   signal.SIGTTOU, signal.SIGWINCH, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD)
STOP_SIGNALS = {signal.SIGTERM, signal.SIGQUIT, signal.SIGINT}
BOOT_ERRORS = (EXIT_BOOT_ERROR, EXIT_APP_LOAD_ERROR)
MAX_BACKOFF = 30.0
TICK = 1.0
#: sent to a worker before a timeout kill: its faulthandler writes the Python stack to the error log
DUMP_SIGNAL = signal.SIGUSR2
#: sent right after DUMP_SIGNAL: the worker runs the worker_abort hook and exits
ABORT_SIGNAL = signal.SIGABRT
#: how long a timed-out worker gets for the stack dump and worker_abort before SIGKILL
ABORT_GRACE = 1.0
#: the directory the server was started from; a USR2 re-exec runs there (set by the CLI)
START_CWD = os.getcwd()
#: signals that count once per loop pass however often they arrived
COALESCED = frozenset({signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH})
#: a runaway sender cannot grow the queue without bound
MAX_QUEUED_SIGNALS = 1024
#: the environment variable a new master (USR2) finds its ready pipe in
READY_ENV = daemon.REEXEC_ENV
#: ``key.data`` of the ready pipe in the master's selector
REEXEC = object()
#: settings HUP cannot change in a running master (they need a USR2 upgrade)
RESTART_ONLY = ("bind", "port", "host", "tcp", "backlog", "reuse_port", "pidfile", "daemon",
                "preload_app", "chdir", "umask", "user", "group", "control_socket",
                "metrics_bind")


class WorkerProc:
    """What the master knows about one live worker process.

    (Plain classes, with their defaults as class attributes, not dataclasses: see
    tiamat.settings.Setting.)
    """

    booted: bool = False
    #: set once the worker was told to stop (graceful), with the time it must be gone by
    stop_deadline: float | None = None
    boot_error: str | None = None
    #: the traceback behind boot_error, logged at debug level only
    boot_details: str = ""
    #: why the master ended it, for the log and metrics (timeout, reload, max-requests ...)
    reason: str | None = None
    #: "worker", or "mold": the process that forks the next generation (tiamat.refork)
    role: str = "worker"
    #: max-requests: None, "requested" (by the worker) or "granted" (replacement under way)
    recycle: str | None = None
    #: after a timeout: when SIGKILL follows the stack dump and worker_abort
    kill_at: float | None = None

    def __init__(self, slot: int, pid: int, channel: Channel, started: float,
                 generation: int = 0, board_index: int = 0) -> None:
        self.slot = slot
        self.pid = pid
        self.channel = channel
        self.started = started
        self.generation = generation
        #: this process's record in the scoreboard (a slot may briefly hold two processes)
        self.board_index = board_index

    def __repr__(self) -> str:
        return f"<WorkerProc slot={self.slot} pid={self.pid} role={self.role}>"


class MasterState:
    """Everything the master loop reads and changes."""

    app: Any = None
    wake_r: int = -1
    wake_w: int = -1
    #: None while serving; "graceful" or "quick" once stopping
    stopping: str | None = None
    stop_deadline: float = 0.0
    ever_booted: bool = False
    ready_announced: bool = False
    backoff: float = 0.0
    generation: int = 0
    exit_code: int = 0
    fatal: str | None = None
    #: a HUP is being applied: outdated workers remain
    reloading: bool = False
    #: a USR2 child master: its pid, the read end of its ready pipe, and whether this
    #: master stops by itself once it is ready (HUP with --preload)
    reexec_pid: int = 0
    reexec_ready_fd: int = -1
    reexec_handover: bool = False
    #: in a master started by USR2: the pipe on which to tell the old master "ready"
    upgrade_fd: int = -1
    #: metrics, control socket, StatsD and --reload (a ``tiamat.ops.Ops``, set by ops.start)
    ops: Any = None

    def __init__(self, cfg: Any, listeners: list[Any], board: Scoreboard,
                 worker_class: type[Worker] | None, target: int = 1,
                 cli: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.listeners = listeners
        self.board = board
        self.worker_class = worker_class
        self.target = target
        #: the command-line settings, re-applied over the config file on HUP
        self.cli: dict[str, Any] = {} if cli is None else cli
        self.pid = os.getpid()
        self.workers: dict[int, WorkerProc] = {}
        self.signals: deque[int] = deque()
        self.selector: selectors.BaseSelector = selectors.DefaultSelector()
        #: per-slot earliest time a replacement may be forked (back-off after boot failures)
        self.not_before: dict[int, float] = {}
        #: unix socket paths this master bound, removed on exit
        self.unix_paths: list[str] = []

    # --- for hooks (``server`` in every master hook is this object) ---------------------
    def send(self, worker: WorkerProc, message: Any) -> bool:
        """Deliver ``message`` to one worker's ``tiamat.worker.on_message`` callbacks."""
        return worker.channel.send("message", message)

    def broadcast(self, message: Any) -> int:
        """Deliver ``message`` to every live worker; returns how many got it."""
        return broadcast(self, message)

    @property
    def num_workers(self) -> int:
        return self.target


# --- start-up ----------------------------------------------------------------------------
def start(cfg: Any) -> int:
    """Bind, fork the first workers and run the loop; returns the process exit code."""
    state = MasterState(cfg=cfg, listeners=[], board=Scoreboard(max(1024, cfg.workers * 4)),
                        worker_class=None, target=cfg.workers, cli=command_line_settings(cfg))
    code = prepare(state)
    if code:
        if state.fatal:
            print(f"tiamat: {state.fatal}", file=sys.stderr)
        daemon.report_failure(code, state.fatal or "cannot start")
        return code
    refork.setup(state)  # --refork-after: subreaper and thresholds (tiamat.refork)
    memory.setup(state)  # --max-worker-memory (tiamat.memory)
    try:
        if ops.start(state):  # metrics, control socket, --reload (tiamat.ops)
            run_loop(state)
    finally:
        finish(state)
    if state.fatal:
        print(f"tiamat: {state.fatal}", file=sys.stderr)
        daemon.report_failure(state.exit_code, state.fatal)
    elif not state.ready_announced:
        daemon.report_failure(state.exit_code or 1, "stopped before any worker was ready")
    return state.exit_code


def prepare(state: MasterState) -> int:
    """Everything before the loop: hooks, --preload, sockets, pidfile, signals.

    Returns 0, or an exit code with ``state.fatal`` saying why.
    """
    cfg = state.cfg
    hooks.call(cfg, "on_starting", state)
    state.upgrade_fd = _take_fd_env(READY_ENV)
    if cfg.preload_app:
        try:
            state.app = apploader.load_app(cfg.app, cfg)
        except apploader.AppLoadError as exc:
            log.debug("%s", exc.details.rstrip())
            state.fatal = str(exc)
            return EXIT_APP_LOAD_ERROR
    try:
        state.worker_class = pick_worker_class(cfg, state.app)
    except WorkerClassError as exc:
        state.fatal = str(exc)
        return 2
    try:
        state.listeners = sockets.create_listeners(
            cfg.bind_addresses(), cfg.backlog, cfg.reuse_port,
            explicit=cfg.sources.get("bind", "default") != "default"
            or cfg.sources.get("port", "default") != "default")
    except OSError as exc:
        state.fatal = str(exc.strerror or exc)
        return 1
    os.environ.pop(sockets.INHERIT_ENV, None)
    systemd.forget_activation_env()
    state.unix_paths = [s.getsockname() for s in state.listeners
                        if s.family == sockets.socket.AF_UNIX]
    if state.app is not None and cfg.gc_freeze:
        gc.collect()
        gc.freeze()  # keep the preloaded app's objects out of the collector: pages stay shared
        memory.trim_malloc()  # the collected garbage's pages: not counted, not copied
    if cfg.pidfile:
        try:
            pidfile.write(cfg.pidfile, state.pid)
        except (pidfile.PidfileError, OSError) as exc:
            state.fatal = str(exc)
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
    return 0


def command_line_settings(cfg: Any) -> dict[str, Any]:
    """The settings given on the command line: HUP re-reads the file but keeps these.

    The config file's path is made absolute: it was given relative to the directory the
    command ran in, and ``--chdir`` has moved the master since.
    """
    given = {name: value for name, value in cfg.values.items()
             if cfg.sources.get(name) == "command line"}
    if given.get("config"):
        given["config"] = os.path.join(START_CWD, given["config"])
    return given


def _reload_environ() -> Mapping[str, str]:
    """The environment a HUP re-reads, with a relative ``TIAMAT_CONFIG`` made absolute.

    Like ``-c`` (see :func:`command_line_settings`), the variable names a file relative to
    the directory the command ran in, and ``--chdir`` has moved the master since.
    """
    name = BY_NAME["config"].env_var
    path = os.environ.get(name)
    if not path or os.path.isabs(path):
        return os.environ
    return {**os.environ, name: os.path.join(START_CWD, path)}


def _take_fd_env(name: str) -> int:
    """An fd number handed over in the environment (removed, so workers never see it)."""
    value = os.environ.pop(name, "")
    return int(value) if value.isdigit() else -1


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
        if signum != signal.SIGCHLD and len(state.signals) < MAX_QUEUED_SIGNALS:
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
        enforce_stop_deadline(state)
        ops.step(state)
        refork.step(state)
        memory.step(state)
        if state.stopping:
            if not state.workers:
                return
        else:
            maintain_workers(state)
        sleep(state)


def sleep(state: MasterState) -> None:
    now = time.monotonic()
    deadlines = [*state.not_before.values(),
                 *(w.kill_at for w in state.workers.values() if w.kill_at is not None)]
    timeout = max(0.0, min([now + TICK, *deadlines]) - now)
    for key, _ in state.selector.select(timeout):
        if key.data is None:
            try:
                while os.read(state.wake_r, 4096):
                    pass
            except (BlockingIOError, InterruptedError):
                pass
        elif key.data is REEXEC:
            read_reexec_pipe(state)


# --- reaping -----------------------------------------------------------------------------
def reap(state: MasterState) -> None:
    """Collect every exited child (no zombies, orphans included when we are PID 1)."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        except InterruptedError:
            continue
        if pid == 0:
            return
        code = os.waitstatus_to_exitcode(status)
        if pid == state.reexec_pid:
            reexec_exited(state, code)
            continue
        worker = state.workers.pop(pid, None)
        if worker is not None:
            worker_exited(state, worker, code)


def worker_exited(state: MasterState, worker: WorkerProc, code: int) -> None:
    """Decide what a worker's exit means: a boot failure, a crash, or a planned stop."""
    # a message sent just before exiting (boot_error) must be read before the channel closes
    for message in worker.channel.receive() or ():
        handle_message(state, worker, message)
    _forget(state, worker)
    hooks.call(state.cfg, "child_exit", state, worker)
    ops.worker_exited(state, worker, code)
    planned = worker.stop_deadline is not None or state.stopping is not None
    if not worker.booted and worker.boot_error is None and not planned:
        if worker.reason == "boot-timeout":
            worker.boot_error = (f"worker {worker.slot} did not boot within "
                                 f"{state.cfg.effective_boot_timeout:g}s")
        else:
            worker.boot_error = f"worker {worker.slot} exited with code {code} while booting"
    how = f"signal {-code}" if code < 0 else f"code {code}"
    why = f" ({worker.reason})" if worker.reason else ""
    if worker.boot_error is not None and not worker.booted:
        boot_failed(state, worker, code)
    elif code != 0 and not planned:
        log.warning("Worker %s (pid %s) exited with %s%s", worker.slot, worker.pid, how, why)
    else:
        log.info("Worker %s (pid %s) exited%s", worker.slot, worker.pid, why)


def _forget(state: MasterState, worker: WorkerProc) -> None:
    _unwatch(state, worker)
    worker.channel.close()
    state.board.clear(worker.board_index)


def free_board_index(state: MasterState, slot: int) -> int | None:
    """The scoreboard record for a new process: the slot's own if free (so status tools
    reading by slot are right in the steady state), else a free one from the top down."""
    used = {w.board_index for w in state.workers.values()}
    if slot not in used and slot < state.board.capacity:
        return slot
    return next((i for i in range(state.board.capacity - 1, -1, -1) if i not in used), None)


def boot_failed(state: MasterState, worker: WorkerProc, code: int) -> None:
    """A worker could not boot.  Before any worker ever booted, a boot or app-load error
    ends the server (the app is broken, respawning cannot help); otherwise the old workers
    keep serving and the slot is retried with exponential back-off."""
    if not state.ever_booted and not state.stopping and code in BOOT_ERRORS:
        state.fatal = worker.boot_error
        state.exit_code = code
        if worker.boot_details:
            log.debug("%s", worker.boot_details)
        begin_stop(state, graceful=False)
        return
    if state.fatal is not None or state.stopping:
        return  # the other workers failed the same way: the one line is printed at exit
    state.backoff = min(MAX_BACKOFF, max(1.0, state.backoff * 2))
    state.not_before[worker.slot] = time.monotonic() + state.backoff
    log.error("%s; retrying in %.0fs (%s worker(s) still serving)", worker.boot_error,
              state.backoff, serving_count(state))
    if state.reloading:  # systemd must not wait for a reload that cannot complete
        systemd.notify("READY=1", f"STATUS=reload failed: {worker.boot_error}")
    if worker.boot_details:
        log.debug("%s", worker.boot_details)


# --- signals -----------------------------------------------------------------------------
def handle_signals(state: MasterState) -> None:
    """Act on queued signals; repeats of HUP, USR1, USR2 and WINCH in one pass count once."""
    seen: set[int] = set()
    while state.signals:
        signum = state.signals.popleft()
        if signum in COALESCED:
            if signum in seen:
                continue
            seen.add(signum)
        action = SIGNAL_ACTIONS.get(signum)
        if action is not None:
            action(state)


def on_term(state: MasterState) -> None:
    begin_stop(state, graceful=True)


def on_int(state: MasterState) -> None:
    begin_stop(state, graceful=False)


def on_hup(state: MasterState) -> None:
    """Re-read the config file and replace every worker, readiness-gated (see module doc)."""
    if state.stopping:
        return
    if state.cfg.preload_app:
        log.info("HUP with --preload: re-executing to load the new code")
        reexec(state, handover=True)
        return
    log.info("HUP: reloading the configuration and the app")
    systemd.reloading()
    loaded = reload_config(state)
    if loaded is None:
        systemd.reloaded()
        return
    cfg, worker_class = loaded
    old_target = state.target
    state.cfg, state.worker_class = cfg, worker_class
    logs.setup(cfg)
    state.generation += 1
    state.reloading = True
    state.backoff = 0.0
    state.not_before.clear()
    state.target = cfg.workers
    hooks.call(cfg, "on_reload", state)
    if state.target != old_target:
        hooks.call(cfg, "nworkers_changed", state, state.target, old_target)


def reload_config(state: MasterState) -> tuple[Any, type[Worker] | None] | None:
    """The new settings (file and environment re-read, command line kept), or None."""
    from tiamat.config import load_config

    try:
        cfg = load_config(state.cli, environ=_reload_environ())
        worker_class = pick_worker_class(cfg, None)
    except Exception as exc:
        log.error("HUP: configuration not reloaded: %s; the running workers keep serving", exc)
        return None
    for warning in cfg.warnings:
        log.warning("%s", warning)
    for name in RESTART_ONLY:
        if cfg.values.get(name) != state.cfg.values.get(name):
            log.warning("HUP: %s changed; it takes effect after a USR2 upgrade", name)
            cfg.set(name, state.cfg.values.get(name))
    return cfg, worker_class


def on_ttin(state: MasterState) -> None:
    if state.stopping:
        return
    set_target(state, state.target + 1, "TTIN")


def on_ttou(state: MasterState) -> None:
    if state.stopping or state.target <= 1:
        return
    set_target(state, state.target - 1, "TTOU")


def on_winch(state: MasterState) -> None:
    """Stop every worker gracefully; the master keeps its sockets until HUP or TTIN."""
    if state.stopping or state.target == 0:
        return
    if _has_terminal():
        log.info("WINCH ignored: the master has a controlling terminal (window resizes send "
                 "WINCH); run it with -D or setsid to use WINCH")
        return
    set_target(state, 0, "WINCH")


def set_target(state: MasterState, target: int, why: str) -> None:
    old, state.target = state.target, target
    log.info("%s: workers %s -> %s", why, old, target)
    hooks.call(state.cfg, "nworkers_changed", state, target, old)


def _has_terminal() -> bool:
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False
    os.close(fd)
    return True


def on_usr1(state: MasterState) -> None:
    """Reopen the log files here, then have every worker reopen its own."""
    logs.reopen()
    daemon.reopen_std_streams(state.cfg)
    log.info("USR1: reopened the log files")
    for worker in state.workers.values():
        worker.channel.send("reopen_logs")


def on_usr2(state: MasterState) -> None:
    reexec(state, handover=False)


SIGNAL_ACTIONS = {
    signal.SIGTERM: on_term,
    signal.SIGQUIT: on_term,
    signal.SIGINT: on_int,
    signal.SIGHUP: on_hup,
    signal.SIGTTIN: on_ttin,
    signal.SIGTTOU: on_ttou,
    signal.SIGWINCH: on_winch,
    signal.SIGUSR1: on_usr1,
    signal.SIGUSR2: on_usr2,
}


# --- re-exec (USR2) ----------------------------------------------------------------------
def reexec(state: MasterState, handover: bool) -> None:
    """Start a new master from the same command line, handing it the listening sockets.

    The pidfile becomes PIDFILE.oldbin; the new master writes PIDFILE.  It reports ready
    through a pipe (``TIAMAT_READY_FD``); if it dies first, :func:`reexec_exited` puts the
    pidfile back and this master simply keeps serving.
    """
    if state.stopping:
        return
    if state.reexec_pid:
        log.warning("re-exec ignored: new master (pid %s) is still running", state.reexec_pid)
        return
    cfg = state.cfg
    try:
        if cfg.pidfile and pidfile.read_pid(cfg.pidfile) == state.pid:
            os.replace(cfg.pidfile, cfg.pidfile + ".oldbin")
        hooks.call(cfg, "pre_exec", state)
        _start_new_master(state, handover)
    except OSError as exc:
        log.error("re-exec failed: %s; this master keeps serving", exc)
        _restore_pidfile(state)


def _start_new_master(state: MasterState, handover: bool) -> None:
    read_fd, write_fd = os.pipe()
    env = dict(os.environ)
    env[sockets.INHERIT_ENV] = ",".join(str(sock.fileno()) for sock in state.listeners)
    env[READY_ENV] = str(write_fd)
    env.pop("TIAMAT_WORKER_ID", None)
    argv = [sys.executable, *sys.orig_argv[1:]]
    for handler in log.handlers:
        handler.flush()
    try:
        pid = os.fork()
    except OSError:
        os.close(read_fd)
        os.close(write_fd)
        raise
    if pid == 0:
        _exec_master(argv, env, write_fd)
    os.close(write_fd)
    state.reexec_pid, state.reexec_ready_fd, state.reexec_handover = pid, read_fd, handover
    state.selector.register(read_fd, selectors.EVENT_READ, REEXEC)
    log.info("Re-executing: new master pid %s", pid)


def _exec_master(argv: list[str], env: dict[str, str], ready_fd: int) -> None:
    try:
        signal.set_wakeup_fd(-1)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        os.set_inheritable(ready_fd, True)
        os.chdir(START_CWD)
        os.execve(argv[0], argv, env)
    except BaseException as exc:
        print(f"tiamat: re-exec failed: {exc}", file=sys.stderr)
    os._exit(127)


def read_reexec_pipe(state: MasterState) -> None:
    try:
        data = os.read(state.reexec_ready_fd, 64)
    except (BlockingIOError, InterruptedError):
        return
    _close_reexec_pipe(state)
    if data.startswith(b"ready"):
        then = ("stopping this one" if state.reexec_handover else
                f"send QUIT to this master (pid {state.pid}) to complete the upgrade")
        log.info("New master (pid %s) is ready; %s", state.reexec_pid, then)
        if state.reexec_handover:
            begin_stop(state, graceful=True)


def _close_reexec_pipe(state: MasterState) -> None:
    if state.reexec_ready_fd >= 0:
        try:
            state.selector.unregister(state.reexec_ready_fd)
        except (KeyError, ValueError):
            pass
        os.close(state.reexec_ready_fd)
        state.reexec_ready_fd = -1


def reexec_exited(state: MasterState, code: int) -> None:
    """The new master is gone: take the pidfile back and carry on serving."""
    _close_reexec_pipe(state)
    _restore_pidfile(state)  # before the log line: whoever reads it finds the pidfile back
    log.error("New master (pid %s) exited with code %s; this master (pid %s) keeps serving",
              state.reexec_pid, code, state.pid)
    state.reexec_pid = 0
    if state.reexec_handover and state.stopping == "graceful" and state.workers:
        log.warning("the new master died during the hand-over; this master stops as asked")
    state.reexec_handover = False


def _restore_pidfile(state: MasterState) -> None:
    """PIDFILE.oldbin back to PIDFILE, unless a live new master owns PIDFILE."""
    path = state.cfg.pidfile
    if not path or pidfile.read_pid(f"{path}.oldbin") != state.pid:
        return
    other = pidfile.read_pid(path)
    if other is None or not pidfile.is_running(other):
        try:
            os.replace(f"{path}.oldbin", path)
        except OSError as exc:
            log.error("could not restore the pidfile %s: %s", path, exc)


def announce_ready(state: MasterState) -> None:
    """The first workers serve: when_ready, systemd, the -D parent, an old master."""
    state.ready_announced = True
    log.info("Ready: %s worker(s) serving", state.target)
    hooks.call(state.cfg, "when_ready", state)
    systemd.ready(state.pid)
    daemon.report_ready()
    if state.upgrade_fd >= 0:
        try:
            os.write(state.upgrade_fd, b"ready\n")
        except OSError:
            pass
        os.close(state.upgrade_fd)
        state.upgrade_fd = -1


# --- channels ----------------------------------------------------------------------------
def read_channels(state: MasterState) -> None:
    for worker in list(state.workers.values()):
        messages = worker.channel.receive()
        if messages is None:
            # EOF: the worker is exiting.  Its channel stays readable (EPOLLHUP) until the
            # reap, so the sleep would return at once and the loop spin until then: stop
            # watching it; SIGCHLD wakes the loop for the reap.
            _unwatch(state, worker)
            continue
        for message in messages:
            handle_message(state, worker, message)


def _unwatch(state: MasterState, worker: WorkerProc) -> None:
    try:
        state.selector.unregister(worker.channel.sock)
    except (KeyError, ValueError):
        pass


def handle_message(state: MasterState, worker: WorkerProc, message: tuple[Any, ...]) -> None:
    kind = message[0]
    if kind == "ready":
        worker_ready(state, worker)
    elif kind == "boot_error":
        worker.boot_error = str(message[2])
        worker.boot_details = str(message[3]).rstrip() if len(message) > 3 else ""
    elif kind == "message":
        hooks.call(state.cfg, "on_message", state, worker, message[1])
    elif kind == "molded":
        refork.on_message(state, worker, message)
    elif kind == "broadcast":
        broadcast(state, message[1])
    elif kind == "recycle" and worker.recycle is None:
        worker.recycle = "requested"


def worker_ready(state: MasterState, worker: WorkerProc) -> None:
    worker.booted = True
    state.ever_booted = True
    state.backoff = 0.0
    state.not_before.pop(worker.slot, None)
    if not state.ready_announced and _all_ready(state):
        announce_ready(state)


def broadcast(state: MasterState, message: Any) -> int:
    """Send ``message`` to every worker that is not stopping."""
    sent = 0
    for worker in list(state.workers.values()):
        if worker.stop_deadline is None and worker.channel.send("message", message):
            sent += 1
    return sent


def _all_ready(state: MasterState) -> bool:
    return serving_count(state) >= state.target


def serving_count(state: MasterState) -> int:
    """Workers that booted and were not told to stop (a refork mold serves nobody)."""
    return sum(1 for w in state.workers.values()
               if w.booted and w.stop_deadline is None and w.role == "worker")


# --- liveness ----------------------------------------------------------------------------
def check_liveness(state: MasterState) -> None:
    """Kill workers stuck in a request, with a stalled loop, or hanging while booting.

    The stack dump and worker_abort come first; SIGKILL follows ABORT_GRACE later.
    """
    now = time.monotonic()
    for worker in list(state.workers.values()):
        if worker.kill_at is not None:
            if now >= worker.kill_at:
                worker.kill_at = float("inf")
                _signal(worker.pid, signal.SIGKILL)
            continue
        problem = liveness_problem(state, worker, now)
        if problem is not None:
            reason, text = problem
            log.error("%s", text)
            abort_worker(state, worker, reason, now)


def liveness_problem(state: MasterState, worker: WorkerProc, now: float) -> tuple[str, str] | None:
    """(reason, log line) if ``worker`` must be killed now, else None."""
    cfg = state.cfg
    record = state.board.read_stable(worker.board_index)
    if record.torn:
        return None  # caught mid-write: judge it on the next pass
    if not worker.booted or record.state == BOOTING:
        boot_timeout = cfg.effective_boot_timeout
        if boot_timeout and now - worker.started > boot_timeout:
            return "boot-timeout", (f"Worker {worker.slot} (pid {worker.pid}) did not boot within "
                                    f"{boot_timeout:g}s; killing it")
        return None
    timeout = cfg.timeout
    if not timeout:
        return None
    if record.state == BUSY and now - record.request_start > timeout:
        return "timeout", (f"WORKER TIMEOUT: worker {worker.slot} (pid {worker.pid}) spent "
                           f"{now - record.request_start:.1f}s on {record.label or '?'}; killing it")
    if record.state != BUSY and worker.stop_deadline is None and now - record.beat > timeout:
        return "timeout", (f"WORKER TIMEOUT: worker {worker.slot} (pid {worker.pid}) stopped "
                           f"beating {now - record.beat:.1f}s ago; killing it")
    return None


def abort_worker(state: MasterState, worker: WorkerProc, reason: str, now: float) -> None:
    """Stack dump to the error log and worker_abort in the worker, then SIGKILL."""
    worker.reason = reason
    worker.kill_at = now + ABORT_GRACE
    _signal(worker.pid, DUMP_SIGNAL)
    _signal(worker.pid, ABORT_SIGNAL)


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
    """Bring every slot below the target to one current, booted worker; retire the rest."""
    grant_recycle(state)
    by_slot: dict[int, list[WorkerProc]] = {}
    for worker in state.workers.values():
        if worker.stop_deadline is None:
            by_slot.setdefault(worker.slot, []).append(worker)
    for slot in sorted(by_slot, reverse=True):  # scale down: highest slot first
        if slot >= state.target:
            for worker in by_slot.pop(slot):
                retire(state, worker, "scale-down")
    now = time.monotonic()
    for slot in range(state.target):
        fill_slot(state, slot, by_slot.get(slot, []), now)
    check_reload_done(state)


def outdated(state: MasterState, worker: WorkerProc) -> bool:
    """Due for replacement: from before the last HUP, or granted a max-requests recycle."""
    return worker.generation < state.generation or worker.recycle == "granted"


def fill_slot(state: MasterState, slot: int, workers: list[WorkerProc], now: float) -> None:
    """Fork a current worker for the slot if it has none; once that one is ready, retire
    the outdated ones (readiness-gated replacement).  Outdated workers that never booted
    serve nobody and go at once (a flood of HUPs forks no pile of processes)."""
    current = [w for w in workers if not outdated(state, w)]
    stale = [w for w in workers if outdated(state, w)]
    if not current and state.not_before.get(slot, 0.0) <= now:
        state.not_before.pop(slot, None)
        spawn(state, slot)
    ready = any(w.booted for w in current)
    for worker in stale:
        if ready or not worker.booted:
            granted = worker.recycle == "granted"
            retire(state, worker, (worker.reason or "recycle") if granted else "reload")


def grant_recycle(state: MasterState) -> None:
    """Let one worker that reached max-requests be replaced; never two at the same time."""
    if any(w.recycle == "granted" for w in state.workers.values()):
        return
    waiting = [w for w in state.workers.values()
               if w.recycle == "requested" and w.stop_deadline is None and not outdated(state, w)]
    if waiting:
        worker = min(waiting, key=lambda w: w.started)
        log.info("Worker %s (pid %s) reached max-requests; replacing it", worker.slot, worker.pid)
        grant_replacement(worker, "recycle")


def grant_replacement(worker: WorkerProc, reason: str) -> None:
    """Mark ``worker`` for a readiness-gated replacement (see :func:`fill_slot`); ``reason``
    is kept for the exit log line and the restart metrics (max-requests, memory, refork)."""
    worker.recycle = "granted"
    worker.reason = reason


def check_reload_done(state: MasterState) -> None:
    if not state.reloading:
        return
    if any(w.generation < state.generation and w.stop_deadline is None
           for w in state.workers.values()):
        return
    booted = {w.slot for w in state.workers.values()
              if w.booted and w.stop_deadline is None and w.generation == state.generation}
    if all(slot in booted for slot in range(state.target)):
        state.reloading = False
        log.info("Reload complete: %s worker(s) of generation %s serving", state.target,
                 state.generation)
        systemd.reloaded()


def retire(state: MasterState, worker: WorkerProc, reason: str) -> None:
    """Ask a worker to stop gracefully; it is killed if still there after graceful_timeout."""
    worker.reason = reason
    worker.stop_deadline = time.monotonic() + state.cfg.graceful_timeout
    _signal(worker.pid, signal.SIGTERM)


def spawn(state: MasterState, slot: int) -> WorkerProc | None:
    """Fork one worker into ``slot``."""
    cfg = state.cfg
    index = free_board_index(state, slot)
    if index is None:
        log.error("scoreboard full: cannot start worker %s", slot)
        state.not_before[slot] = time.monotonic() + 1.0
        return None
    parent_end, child_end = Channel.pair()
    now = time.monotonic()
    info = WorkerProc(slot=slot, pid=0, channel=parent_end, started=now,
                      generation=state.generation, board_index=index)
    hooks.call(cfg, "pre_fork", state, info)
    ops.before_fork(state, info)
    state.board.reset(index, 0, now)
    for handler in logging.getLogger("tiamat.error").handlers:
        handler.flush()
    # A stop signal must not land in the child while it still has the master's handlers
    # (they would only queue it in the child's copy of the state, and the worker would
    # never stop): block them across the fork; the child resets them before unblocking.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    memory.freeze_startup_objects()  # (only while the start-up pause lasts)
    try:
        pid = refork.fork(state, info, child_end)  # os.fork(), or through the mold
    except OSError as exc:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        memory.resume_collector()
        log.error("fork failed: %s", exc)
        parent_end.close()
        child_end.close()
        state.not_before[slot] = now + 1.0
        return None
    if pid == 0:  # the child: become the worker and never return
        for sig in STOP_SIGNALS:
            signal.signal(sig, _exit_before_boot)  # until the worker installs its own
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        _become_worker(state, info, parent_end, child_end)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    memory.resume_collector()  # (the master's start-up pause ends with its first fork)
    child_end.close()
    info.pid = pid
    state.workers[pid] = info
    state.selector.register(parent_end.sock, selectors.EVENT_READ, info)
    log.info("Booting worker %s with pid %s", slot, pid)
    return info


def _exit_before_boot(signum: int, frame: Any) -> None:
    """A stop signal for a worker that is not serving yet: nothing to finish, just go."""
    os._exit(128 + signum)


def _become_worker(state: MasterState, info: WorkerProc, parent_end: Channel,
                   child_end: Channel) -> None:
    """In the forked child: drop the master's ends, load the app if not preloaded, serve."""
    if state.cfg.gc_freeze:
        memory.pause_collector()  # until the app is loaded (tiamat.memory)
    run_child(info.slot, lambda: _build_worker(state, info, parent_end, child_end),
              f"worker {info.slot}")


def _build_worker(state: MasterState, info: WorkerProc, parent_end: Channel,
                  child_end: Channel) -> Worker:
    install_stack_dump()
    signal.signal(ABORT_SIGNAL, _exit_before_boot)  # a boot timeout before boot() runs
    for fd in (state.wake_r, state.wake_w, state.reexec_ready_fd, state.upgrade_fd):
        if fd >= 0:
            os.close(fd)
    daemon.close_status_fd()
    parent_end.close()
    for other in state.workers.values():
        other.channel.close()
    os.environ["TIAMAT"] = "1"
    for item in state.cfg.raw_env:
        key, _, value = item.partition("=")
        os.environ[key] = value
    worker_class, app = state.worker_class, state.app
    if worker_class is None:
        worker_class, app = _load_and_pick(state, child_end)
    state.board.reset(info.board_index, os.getpid(), time.monotonic())
    worker = worker_class(slot=info.slot, cfg=state.cfg, listeners=state.listeners,
                          channel=child_end, board=state.board.writer(info.board_index),
                          app=app, master_pid=state.pid, generation=state.generation)
    worker.server = state
    return worker


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
    if not state.stopping and not state.reexec_pid:
        systemd.stopping()  # not when handing over to a new master: the service goes on
    state.stopping = "graceful" if graceful else "quick"
    state.stop_deadline = time.monotonic() + (state.cfg.graceful_timeout if graceful else 1.0)
    log.info("Shutting down: %s", "graceful" if graceful else "quick")
    for sock in state.listeners:
        sock.close()
    for worker in state.workers.values():
        if worker.kill_at is None:
            _signal(worker.pid, signal.SIGTERM if graceful else signal.SIGINT)


def enforce_stop_deadline(state: MasterState) -> None:
    """SIGKILL for workers still there after their graceful deadline."""
    now = time.monotonic()
    for worker in state.workers.values():
        deadline = worker.stop_deadline
        if state.stopping:
            deadline = min(deadline or state.stop_deadline, state.stop_deadline)
        if deadline is not None and now > deadline and worker.reason != "killed":
            log.warning("Worker %s (pid %s) did not stop in time; killing it", worker.slot,
                        worker.pid)
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
    if state.reexec_pid:  # a new master from USR2 listens on the unix sockets: leave them
        log.info("The new master (pid %s) keeps serving", state.reexec_pid)
    else:
        for path in state.unix_paths:
            _unlink_unix(path)
    if state.cfg.pidfile:
        pidfile.remove(state.cfg.pidfile, state.pid)
        pidfile.remove(state.cfg.pidfile + ".oldbin", state.pid)
    _close_reexec_pipe(state)
    ops.close(state)
    hooks.call(state.cfg, "on_exit", state)
    log.info("Shutdown complete")


def _unlink_unix(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.warning("could not remove %s: %s", path, exc)

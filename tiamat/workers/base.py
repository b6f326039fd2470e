"""The worker base class: the life cycle every worker class shares.

A worker process runs :func:`worker_main`, which never returns:

``boot()`` (after the fork: signals, process title, hooks, load the app unless preloaded,
class-specific ``init_app()``) -> ``notify_ready()`` -> ``run()`` (the class's own I/O loop,
which calls ``beat()`` at least once a second and watches ``alive``) -> ``worker_exit`` hook
-> exit code 0.  A boot failure exits 3, an app that cannot be loaded exits 4; the master
uses those codes to avoid respawning workers that cannot work.

Subclass :class:`Worker` and implement :meth:`run` to write a worker class of your own
(``-k mypkg.workers:MyWorker``).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import random
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from tiamat import apploader, daemon, hooks, logs, memory
from tiamat.channel import Channel
from tiamat.scoreboard import SlotWriter

EXIT_OK = 0
EXIT_BOOT_ERROR = 3
EXIT_APP_LOAD_ERROR = 4

log = logging.getLogger("tiamat.error")

#: the master sends this before a timeout kill: faulthandler writes every thread's stack
#: to the error log (works even when the worker is stuck in C code)
DUMP_SIGNAL = signal.SIGUSR2
#: then this: the worker runs the worker_abort hook and exits
ABORT_SIGNAL = signal.SIGABRT
#: on a graceful stop: how long a connection accepted just before it has to send its request
#: (every HTTP worker class answers it rather than reset a client that did nothing wrong)
STOP_GRACE = 0.5
#: how often the watchdog thread checks that the master is still there
WATCHDOG_INTERVAL = 0.25
#: after the master is gone, how long the loop gets to stop by itself before os._exit
ORPHAN_GRACE = 0.5

#: the worker running in this process (None in the master); see ``tiamat.worker``
current: Worker | None = None


class Worker:
    """Base class of every worker class.

    Attributes a subclass uses: ``cfg`` (the settings), ``listeners`` (the shared listening
    sockets), ``app`` (after boot), ``alive`` (False once the worker should stop),
    ``quick`` (True for a quick stop: drop in-flight work), ``wake_fd`` (readable whenever a
    signal arrived: add it to your selector or event loop), ``channel`` (to the master).
    """

    #: the kind of application this class serves: "wsgi", "asgi" or "tcp"
    interface = "wsgi"

    def __init__(self, *, slot: int, cfg: Any, listeners: list[Any], channel: Channel,
                 board: SlotWriter, app: Any = None, master_pid: int = 0,
                 generation: int = 0) -> None:
        self.slot = slot
        self.cfg = cfg
        self.listeners = listeners
        self.channel = channel
        self.board = board
        self.app = app
        self.master_pid = master_pid or os.getppid()
        self.generation = generation
        self.pid = os.getpid()
        self.alive = True
        self.quick = False
        self.reopen_logs = False
        self.booted_at = time.monotonic()
        self.wake_fd = -1
        self._wake_w = -1
        self.message_callbacks: list[Callable[[Any], None]] = []
        #: the master's state as it was at the fork (``server`` in worker hooks)
        self.server: Any = None
        self.recycle_asked = False
        #: set when the master promoted this worker to the mold (--refork-after): once run()
        #: returns, tiamat.refork.run_mold takes over instead of exiting
        self.mold_request: tuple[Any, ...] | None = None
        jitter = random.randint(0, cfg.max_requests_jitter) if cfg.max_requests_jitter else 0
        self.max_requests = cfg.max_requests + jitter if cfg.max_requests > 0 else 0

    # --- life cycle ---------------------------------------------------------------------
    def boot(self) -> None:
        """Everything between the fork and serving; raising here is a boot failure."""
        self.pid = os.getpid()
        self._install_signals()
        self._start_watchdog()
        set_title(f"worker {self.slot}", self.cfg)
        from tiamat import worker as public_api

        self.message_callbacks.extend(public_api.take_pending())
        hooks.call(self.cfg, "post_fork", self.server, self)
        if self.app is None:
            self.app = self.load_app()
        self.check_app()
        self.init_app()
        hooks.call(self.cfg, "post_worker_init", self)

    def load_app(self) -> Any:
        return apploader.load_app(self.cfg.app, self.cfg)

    def check_app(self) -> None:
        """Refuse, as an app load error (exit 4, one line), an app this class cannot serve."""
        if self.interface == "wsgi" and self.cfg.interface != "wsgi" and apploader.is_asgi(self.app):
            raise apploader.AppLoadError(
                self.cfg.app or "", f"it is an ASGI application and the {type(self).__name__} "
                "worker class serves WSGI; run it with -k asgi")

    def init_app(self) -> None:
        """Class-specific preparation before serving (ASGI lifespan startup, say)."""

    def run(self) -> None:
        raise NotImplementedError

    def notify_ready(self) -> None:
        self.board.ready(time.monotonic())
        self.channel.send("ready")

    def beat(self, now: float | None = None) -> None:
        """Prove liveness; call at least once a second while the loop runs."""
        self.board.beat(time.monotonic() if now is None else now)
        if os.getppid() != self.master_pid and self.alive:
            log.warning("worker %s: master %s is gone; exiting", self.slot, self.master_pid)
            self.alive = False
            self.quick = True

    def count_request(self) -> None:
        """Call after each request.  Once max_requests is reached the worker asks the master
        to replace it and keeps serving: the master starts the replacement, one worker at a
        time, and stops this one (SIGTERM) once the replacement is ready."""
        if self.max_requests and self.board.requests >= self.max_requests and not self.recycle_asked:
            self.recycle_asked = True
            log.info("worker %s: served %s requests (max_requests); asking to be replaced",
                     self.slot, self.board.requests)
            if not self.channel.send("recycle", self.board.requests):
                self.alive = False

    def handle_channel(self) -> None:
        """Act on what the master sent; EOF means the master died, so stop at once."""
        messages = self.channel.receive()
        if messages is None:
            if self.alive:
                log.warning("worker %s: lost the master; exiting", self.slot)
            self.alive = False
            self.quick = True
            return
        for message in messages:
            kind = message[0]
            if kind == "reopen_logs":
                self.reopen_log_files()
            elif kind == "stop":
                self.alive = False
            elif kind == "mold":
                from tiamat import refork

                refork.promoted(self, message)
            elif kind == "message":
                for callback in list(self.message_callbacks):
                    try:
                        callback(message[1])
                    except Exception:
                        log.exception("worker %s: on_message callback failed", self.slot)

    def handle_wakeup(self) -> None:
        """Drain the signal wake-up pipe (the handlers already set the flags)."""
        try:
            while os.read(self.wake_fd, 4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        if self.reopen_logs:
            self.reopen_logs = False
            self.reopen_log_files()

    def reopen_log_files(self) -> None:
        """USR1 (from the master over the channel, or sent to this worker directly)."""
        logs.reopen()
        daemon.reopen_std_streams(self.cfg)
        install_stack_dump()
        log.info("worker %s: reopened the log files", self.slot)

    # --- master watchdog ----------------------------------------------------------------
    def _start_watchdog(self) -> None:
        """A thread that notices a dead master even while the loop is busy in a request
        (channel EOF and the beat only work between requests): the worker must not serve
        on as an orphan."""
        thread = threading.Thread(target=self._watch_master, name="tiamat-watchdog", daemon=True)
        thread.start()

    def _watch_master(self) -> None:
        while os.getppid() == self.master_pid:
            time.sleep(WATCHDOG_INTERVAL)
        log.warning("worker %s: master %s is gone; exiting", self.slot, self.master_pid)
        self.alive = False
        self.quick = True
        try:
            os.write(self._wake_w, b"!")
        except OSError:
            pass
        time.sleep(ORPHAN_GRACE)
        os._exit(1)

    # --- signals ------------------------------------------------------------------------
    def _install_signals(self) -> None:
        for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGWINCH):
            signal.signal(sig, signal.SIG_IGN)
        install_stack_dump()
        signal.signal(ABORT_SIGNAL, self._on_abort)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, self._on_graceful)
        signal.signal(signal.SIGQUIT, self._on_graceful)
        signal.signal(signal.SIGINT, self._on_quick)
        signal.signal(signal.SIGUSR1, self._on_reopen)
        self.wake_fd, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)

    def _on_graceful(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGQUIT and self.alive:
            hooks.call(self.cfg, "worker_int", self)
        self.alive = False

    def _on_quick(self, signum: int, frame: Any) -> None:
        hooks.call(self.cfg, "worker_int", self)
        self.alive = False
        self.quick = True

    def _on_reopen(self, signum: int, frame: Any) -> None:
        self.reopen_logs = True

    def _on_abort(self, signum: int, frame: Any) -> None:
        """The master is about to SIGKILL this worker (timeout): worker_abort, then go."""
        hooks.call(self.cfg, "worker_abort", self)
        _flush_and_exit(1)


def install_stack_dump() -> None:
    """Make DUMP_SIGNAL write every thread's Python stack to the error log (faulthandler
    writes from the C signal handler, so it works even when the worker is stuck)."""
    stream: Any = sys.stderr
    for handler in log.handlers:
        candidate = getattr(handler, "stream", None)
        if candidate is not None and hasattr(candidate, "fileno"):
            stream = candidate
            break
    try:
        stream.flush()
        faulthandler.register(DUMP_SIGNAL, file=stream, all_threads=True, chain=False)
    except (AttributeError, ValueError, OSError, RuntimeError):
        pass


def _flush_and_exit(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    logging.shutdown()
    os._exit(code)


def set_title(role: str, cfg: Any) -> None:
    """``tiamat: master [app]`` / ``tiamat: worker 0 [app]`` (no-op without setproctitle)."""
    try:
        from setproctitle import setproctitle
    except ImportError:  # pragma: no cover - declared as a dependency
        return
    name = cfg.proc_name or cfg.app or "-"
    setproctitle(f"tiamat: {role} [{name}]")


def run_child(slot: int, build: Callable[[], Worker], what: str) -> NoReturn:
    """The envelope of a newly forked worker process, shared by the master's fork and the
    mold's (refork): ``build`` does what is particular to the fork (closing the parent's fds,
    loading the app, waiting to be adopted) and returns the worker, which then runs in
    :func:`worker_main`.  A failure before that is logged as ``what`` failed and exits 1; the
    process never returns into the forking code's stack."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)  # the parent's wakeup pipe is not ours to write
        os.environ["TIAMAT_WORKER_ID"] = str(slot)
        random.seed()  # not the parent's random sequence
        worker_main(build())
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        log.exception("%s failed before booting", what)
    os._exit(code)


def worker_main(worker: Worker) -> None:
    """Run a worker in the forked child and exit the process; never returns."""
    global current
    current = worker
    code = EXIT_OK
    try:
        try:
            worker.boot()
        except apploader.AppLoadError as exc:
            # the master prints the one line (once, however many workers fail) and exits 4
            worker.channel.send("boot_error", EXIT_APP_LOAD_ERROR, str(exc), exc.details)
            code = EXIT_APP_LOAD_ERROR
            return
        except Exception as exc:
            text = f"worker {worker.slot} failed to boot: {type(exc).__name__}: {exc}"
            log.error("%s", text)
            log.debug("%s", traceback.format_exc().rstrip())
            worker.channel.send("boot_error", EXIT_BOOT_ERROR, text)
            code = EXIT_BOOT_ERROR
            return
        memory.freeze_startup_objects()  # the app's objects (see tiamat.memory)
        memory.resume_collector()
        try:
            worker.run()
            if worker.mold_request is not None:
                from tiamat import refork

                refork.run_mold(worker)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            log.exception("worker %s crashed", worker.slot)
            code = 1
        hooks.call(worker.cfg, "worker_exit", worker.server, worker)
    finally:
        _flush_and_exit(code)

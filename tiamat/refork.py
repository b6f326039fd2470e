"""Reforking: a warm worker becomes the *mold* and the next generation is forked from it.

Why: a worker that has served some traffic holds everything the app builds lazily (imported
modules, compiled templates, URL resolvers, caches).  Forked from the master, every worker
builds its own private copy of all that.  Forked from a warm worker, the workers share it
copy-on-write.  (Shopify's Pitchfork does this for Ruby.)

How (``--refork-after N[,M,...]``):

* The master sets ``PR_SET_CHILD_SUBREAPER`` on itself, so processes forked below it whose
  parent exits are reparented to the master, not to init.
* Once a worker of the current generation has served N requests, the master sends it
  ``("mold", generation)``.  The worker finishes what it is doing, stops accepting, freezes
  the GC and answers ``("molded", pid)``; from then on it serves nothing and only forks.
  The master moves it out of its slot (to ``MOLD_SLOT``), so the slot gets a new worker.
* To fork a worker, the master creates the worker's channel (a socketpair), sends one end to
  the mold with SCM_RIGHTS together with ``("spawn", slot, generation, token, record)``, and waits
  (a few milliseconds) for ``("spawned", token, pid)``.  The mold double-forks: the middle
  process exits at once, so the new worker is reparented to the master, which reaps it,
  signals it and watches it like any worker (slots, scoreboard, timeouts, max-requests).
* Old-generation workers are then replaced one at a time, each only once every slot again
  has a booted worker; each successor is forked by the mold, and the old worker goes once
  its successor is ready.  The next generation uses the next number in the list (N, then
  M, ...).  After the last one no new mold is made; without --preload the mold stays, to
  fork warm replacements (max-requests, crashes, memory); with --preload it is retired once
  its generation is complete: the master holds the app, so the workers it forks share most
  of it anyway, and the mold's own memory is saved.

Where the subreaper cannot be set (not Linux, no prctl) workers are forked from the master
as usual and the log says so.  A HUP reload drops the mold (it holds the old code).
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
import select
import socket
import time
from typing import TYPE_CHECKING, Any

from tiamat import logs, memory
from tiamat.channel import MAX_MESSAGE, Channel
from tiamat.sockets import dup_listener

if TYPE_CHECKING:
    from tiamat.master import MasterState, WorkerProc
    from tiamat.scoreboard import Scoreboard
    from tiamat.workers.base import Worker

log = logging.getLogger("tiamat.error")

#: the slot number of a mold: outside 0..workers-1, so the master neither fills nor retires it
MOLD_SLOT = -1
#: how long the master waits for the mold to report a forked worker's pid
SPAWN_TIMEOUT = 5.0
#: the scoreboard made by the master; forked workers (and so the mold) inherit this reference
_board: Scoreboard | None = None


def parse_thresholds(text: Any) -> list[int]:
    """``"50"`` or ``"50,100,1000"`` -> ``[50, 100, 1000]``; ValueError for anything else."""
    if text is None:
        return []
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)
    if not isinstance(text, str):
        raise ValueError(f"expected N[,M,...], got {text!r}")
    if not text.strip():
        return []
    result = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise ValueError(f"expected N[,M,...] with request counts of at least 1, got {text!r}")
        result.append(int(part))
    return result


def set_subreaper() -> str | None:
    """Make this process the subreaper of its descendants; None on success, else why not."""
    from tiamat import prctl  # here, not at the top: only --refork-after needs ctypes

    call = prctl.load()
    if isinstance(call, str):
        return call
    if call(prctl.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        import ctypes

        return f"prctl(PR_SET_CHILD_SUBREAPER) failed: {os.strerror(ctypes.get_errno())}"
    return None


# --- master side -------------------------------------------------------------------------
class ReforkState:
    """The master's view of reforking (a plain class: see tiamat.settings.Setting)."""

    #: the generation workers are forked into now (0: forked from the master)
    generation: int = 0
    #: index in ``thresholds`` of the next promotion
    index: int = 0
    mold: WorkerProc | None = None
    promoting: WorkerProc | None = None
    promote_deadline: float = 0.0
    token: int = 0
    #: True while old-generation workers are still being replaced
    replacing: bool = False

    def __init__(self, thresholds: list[int], reload_generation: int = 0) -> None:
        self.thresholds = thresholds
        #: the master's reload generation (HUP) the mold belongs to
        self.reload_generation = reload_generation
        #: refork generation of every worker pid the master forked
        self.gen_of: dict[int, int] = {}


def setup(state: MasterState) -> None:
    """Called once by the master before the first fork: thresholds, subreaper, fallback."""
    global _board
    state.refork = None
    thresholds = parse_thresholds(state.cfg.refork_after)
    if not thresholds:
        return
    why_not = set_subreaper()
    if why_not is not None:
        log.warning("refork-after: %s; workers are forked from the master instead", why_not)
        return
    _board = state.board
    state.refork = ReforkState(thresholds=thresholds, reload_generation=state.generation)
    log.info("Reforking after %s requests (the master is the subreaper of every worker)",
             ", ".join(map(str, thresholds)))


def _master() -> Any:
    from tiamat import master  # the master imports this module: import late

    return master


def step(state: MasterState) -> None:
    """One pass of the master loop: promote a mold, replace the old generation, notice losses."""
    rs = state.refork
    if rs is None or state.stopping:
        return
    _check_reload(state, rs)
    workers = state.workers
    if rs.mold is not None and rs.mold.pid not in workers:
        log.warning("The mold (pid %s) exited; forking workers from the master until the next refork",
                    rs.mold.pid)
        rs.mold = None
    if rs.promoting is not None:
        _check_promotion(state, rs)
        return
    if len(rs.gen_of) > 4 * len(workers) + 16:
        rs.gen_of = {pid: gen for pid, gen in rs.gen_of.items() if pid in workers}
    if rs.mold is not None and _replace_old(state, rs):
        return
    if rs.index < len(rs.thresholds):
        _maybe_promote(state, rs)


def _serving(state: MasterState) -> list[WorkerProc]:
    return [w for w in state.workers.values()
            if w.role == "worker" and w.stop_deadline is None]


def _replace_old(state: MasterState, rs: ReforkState) -> bool:
    """Replace one old-generation worker when the previous replacement is up; True while busy."""
    serving = _serving(state)
    old = [w for w in serving if rs.gen_of.get(w.pid, -1) < rs.generation
           and w.recycle != "granted"]
    if not old:
        if any(w.role == "worker" and rs.gen_of.get(w.pid, -1) < rs.generation
               for w in state.workers.values()):
            return True  # the last old one has not exited yet
        if rs.replacing:
            rs.replacing = False
            log.info("Refork: generation %s complete (every worker forked by the mold, pid %s)",
                     rs.generation, rs.mold.pid if rs.mold else "?")
            if rs.index >= len(rs.thresholds) and state.app is not None and rs.mold is not None:
                # the last generation: with --preload the master holds the app, so workers it
                # forks share most of it anyway, and a whole process is saved (bench/memory.py)
                log.info("Refork: no further generation; retiring the mold (pid %s), replacements "
                         "are forked from the master", rs.mold.pid)
                _master().retire(state, rs.mold, "refork-done")
                rs.mold = None
        return False
    rs.replacing = True
    if memory.replacement_pending(state):
        return True  # one at a time
    victim = min(old, key=lambda w: (rs.gen_of.get(w.pid, -1), w.slot))
    log.info("Refork: replacing worker %s (pid %s, generation %s) with one of generation %s",
             victim.slot, victim.pid, rs.gen_of.get(victim.pid, 0), rs.generation)
    memory.replace(state, victim, "refork")
    return True


def _maybe_promote(state: MasterState, rs: ReforkState) -> None:
    threshold = rs.thresholds[rs.index]
    best: WorkerProc | None = None
    best_count = -1
    for worker in _serving(state):
        if (not worker.booted or rs.gen_of.get(worker.pid, -1) != rs.generation
                or worker.recycle is not None):
            continue
        count = state.board.read(worker.board_index).requests
        if count >= threshold and count > best_count:
            best, best_count = worker, count
    if best is None:
        return
    if not best.channel.send("mold", rs.generation + 1):
        return
    rs.promoting = best
    cfg = state.cfg
    rs.promote_deadline = time.monotonic() + max(cfg.timeout or 0.0, cfg.graceful_timeout or 0.0) + 5.0
    log.info("Refork: worker %s (pid %s) served %s requests; promoting it to mold of generation %s",
             best.slot, best.pid, best_count, rs.generation + 1)


def _check_promotion(state: MasterState, rs: ReforkState) -> None:
    worker = rs.promoting
    assert worker is not None
    if worker.pid not in state.workers or worker.stop_deadline is not None:
        log.info("Refork: worker %s (pid %s) stopped before becoming the mold", worker.slot, worker.pid)
        rs.promoting = None
    elif time.monotonic() > rs.promote_deadline:
        log.error("Refork: worker %s (pid %s) did not become the mold in time; killing it and "
                  "turning reforking off", worker.slot, worker.pid)
        rs.promoting = None
        rs.index = len(rs.thresholds)
        _master().kill_worker(state, worker, "refork-timeout")


def on_message(state: MasterState, worker: WorkerProc, message: tuple[Any, ...]) -> None:
    """``("molded", pid)``: the promoted worker now waits for spawn requests."""
    rs = state.refork
    if rs is None or message[0] != "molded" or rs.promoting is not worker:
        return
    rs.promoting = None
    old_mold = rs.mold
    worker.slot = MOLD_SLOT  # its serving slot is free for a worker of the new generation
    worker.role = "mold"
    if worker.recycle is not None:
        worker.recycle = None  # a max-requests recycle asked for just before: moot, it serves no more
    rs.mold = worker
    rs.generation += 1
    rs.index += 1
    rs.gen_of[worker.pid] = rs.generation
    log.info("Refork: pid %s is the mold of generation %s", worker.pid, rs.generation)
    if old_mold is not None and old_mold.pid in state.workers:
        _master().retire(state, old_mold, "refork")


def _check_reload(state: MasterState, rs: ReforkState) -> None:
    """After a reload (HUP) the mold holds stale code: drop it and start the cycle again."""
    if state.generation == rs.reload_generation:
        return
    rs.reload_generation = state.generation
    rs.index = 0
    rs.generation += 1
    rs.replacing = False
    for worker in (rs.mold, rs.promoting):
        if worker is not None and worker.pid in state.workers and worker.stop_deadline is None:
            _master().retire(state, worker, "reload")  # a mold serves nobody: no successor needed
    rs.mold = rs.promoting = None


def fork(state: MasterState, info: WorkerProc, child_end: Channel) -> int:
    """Fork the worker ``info`` describes: through the mold when there is one, else ``os.fork()``.

    Returns like ``os.fork()`` (0 in a child forked here); raises OSError when the mold
    failed, after which the master retries the slot later (from the master if the mold died).
    """
    rs = state.refork
    if rs is None:
        return os.fork()
    _check_reload(state, rs)
    mold = rs.mold
    if mold is None or mold.pid not in state.workers or mold.stop_deadline is not None:
        pid = os.fork()
        if pid:
            rs.gen_of[pid] = rs.generation
        return pid
    slot = info.slot
    record = info.board_index
    rs.token += 1
    data = pickle.dumps(("spawn", slot, rs.generation, rs.token, record),
                        protocol=pickle.HIGHEST_PROTOCOL)
    try:
        socket.send_fds(mold.channel.sock, [data], [child_end.fileno()])
    except OSError as exc:
        log.error("Refork: cannot reach the mold (pid %s): %s; killing it", mold.pid, exc)
        _lose_mold(state, rs)
        pid = os.fork()
        if pid:
            rs.gen_of[pid] = rs.generation
        return pid
    pid = _await_spawned(state, mold, rs.token)
    rs.gen_of[pid] = rs.generation
    log.info("Refork: worker %s (pid %s) of generation %s forked by the mold (pid %s)",
             slot, pid, rs.generation, mold.pid)
    return pid


def _await_spawned(state: MasterState, mold: WorkerProc, token: int) -> int:
    deadline = time.monotonic() + SPAWN_TIMEOUT
    sock = mold.channel.sock
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            select.select([sock], [], [], remaining)
        except InterruptedError:
            continue
        messages = mold.channel.receive()
        if messages is None:
            break
        for message in messages:
            if message[0] == "spawned" and message[1] == token:
                return int(message[2])
            if message[0] == "spawn_failed" and message[1] == token:
                raise OSError(f"the mold (pid {mold.pid}) could not fork: {message[2]}")
    rs = state.refork
    assert rs is not None
    _lose_mold(state, rs)
    raise OSError(f"the mold (pid {mold.pid}) did not fork a worker in time; killed it")


def _lose_mold(state: MasterState, rs: ReforkState) -> None:
    if rs.mold is not None:
        _master().kill_worker(state, rs.mold, "mold-failed")
    rs.mold = None


# --- the mold ----------------------------------------------------------------------------
def promoted(worker: Worker, message: tuple[Any, ...]) -> None:
    """In the worker, on ``("mold", generation)``: stop serving; ``run_mold`` follows.

    The listening sockets are duplicated first: the worker closes its own when it stops
    accepting, and the generation forked from the mold needs them.
    """
    if worker.mold_request is not None:
        return
    try:
        kept = [dup_listener(sock) for sock in worker.listeners]
    except (OSError, NotImplementedError) as exc:
        log.error("worker %s cannot become the mold: %s", worker.slot, exc)
        return
    worker.mold_request = message
    worker.mold_listeners = kept
    worker.alive = False


def run_mold(worker: Worker) -> None:
    """The promoted worker's life from now on: fork workers on request until told to stop.

    Called by ``worker_main`` once ``run()`` returned after a ``mold`` request; the worker
    has stopped accepting and closed its connections.  Returning ends the process.
    """
    request = worker.mold_request
    assert request is not None
    generation = request[1]
    worker.listeners = worker.mold_listeners
    loop = getattr(worker, "loop", None)  # an asyncio worker's loop: the next ones make their own
    if loop is not None and hasattr(loop, "close") and not loop.is_closed():
        loop.close()
    worker.board.ready(time.monotonic())  # its own record: idle, beating, serving nothing
    worker.alive = True
    worker.quick = False
    from tiamat.workers.base import set_title

    set_title(f"mold (generation {generation})", worker.cfg)
    if worker.cfg.gc_freeze:
        gc.collect()
        gc.freeze()  # what the warm worker built is shared by the generation forked from it
        memory.trim_malloc()
    if not worker.channel.send("molded", os.getpid()):
        return
    log.info("worker %s (pid %s) is now the mold of generation %s", worker.slot, os.getpid(), generation)
    sock = worker.channel.sock
    while worker.alive:
        try:
            ready, _, _ = select.select([sock, worker.wake_fd], [], [], 1.0)
        except InterruptedError:
            continue
        worker.beat()
        if worker.wake_fd in ready:
            worker.handle_wakeup()
        if sock in ready and not _serve_requests(worker):
            if worker.alive:
                log.warning("mold (pid %s): lost the master; exiting", os.getpid())
            return


def _serve_requests(worker: Worker) -> bool:
    """Handle every message from the master; False once the master is gone."""
    sock = worker.channel.sock
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 4)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        if not data:
            _close_all(fds)
            return False
        try:
            message = pickle.loads(data)
        except Exception:
            _close_all(fds)
            continue
        kind = message[0]
        if kind == "spawn":
            _spawn(worker, message, fds)
            continue
        _close_all(fds)
        if kind == "stop":
            worker.alive = False
        elif kind == "reopen_logs":
            logs.reopen()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _spawn(mold: Worker, message: tuple[Any, ...], fds: list[int]) -> None:
    """Double-fork one worker; the middle process exits so the master adopts the worker."""
    _, slot, generation, token, record = message[:5]
    if len(fds) != 1:
        _close_all(fds)
        mold.channel.send("spawn_failed", token, "no channel was passed")
        return
    fd = fds[0]
    for handler in logging.getLogger("tiamat.error").handlers:
        handler.flush()
    r, w = os.pipe()
    try:
        middle = os.fork()
    except OSError as exc:
        _close_all([fd, r, w])
        mold.channel.send("spawn_failed", token, str(exc))
        return
    if middle == 0:
        os.close(r)
        try:
            pid = os.fork()
            if pid == 0:
                os.close(w)
                _become_worker(mold, slot, generation, record, fd)
            os.write(w, pid.to_bytes(8, "little"))
        finally:
            os._exit(0)
    os.close(w)
    os.close(fd)
    data = b""
    while len(data) < 8:
        try:
            chunk = os.read(r, 8 - len(data))
        except InterruptedError:
            continue
        if not chunk:
            break
        data += chunk
    os.close(r)
    while True:
        try:
            os.waitpid(middle, 0)
            break
        except InterruptedError:
            continue
        except ChildProcessError:
            break
    if len(data) == 8:
        mold.channel.send("spawned", token, int.from_bytes(data, "little"))
    else:
        mold.channel.send("spawn_failed", token, "the intermediate process died")


def _become_worker(mold: Worker, slot: int, generation: int, record: int, fd: int) -> None:
    """In the new worker: drop the mold's ends, wait to be adopted, boot and serve; never returns."""
    from tiamat.workers.base import run_child

    run_child(slot, lambda: _build_worker(mold, slot, generation, record, fd),
              f"worker {slot} (forked by the mold)")


def _build_worker(mold: Worker, slot: int, generation: int, record: int, fd: int) -> Worker:
    _close_all([mold.wake_fd, mold._wake_w])
    mold.channel.close()
    deadline = time.monotonic() + 5.0
    while os.getppid() != mold.master_pid:  # the middle process exits at once
        if time.monotonic() > deadline:
            raise RuntimeError("was not adopted by the master")
        time.sleep(0.001)
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    assert _board is not None
    _board.reset(record, os.getpid(), time.monotonic())
    worker = type(mold)(slot=slot, cfg=mold.cfg, listeners=mold.listeners, channel=Channel(sock),
                        board=_board.writer(record), app=mold.app, master_pid=mold.master_pid,
                        generation=mold.generation)
    worker.refork_generation = generation
    return worker

"""Process memory: RSS/PSS/USS readers, and the ``--max-worker-memory`` policy.

Readers (Linux ``/proc``; used by the policy, ``bench/memory.py`` and the tests):

* RSS: pages resident in the process, shared ones counted in full (what ``ps`` shows and
  what ``--max-worker-memory`` limits: it is cheap to read, from ``/proc/PID/statm``).
* PSS: each shared page divided by the number of processes sharing it; summed over the
  master and its workers it is the memory the server really costs.
* USS: pages only this process maps (private clean + private dirty): what is freed when
  the worker exits.

Policy: once a second the master reads each serving worker's RSS; a worker above the limit
is replaced, gracefully (it finishes its current request), after a random delay of up to
``JITTER`` seconds, and one at a time: the next one only once every slot again has a booted
worker, so workers that grow together do not all restart together.
"""

from __future__ import annotations

import gc
import logging
import os
import random
import time
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from tiamat.master import MasterState, WorkerProc

log = logging.getLogger("tiamat.error")

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
MB = 1024 * 1024
#: seconds between two RSS checks by the master
CHECK_INTERVAL = 1.0
#: up to this many seconds between finding a worker over the limit and retiring it
JITTER = 2.0


# --- readers -----------------------------------------------------------------------------
def rss(pid: int) -> int | None:
    """Resident set size in bytes, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


def rollup(pid: int) -> dict[str, int] | None:
    """The fields of ``/proc/PID/smaps_rollup`` in bytes (``Rss``, ``Pss``, ``Private_Dirty``
    ...), summed from ``/proc/PID/smaps`` on kernels without the rollup; None if gone."""
    for name in ("smaps_rollup", "smaps"):
        try:
            with open(f"/proc/{pid}/{name}", "rb") as f:
                text = f.read()
        except FileNotFoundError:
            if name == "smaps_rollup" and os.path.exists(f"/proc/{pid}"):
                continue
            return None
        except (ProcessLookupError, PermissionError, OSError):
            return None
        fields: dict[str, int] = {}
        for line in text.splitlines():
            key, sep, rest = line.partition(b":")
            parts = rest.split()
            if not sep or len(parts) != 2 or parts[1] != b"kB":
                continue
            name_ = key.decode("ascii", "replace")
            fields[name_] = fields.get(name_, 0) + int(parts[0]) * 1024
        return fields
    return None


class Usage(NamedTuple):
    """One process's memory, in bytes."""

    pid: int
    rss: int
    pss: int
    uss: int

    @classmethod
    def of(cls, pid: int) -> Usage | None:
        fields = rollup(pid)
        if fields is None:
            return None
        uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
        return cls(pid, fields.get("Rss", 0), fields.get("Pss", 0), uss)


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (every thread's list), from /proc."""
    result: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return result
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                result.extend(int(p) for p in f.read().split())
        except (OSError, ValueError):
            continue
    return result


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, parents before their children."""
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children(todo.pop(0)):
            if child not in found:
                found.append(child)
                todo.append(child)
    return found


# --- sharing with the workers -----------------------------------------------------------
#: The cyclic collector's start-up pause, as the gc module's docs advise for a pre-fork
#: server (collector off early in the parent, ``gc.freeze()`` right before ``fork()``): the
#: ``tiamat`` command (:func:`tiamat.__main__.main`) pauses it before importing anything,
#: and the master resumes it once it has forked its first worker; each worker pauses it
#: again from its fork until its app is loaded, then freezes what the load built.
#: Start-up builds little garbage (about 640 objects for the Flask example), yet the
#: collector ran dozens of times over the growing heap: about 35 M of the 670 M instructions
#: from the command's start to a Flask worker's first answer (valgrind).  Frozen, the
#: master's and the app's objects are never visited by a worker's collections, so those
#: pages are not written (the master's stay shared) and cost no collection time.
#: The pause sets the first generation's threshold to 0 (no automatic collection) rather
#: than calling ``gc.disable()``, so an app that disables the collector, or sets its own
#: thresholds, while it is imported keeps its choice.  ``--no-gc-freeze`` turns it all off.
#: (The threshold to restore; 0 when there is no pause.)
_resume_threshold = 0


def pause_collector(threshold: int | None = None) -> None:
    """Start the pause; ``threshold`` is the one to restore, if it was already set to 0."""
    global _resume_threshold
    current = gc.get_threshold()[0] if threshold is None else threshold
    if current and not _resume_threshold:
        _resume_threshold = current
        gc.set_threshold(0)


def freeze_startup_objects() -> None:
    """While the pause lasts: move every object so far to the permanent generation.  The
    master calls it right before forking its first worker, a worker once its app is loaded
    (before its first request)."""
    if _resume_threshold:
        gc.freeze()


def resume_collector() -> None:
    """End the pause (a no-op when there is none)."""
    global _resume_threshold
    if _resume_threshold:
        if gc.get_threshold()[0] == 0:  # (thresholds the app set itself stay)
            gc.set_threshold(_resume_threshold)
        _resume_threshold = 0


def preimport_worker_modules() -> None:
    """Import the sync worker's modules (httptools, the HTTP core ...) in the master.

    Without --preload and with ``-k auto`` the worker class is only known once a worker
    has loaded the app, so every worker would import it after the fork, each keeping a
    private copy; imported here, they are shared.  ``ssl`` is not among them any more: the
    sync worker imports it only with --certfile (a plain server loads no OpenSSL at all), so
    with TLS and without --preload each worker has its own copy.
    """
    import importlib

    try:
        importlib.import_module("tiamat.workers.sync")
    except ImportError as exc:  # pragma: no cover - a broken install shows up elsewhere
        log.debug("could not preimport the sync worker: %s", exc)


def trim_malloc() -> None:
    """Give the C heap's free pages back to the kernel (glibc ``malloc_trim(0)``).

    Called right after ``gc.collect()`` + ``gc.freeze()`` in a process that is about to be
    forked from (the --preload master, the refork mold): the collection freed the import
    and warm-up garbage, but glibc keeps those pages resident, so each of them would be
    counted in the parent and copied into a child as soon as either allocates there.
    Released, they cost nothing until reused (about 2 MB less total PSS for 4 Flask
    workers, see docs/memory.md).  A no-op where glibc is not the C library.
    """
    global _malloc_trim
    if _malloc_trim is None:
        _malloc_trim = _find_malloc_trim()
    if _malloc_trim is not False:
        _malloc_trim(0)


_malloc_trim: Any = None


def _find_malloc_trim() -> Any:
    try:
        import ctypes

        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, ImportError):
        return False


# --- the master's policy -----------------------------------------------------------------
class MemoryPolicy:
    """The --max-worker-memory state (a plain class: see tiamat.settings.Setting)."""

    next_check: float = 0.0

    def __init__(self, limit: int) -> None:
        self.limit = limit
        #: pid -> the time at which a worker found over the limit gets retired
        self.due: dict[int, float] = {}


def setup(state: MasterState) -> None:
    """Called once by the master before the first fork: shared imports, the memory policy."""
    if state.worker_class is None:
        preimport_worker_modules()
    if not state.cfg.gc_freeze:
        resume_collector()
    limit = int(state.cfg.max_worker_memory or 0)
    state.memory = MemoryPolicy(limit=limit * MB) if limit > 0 else None
    if limit > 0:
        log.info("Replacing workers whose RSS exceeds %s MB", limit)


def step(state: MasterState) -> None:
    """One pass of the master loop: retire at most one worker that grew past the limit."""
    policy: MemoryPolicy | None = state.memory
    if policy is None or state.stopping:
        return
    now = time.monotonic()
    if now < policy.next_check:
        return
    policy.next_check = now + CHECK_INTERVAL
    serving = [w for w in state.workers.values() if w.role == "worker"
               and w.stop_deadline is None and w.booted and w.recycle != "granted"]
    sizes: dict[int, int] = {}
    for worker in serving:
        size = rss(worker.pid)
        if size is not None and size > policy.limit:
            sizes[worker.pid] = size
            policy.due.setdefault(worker.pid, now + random.uniform(0.0, JITTER))
    policy.due = {pid: when for pid, when in policy.due.items() if pid in sizes}
    if replacement_pending(state):
        return  # one at a time
    ripe = [w for w in serving if policy.due.get(w.pid, now + 1) <= now]
    if not ripe:
        return
    worker = min(ripe, key=lambda w: policy.due[w.pid])
    del policy.due[worker.pid]
    log.warning("Worker %s (pid %s) uses %.0f MB, above max_worker_memory (%.0f MB); replacing it",
                worker.slot, worker.pid, sizes[worker.pid] / MB, policy.limit / MB)
    replace(state, worker, "memory")


def replacement_pending(state: MasterState) -> bool:
    """True while a replacement is under way: a worker granted one, one still stopping, or a
    slot without a booted worker (so replacements happen one at a time)."""
    serving = 0
    for w in state.workers.values():
        if w.role != "worker":
            continue
        if w.recycle == "granted" or w.stop_deadline is not None:
            return True
        serving += w.booted
    return serving < state.target


def replace(state: MasterState, worker: WorkerProc, reason: str) -> None:
    """Replace ``worker`` gracefully: it finishes its current request.  Its successor is
    forked first and the worker is retired once that one is ready (the master's
    readiness-gated replacement, shared with max-requests)."""
    from tiamat import master  # the master imports this module: import late

    master.grant_replacement(worker, reason)

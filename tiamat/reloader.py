"""``--reload``: replace the workers when source files change (development only).

One watcher per server, in the master: a daemon thread runs ``watchfiles.watch`` (inotify
through Rust; the thread sleeps in native code) and, when a relevant file changes, writes a
byte to a pipe that the master's selector watches.  The master's loop then replaces every
worker the same way HUP does, so the new workers import the changed code.

Watched: the working directory (and the app file's directory when the app is given as a
path) recursively, plus every ``--reload-extra-file``.  A change counts when the file ends
in ``.py``, matches a ``--reload-include`` glob, or is an extra file — unless it matches a
``--reload-exclude`` glob.  watchfiles' default filter already skips ``__pycache__``,
``.git``, virtualenvs and editor swap files.  With ``--preload`` the app lives in the
master, and HUP (hence a change) re-executes the master, which loads the new code.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger("tiamat.error")


class ReloadError(Exception):
    """--reload cannot work here (watchfiles is not installed)."""


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def watch_roots(cfg: Any, cwd: str | None = None) -> list[str]:
    """What to watch: directories (recursively; none inside another), then each extra
    file that lies outside them (watched on its own, not its whole directory)."""
    roots = [os.path.abspath(cwd or os.getcwd())]
    app = str(cfg.app or "")
    app_path = app.rsplit(":", 1)[0] if app.startswith(("/", ".")) else app.split(":", 1)[0]
    if app_path.endswith(".py"):
        roots.append(os.path.dirname(os.path.abspath(app_path)))
    kept: list[str] = []
    for root in sorted(set(roots), key=len):
        if not any(_inside(root, k) for k in kept):
            kept.append(root)
    for extra in cfg.reload_extra_files:
        path = os.path.abspath(extra)
        if not any(_inside(path, k) for k in kept) and path not in kept:
            kept.append(path)
    return kept


class Rules:
    """Which changed paths trigger a reload."""

    def __init__(self, extra_files: Iterable[str], include: Iterable[str],
                 exclude: Iterable[str]) -> None:
        self.extra = {os.path.abspath(p) for p in extra_files}
        self.include = list(include)
        self.exclude = list(exclude)

    @staticmethod
    def _match(path: str, patterns: list[str]) -> bool:
        name = os.path.basename(path)
        return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(path, p) for p in patterns)

    def relevant(self, path: str) -> bool:
        path = os.path.abspath(path)
        if path in self.extra:
            return True
        if self._match(path, self.exclude):
            return False
        return path.endswith(".py") or self._match(path, self.include)


class Reloader:
    """The watcher thread and the pipe that wakes the master."""

    def __init__(self, cfg: Any) -> None:
        try:
            import watchfiles
        except ImportError:
            raise ReloadError("--reload needs watchfiles: pip install 'tiamat[reload]'") from None
        self._watchfiles = watchfiles
        self.rules = Rules(cfg.reload_extra_files, cfg.reload_include, cfg.reload_exclude)
        self.roots = watch_roots(cfg)
        self.extra_files = [os.path.abspath(p) for p in cfg.reload_extra_files]
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.changed: list[str] = []
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="tiamat-reloader", daemon=True)

    def start(self) -> None:
        self.thread.start()
        # the first change after start-up must not be missed: wait for the watcher to be set up
        self.ready.wait(5.0)
        log.info("Reloader watching %s", ", ".join(self.roots))

    def _watch(self) -> None:
        rules = self.rules
        watchfiles = self._watchfiles

        class _Filter(watchfiles.DefaultFilter):  # type: ignore[misc, name-defined]
            def __call__(self, change: Any, path: str) -> bool:
                if os.path.abspath(path) in rules.extra:
                    return True
                return bool(super().__call__(change, path)) and rules.relevant(path)

        existing = [p for p in self.roots if os.path.exists(p)]
        try:
            for changes in watchfiles.watch(*existing, watch_filter=_Filter(),
                                            stop_event=self.stop_event, debounce=200, step=50,
                                            yield_on_timeout=True, rust_timeout=500,
                                            raise_interrupt=False):
                self.ready.set()
                if not changes:
                    continue
                with self.lock:
                    self.changed.extend(sorted({path for _, path in changes}))
                with contextlib.suppress(OSError):
                    os.write(self.write_fd, b"!")
        except Exception:
            log.exception("the reloader stopped")
        finally:
            self.ready.set()

    def take_changes(self) -> list[str]:
        """The paths changed since the last call (empty if none)."""
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while os.read(self.read_fd, 4096):
                pass
        with self.lock:
            changed, self.changed = self.changed, []
        return changed

    def close(self) -> None:
        self.stop_event.set()
        self.thread.join(2.0)
        for fd in (self.read_fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def describe(paths: list[str], cwd: str | None = None) -> str:
    base = Path(cwd or os.getcwd())
    shown = []
    for path in paths[:5]:
        try:
            shown.append(str(Path(path).relative_to(base)))
        except ValueError:
            shown.append(path)
    more = f" and {len(paths) - 5} more" if len(paths) > 5 else ""
    return ", ".join(shown) + more

"""Error and access logging through the standard library.

The error log (``tiamat.error``) goes to stderr or ``--error-logfile`` with time, pid and
level.  The access log (``tiamat.access``) is off unless ``--access-logfile`` is given; when
it is off, workers skip building the line altogether (the line itself is built by
:mod:`tiamat.accesslog`).  :func:`reopen` (USR1) reopens every
file handler so logrotate can move the files away.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

ERROR_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S %z"

error_log = logging.getLogger("tiamat.error")
access_log = logging.getLogger("tiamat.access")


class ReopenableFileHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A file handler that can reopen its file in place (after logrotate moved it)."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        super().__init__(open(self.path, "a", buffering=1, encoding="utf-8"))  # noqa: SIM115

    def reopen(self) -> None:
        self.acquire()
        try:
            old = self.stream
            self.stream = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
            old.close()
        finally:
            self.release()

    def close(self) -> None:
        self.acquire()
        try:
            if self.stream and not self.stream.closed:
                self.stream.close()
        finally:
            self.release()
        super().close()


def _handler(target: str) -> logging.Handler:
    if target == "-":
        return logging.StreamHandler(sys.stderr)
    return ReopenableFileHandler(target)


def setup(cfg: Any) -> None:
    """Configure both loggers from the settings (called in the master and again after fork)."""
    for logger in (error_log, access_log):
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
        logger.propagate = False
    error_handler = _handler(cfg.errorlog or "-")
    error_handler.setFormatter(logging.Formatter(ERROR_FORMAT, DATE_FORMAT))
    error_log.addHandler(error_handler)
    error_log.setLevel(cfg.loglevel.upper())
    if cfg.accesslog:
        access_handler = _handler(cfg.accesslog)
        access_handler.setFormatter(logging.Formatter("%(message)s"))
        access_log.addHandler(access_handler)
        access_log.setLevel(logging.INFO)
    else:
        access_log.setLevel(logging.CRITICAL + 1)
    # a user's dictConfig adds to tiamat's loggers; it must not silence the ones it omits
    # (logging.config is imported only then: ~6 ms of every start otherwise)
    if cfg.logconfig_dict or cfg.logconfig:
        from logging.config import dictConfig
    if cfg.logconfig_dict:
        dictConfig({"disable_existing_loggers": False, **cfg.logconfig_dict})
    if cfg.logconfig:
        dictConfig({"disable_existing_loggers": False,
                    **_read_logconfig(cfg.logconfig)})


def _read_logconfig(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json") or text.lstrip().startswith("{"):
        return json.loads(text)
    namespace: dict[str, Any] = {}
    exec(compile(text, path, "exec"), namespace)
    config = namespace.get("LOGGING") or namespace.get("logconfig_dict")
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected JSON, or Python defining LOGGING = {{...}}")
    return config


def reopen() -> None:
    """Reopen every reopenable file handler (USR1)."""
    for logger in (logging.getLogger(), *[logging.getLogger(n) for n in
                                          list(logging.root.manager.loggerDict)]):
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, ReopenableFileHandler):
                handler.reopen()
            elif isinstance(handler, logging.FileHandler):
                handler.acquire()
                try:
                    handler.close()
                    handler.stream = handler._open()
                finally:
                    handler.release()


class ErrorStream:
    """``wsgi.errors``: what an app writes there lands where the error log goes.

    It looks the stream up at each write, so it follows ``--error-logfile`` and survives a
    USR1 reopen; without a stream handler (a dictConfig sending the log elsewhere) it falls
    back to stderr.
    """

    __slots__ = ()

    @staticmethod
    def _stream() -> Any:
        for handler in error_log.handlers:
            stream = getattr(handler, "stream", None)
            if stream is not None and not getattr(stream, "closed", False):
                return stream
        return sys.stderr

    def write(self, text: str) -> int:
        return self._stream().write(text)

    def writelines(self, lines: Any) -> None:
        stream = self._stream()
        for line in lines:
            stream.write(line)

    def flush(self) -> None:
        self._stream().flush()


error_stream = ErrorStream()


def access_enabled() -> bool:
    return access_log.isEnabledFor(logging.INFO)


"""tiamat's one HTTP/1.1 core: request reading (h1), response framing (response), errors.

Every worker class uses these modules; none of them performs I/O.  Workers create their
per-connection request readers through :func:`reader_factory`, so ``--http`` (httptools or
h11) is decided here, once, and every worker class gets identical verdicts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tiamat.http.h1 import Limits, RequestReader


def reader_class(cfg: Any) -> type[RequestReader]:
    """The reader class ``--http`` selects: llhttp (auto, httptools) or h11's grammar."""
    if getattr(cfg, "http", "auto") == "h11":
        from tiamat.http.h11_reader import H11RequestReader

        return H11RequestReader
    return RequestReader


def reader_factory(cfg: Any) -> Callable[[], RequestReader]:
    """A zero-argument callable that makes a new request reader for one connection."""
    limits = Limits.from_config(cfg)
    cls = reader_class(cfg)
    return lambda: cls(limits)

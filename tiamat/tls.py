"""TLS: one ``ssl.SSLContext`` per worker, built from the settings.

``--certfile``/``--keyfile`` turn TLS on for every listener; ``--ca-certs`` and
``--cert-reqs`` (0 none, 1 optional, 2 required) verify client certificates; ``--ciphers``
replaces OpenSSL's default list.  TLS 1.2 is the minimum, always.  A config file may define
the ``ssl_context(config, default_factory)`` hook to adjust or replace the context:
``default_factory()`` returns the context tiamat would have used.

The context is built once, when the worker starts serving (so a certificate renewed on
disk is picked up by the next generation of workers, after HUP), never per connection.
"""

from __future__ import annotations

import ssl
from typing import Any

from tiamat import hooks

_CERT_REQS = {0: ssl.CERT_NONE, 1: ssl.CERT_OPTIONAL, 2: ssl.CERT_REQUIRED}


def enabled(cfg: Any) -> bool:
    return bool(getattr(cfg, "certfile", None))


def default_context(cfg: Any) -> ssl.SSLContext:
    """The server context the settings describe."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cfg.certfile, cfg.keyfile or None)
    context.verify_mode = _CERT_REQS.get(cfg.cert_reqs, ssl.CERT_NONE)
    if cfg.ca_certs:
        context.load_verify_locations(cafile=cfg.ca_certs)
    if cfg.ciphers:
        context.set_ciphers(cfg.ciphers)
    context.set_alpn_protocols(["http/1.1"])
    return context


def server_context(cfg: Any) -> ssl.SSLContext | None:
    """The context for this worker (None without ``--certfile``); honours ``ssl_context``."""
    if not enabled(cfg):
        return None
    if getattr(cfg, "ssl_context", None) is not None:
        context = hooks.call(cfg, "ssl_context", cfg, lambda: default_context(cfg))
        if isinstance(context, ssl.SSLContext):
            return context
    return default_context(cfg)

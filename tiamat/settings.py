"""The one table of tiamat's settings.

Every setting is spelled out exactly once, here.  The click command (``tiamat.cli``),
the config-file reader and the environment reader (``tiamat.config``), ``--print-config``
and ``docs/settings.md`` (``tiamat.settings_doc``) are all generated from ``SETTINGS``.

Names follow gunicorn wherever gunicorn has the same setting, so that a gunicorn command
line or config file works unchanged; ``aliases`` carries the original tiamat's config keys
(``listen_port``, ``daemonize``, ``before_fork`` ...) and other spellings users bring along.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

#: Kinds of value a setting can hold; ``tiamat.config`` knows how to coerce each of them.
KINDS = ("int", "float", "bool", "str", "list", "choice", "callable", "dict", "size")


class Setting(NamedTuple):
    """One configurable knob: its name, how it is spelled everywhere, and what it accepts.

    (Immutable records here and elsewhere on the start path are NamedTuples or plain
    classes, not dataclasses: generating a dataclass's methods execs new source at import,
    3-5 M instructions a class, which every ``tiamat`` start paid ten times over.)
    """

    name: str
    section: str
    kind: str
    default: Any
    help: str
    flags: tuple[str, ...] = ()
    #: for ``bool`` settings, flags that switch the setting off (``--no-sendfile``)
    off_flags: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    metavar: str | None = None
    #: computes the default from the environment (``$WEB_CONCURRENCY``, ``$PORT``)
    dynamic_default: Callable[[Mapping[str, str]], Any] | None = None
    #: shown in the docs when the default is computed
    default_doc: str | None = None
    #: False for settings that make no sense as an environment variable (hooks, ``config``)
    from_env: bool = True
    #: False for settings that only the command line can give (``config``, ``print_config``)
    in_file: bool = True
    #: for ``list`` settings: each item may itself be a comma-separated list (IP lists)
    split_items: bool = False

    @property
    def env_var(self) -> str:
        return "TIAMAT_" + self.name.upper()

    def default_for(self, environ: Mapping[str, str]) -> Any:
        if self.dynamic_default is not None:
            return self.dynamic_default(environ)
        if isinstance(self.default, (list, dict)):
            return type(self.default)(self.default)
        return self.default


def _web_concurrency(environ: Mapping[str, str]) -> int:
    raw = environ.get("WEB_CONCURRENCY", "").strip()
    return int(raw) if raw.isdigit() and int(raw) > 0 else 1


def _forwarded_allow_ips(environ: Mapping[str, str]) -> list[str]:
    raw = environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1,::1")
    return [part.strip() for part in raw.split(",") if part.strip()]


_S: list[Setting] = []


def _add(name: str, section: str, kind: str, default: Any, help: str, **kw: Any) -> None:
    _S.append(Setting(name, section, kind, default, help, **kw))


def _hook(name: str, help: str, aliases: tuple[str, ...] = ()) -> None:
    _add(name, "Server Hooks", "callable", None, help, aliases=aliases, from_env=False)


# --- Config file --------------------------------------------------------------------------
_add("config", "Config File", "str", None,
     "Python config file: module-level names, or a load() function returning a dict.",
     flags=("-c", "--config"), metavar="FILE", in_file=False)
_add("app", "Config File", "str", None,
     "The application: module:attr, module:factory('arg'), path/to/file.py[:attr], or a "
     "script whose run(config) returns the app. Also the APP argument and -s/--script.",
     flags=("-s", "--script"), aliases=("wsgi_app", "worker_app", "application"), metavar="APP")
_add("check_config", "Debugging", "bool", False,
     "Load the configuration and the app, report problems, and exit.",
     flags=("--check-config",), in_file=False)
_add("print_config", "Debugging", "bool", False,
     "Print every setting's final value and exit.", flags=("--print-config",), in_file=False)

# --- Server socket ------------------------------------------------------------------------
_add("bind", "Server Socket", "list", [],
     "Address to listen on: HOST:PORT, :PORT, [V6ADDR]:PORT, unix:PATH or fd://N. Repeatable. "
     "Default 127.0.0.1:8000, or 0.0.0.0:$PORT when $PORT is set.",
     flags=("-b", "--bind"), metavar="ADDRESS",
     default_doc="127.0.0.1:8000 (0.0.0.0:$PORT if $PORT is set)")
_add("port", "Server Socket", "int", None,
     "Port to listen on (the original tiamat's -p); combines with host. Ignored when bind is set.",
     flags=("-p", "--port"), aliases=("listen_port",), minimum=0, maximum=65535)
_add("host", "Server Socket", "str", None,
     "Host to listen on with --port; an empty string means every interface.",
     flags=("--host",), aliases=("listen_addr",))
_add("tcp", "Server Socket", "choice", "tcp4",
     "Address family for host/port: tcp4 or tcp6 (the original tiamat's tcp key).",
     flags=("--tcp",), choices=("tcp4", "tcp6"))
_add("backlog", "Server Socket", "int", 2048, "Pending-connection queue length of each socket.",
     flags=("--backlog",), minimum=1)
_add("reuse_port", "Server Socket", "bool", False,
     "Set SO_REUSEPORT on the listening sockets, so another process may bind the same address.",
     flags=("--reuse-port",))

# --- Worker processes ---------------------------------------------------------------------
_add("workers", "Worker Processes", "int", 1, "Number of worker processes.",
     flags=("-w", "--workers"), minimum=1, maximum=4096, dynamic_default=_web_concurrency,
     default_doc="$WEB_CONCURRENCY or 1")
_add("worker_class", "Worker Processes", "str", "auto",
     "Worker class: sync, thread, asgi, tcp, or a dotted path (pkg.mod:Class). auto picks sync "
     "for WSGI apps (thread with --threads > 1) and asgi for ASGI apps.",
     flags=("-k", "--worker-class"), metavar="CLASS")
_add("threads", "Worker Processes", "int", 1, "Threads per worker for the thread and tcp classes.",
     flags=("--threads",), minimum=1, maximum=10000)
_add("timer_slack", "Worker Processes", "int", 500,
     "Timer slack of the thread class's pool threads, in microseconds (Linux): their timed "
     "wake-ups (an app's sleep, a socket timeout) may come up to this much late, so that the "
     "kernel serves several with one timer interrupt. 0 keeps the slack the process started "
     "with (the kernel's default is 50).",
     flags=("--timer-slack",), minimum=0, maximum=1_000_000)
_add("worker_connections", "Worker Processes", "int", 1000,
     "Most connections one worker keeps open at once.",
     flags=("--worker-connections",), minimum=1)
_add("interface", "Worker Processes", "choice", "auto",
     "The app's interface: auto-detect, wsgi or asgi.",
     flags=("--interface",), choices=("auto", "wsgi", "asgi"))
_add("max_requests", "Worker Processes", "int", 0,
     "Restart a worker after this many requests (0: never).", flags=("--max-requests",), minimum=0)
_add("max_requests_jitter", "Worker Processes", "int", 0,
     "Add up to this many requests at random to max_requests, so workers don't restart together.",
     flags=("--max-requests-jitter",), minimum=0)
_add("timeout", "Worker Processes", "float", 30.0,
     "Kill and replace a worker stuck in one request (or whose loop stopped) for this many seconds "
     "(0: never).", flags=("-t", "--timeout"), minimum=0)
_add("boot_timeout", "Worker Processes", "float", None,
     "Kill a worker that has not finished booting after this many seconds (default: 2 x timeout).",
     flags=("--boot-timeout",), minimum=0)
_add("graceful_timeout", "Worker Processes", "float", 30.0,
     "On a graceful stop, seconds that in-flight requests get before workers are killed.",
     flags=("--graceful-timeout",), minimum=0)
_add("keepalive", "Worker Processes", "float", 5.0,
     "Seconds an idle keep-alive connection is kept open (0: close after each response).",
     flags=("--keep-alive",), minimum=0)
_add("rebalance_keepalive", "Worker Processes", "bool", True,
     "With several workers sharing a listening socket: a worker using clearly more CPU than "
     "its siblings for a second (the thresholds are in tiamat.workers.balance) closes a "
     "few keep-alive connections after their next response (which says Connection: close) "
     "and leaves the reconnections to its siblings, so that long-lived connections do not "
     "keep the load uneven. Off: a keep-alive connection stays with the worker that "
     "accepted it.",
     flags=("--rebalance-keepalive",), off_flags=("--no-rebalance-keepalive",))

# --- ASGI ---------------------------------------------------------------------------------
_add("loop", "ASGI", "choice", "auto", "Event loop for asgi and tcp workers.",
     flags=("--loop",), choices=("auto", "asyncio", "uvloop"))
_add("http", "ASGI", "choice", "auto", "HTTP/1.1 tokeniser: httptools (auto) or h11.",
     flags=("--http",), choices=("auto", "httptools", "h11"))
_add("ws", "ASGI", "choice", "auto", "WebSocket implementation (none disables WebSocket).",
     flags=("--ws",), choices=("auto", "websockets", "wsproto", "none"))
_add("ws_max_size", "ASGI", "size", 16 * 1024 * 1024, "Largest WebSocket message accepted, in bytes.",
     flags=("--ws-max-size",), minimum=1)
_add("ws_ping_interval", "ASGI", "float", 20.0, "Seconds between WebSocket pings (0: none).",
     flags=("--ws-ping-interval",), minimum=0)
_add("ws_ping_timeout", "ASGI", "float", 20.0, "Seconds to wait for a WebSocket pong.",
     flags=("--ws-ping-timeout",), minimum=0)
_add("ws_per_message_deflate", "ASGI", "bool", True, "Offer permessage-deflate to WebSocket clients.",
     flags=("--ws-per-message-deflate",), off_flags=("--no-ws-per-message-deflate",))
_add("lifespan", "ASGI", "choice", "auto", "ASGI lifespan protocol: auto, on or off.",
     flags=("--lifespan",), choices=("auto", "on", "off"))
_add("limit_concurrency", "ASGI", "int", 0,
     "Answer 503 past this many concurrent connections per worker (0: no limit).",
     flags=("--limit-concurrency",), minimum=0)
_add("root_path", "ASGI", "str", "", "ASGI root_path / WSGI SCRIPT_NAME prefix when mounted below /.",
     flags=("--root-path",))

# --- HTTP safety --------------------------------------------------------------------------
_add("limit_request_line", "Security", "int", 8190,
     "Longest request line in bytes (414 past it).", flags=("--limit-request-line",), minimum=0)
_add("limit_request_fields", "Security", "int", 100,
     "Most header fields in a request (431 past it).", flags=("--limit-request-fields",), minimum=0)
_add("limit_request_field_size", "Security", "int", 8190,
     "Longest header field in bytes (431 past it).",
     flags=("--limit-request-field-size", "--limit-request-field_size"), minimum=0)
_add("limit_request_head", "Security", "size", 65536,
     "Largest request head in bytes (431 past it).", flags=("--limit-request-head",), minimum=1024)
_add("limit_request_body", "Security", "size", 100 * 1024 * 1024,
     "Largest request body in bytes (413 past it; 0: unlimited).",
     flags=("--limit-request-body",), minimum=0)
_add("body_buffer_size", "Security", "size", 1024 * 1024,
     "Request bodies up to this size are kept in memory; larger ones spool to a temporary file.",
     flags=("--body-buffer-size",), minimum=0)
_add("header_timeout", "Security", "float", 10.0,
     "Seconds from accept (or the end of the previous response) to a complete request head "
     "(408 past it).", flags=("--header-timeout",), minimum=0)
_add("body_timeout", "Security", "float", 30.0,
     "Seconds a request body may stay idle before the connection is closed.",
     flags=("--body-timeout",), minimum=0)
_add("send_timeout", "Security", "float", 30.0,
     "Seconds a client may stop reading a response before the connection is dropped.",
     flags=("--send-timeout",), minimum=0)
_add("permit_obsolete_folding", "Security", "bool", False,
     "Accept obs-fold (header continuation lines) instead of rejecting them.",
     flags=("--permit-obsolete-folding",))
_add("forwarded_allow_ips", "Security", "list", ["127.0.0.1", "::1"],
     "Peers (IPs or CIDRs, or *) whose X-Forwarded-* and Forwarded headers are trusted.",
     flags=("--forwarded-allow-ips",), split_items=True, dynamic_default=_forwarded_allow_ips,
     default_doc="$FORWARDED_ALLOW_IPS or 127.0.0.1,::1")
_add("proxy_protocol", "Security", "choice", "off", "Expect a PROXY protocol header: off, v1, v2 or auto.",
     flags=("--proxy-protocol",), choices=("off", "v1", "v2", "auto"))
_add("proxy_allow_ips", "Security", "list", ["127.0.0.1", "::1"],
     "Peers allowed to send a PROXY protocol header.", flags=("--proxy-allow-from",), split_items=True)
_add("secure_scheme_headers", "Security", "dict",
     {"X-FORWARDED-PROTOCOL": "ssl", "X-FORWARDED-PROTO": "https", "X-FORWARDED-SSL": "on"},
     "Headers (from trusted peers) that mark a request as https, with the value that does.",
     from_env=False)

# --- TLS ----------------------------------------------------------------------------------
_add("certfile", "SSL", "str", None, "TLS certificate file (PEM).", flags=("--certfile",))
_add("keyfile", "SSL", "str", None, "TLS private key file (PEM).", flags=("--keyfile",))
_add("ca_certs", "SSL", "str", None, "CA certificates for verifying clients.", flags=("--ca-certs",))
_add("cert_reqs", "SSL", "int", 0, "Client certificates: 0 none, 1 optional, 2 required.",
     flags=("--cert-reqs",), minimum=0, maximum=2)
_add("ciphers", "SSL", "str", None, "OpenSSL cipher list.", flags=("--ciphers",))

# --- Server mechanics ---------------------------------------------------------------------
_add("preload_app", "Server Mechanics", "bool", False,
     "Load the app in the master before forking workers.", flags=("--preload",), aliases=("preload",))
_add("gc_freeze", "Server Mechanics", "bool", True,
     "Keep start-up objects out of the cyclic collector: it is paused while the master starts "
     "and while each worker loads the app, and what they built is then gc.freeze()d (with "
     "--preload, after a gc.collect()), so copy-on-write pages stay shared and start-up is "
     "quicker.", flags=("--gc-freeze",), off_flags=("--no-gc-freeze",))
_add("refork_after", "Server Mechanics", "str", None,
     "Refork workers from a warm one after N[,M,...] requests.", flags=("--refork-after",))
_add("max_worker_memory", "Server Mechanics", "int", 0,
     "Replace a worker whose RSS exceeds this many MB (0: never).",
     flags=("--max-worker-memory",), minimum=0)
_add("sendfile", "Server Mechanics", "bool", True,
     "Serve wsgi.file_wrapper responses with os.sendfile.", off_flags=("--no-sendfile",))
_add("chdir", "Server Mechanics", "str", None, "Change to this directory before loading the app.",
     flags=("--chdir",), aliases=("working_directory",))
_add("daemon", "Server Mechanics", "bool", False, "Detach and run in the background.",
     flags=("-D", "--daemon"), aliases=("daemonize",))
_add("pidfile", "Server Mechanics", "str", None, "Write the master's pid to this file.",
     flags=("--pid",), metavar="FILE")
_add("raw_env", "Server Mechanics", "list", [], "Set KEY=VALUE in the workers' environment.",
     flags=("-e", "--env"), metavar="KEY=VALUE")
_add("pythonpath", "Server Mechanics", "str", None, "Comma-separated directories to add to sys.path.",
     flags=("--pythonpath",))
_add("umask", "Server Mechanics", "int", None, "umask for the server's processes.",
     flags=("-m", "--umask"), minimum=0, maximum=0o777)
_add("user", "Server Mechanics", "str", None, "Run workers as this user (name or uid).",
     flags=("-u", "--user"))
_add("group", "Server Mechanics", "str", None, "Run workers as this group (name or gid).",
     flags=("-g", "--group"))
_add("proc_name", "Server Mechanics", "str", None, "Name shown in process titles instead of the app.",
     flags=("-n", "--name"))
_add("stdout_path", "Server Mechanics", "str", None,
     "Redirect the server's standard output to this file (the original tiamat's stdout_path).",
     flags=("--stdout-path",))

# --- Logging ------------------------------------------------------------------------------
_add("accesslog", "Logging", "str", None, "Access log file ('-' for stderr; off by default).",
     flags=("--access-logfile",), metavar="FILE")
_add("access_log_format", "Logging", "str",
     '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"',
     "Access log format (gunicorn's atoms), or 'json' for one JSON object per line.",
     flags=("--access-logformat",))
_add("errorlog", "Logging", "str", "-", "Error log file ('-' for stderr).",
     flags=("--error-logfile", "--log-file"), aliases=("stderr_path",), metavar="FILE")
_add("loglevel", "Logging", "choice", "info", "Error log level.",
     flags=("--log-level",), choices=("debug", "info", "warning", "error", "critical"))
_add("logconfig", "Logging", "str", None, "A logging dictConfig file (JSON or Python).",
     flags=("--log-config",))
_add("logconfig_dict", "Logging", "dict", {}, "A logging dictConfig dict.", from_env=False)
_add("capture_output", "Logging", "bool", False,
     "Send the app's stdout and stderr to the error log.", flags=("--capture-output",))
_add("statsd_host", "Logging", "str", None, "host:port of a StatsD server to send metrics to.",
     flags=("--statsd-host",))
_add("statsd_prefix", "Logging", "str", "", "Prefix for StatsD metric names.", flags=("--statsd-prefix",))
_add("statsd_interval", "Logging", "float", 10.0, "Seconds between StatsD pushes.",
     flags=("--statsd-interval",), minimum=0.1)
_add("metrics_bind", "Logging", "str", None, "Serve Prometheus metrics at this HOST:PORT (/metrics).",
     flags=("--metrics-bind",))
_add("control_socket", "Logging", "str", None,
     "Unix socket for `tiamat status`, `reload`, `stop`, `scale`.", flags=("--control-socket",))

# --- Debugging ----------------------------------------------------------------------------
_add("reload", "Debugging", "bool", False, "Restart workers when source files change (development).",
     flags=("--reload",))
_add("reload_extra_files", "Debugging", "list", [], "More files to watch with --reload.",
     flags=("--reload-extra-file",))
_add("reload_include", "Debugging", "list", [], "Glob patterns to watch with --reload.",
     flags=("--reload-include",))
_add("reload_exclude", "Debugging", "list", [], "Glob patterns to ignore with --reload.",
     flags=("--reload-exclude",))

# --- Hooks --------------------------------------------------------------------------------
_hook("on_starting", "Called in the master before it binds: on_starting(server).")
_hook("on_reload", "Called in the master on HUP: on_reload(server).")
_hook("when_ready", "Called in the master once the first workers are ready: when_ready(server).")
_hook("pre_fork", "Called in the master before each fork: pre_fork(server, worker).",
      aliases=("before_fork",))
_hook("post_fork", "Called in a new worker right after the fork: post_fork(server, worker).",
      aliases=("after_fork",))
_hook("post_worker_init", "Called in a worker once the app is loaded: post_worker_init(worker).")
_hook("worker_int", "Called in a worker on INT or QUIT: worker_int(worker).")
_hook("worker_abort", "Called in a worker the master is about to kill for a timeout: "
      "worker_abort(worker).")
_hook("pre_exec", "Called in the master before it re-executes on USR2: pre_exec(server).",
      aliases=("before_exec",))
_hook("pre_request", "Called in a worker before each request: pre_request(worker, req).")
_hook("post_request", "Called in a worker after each request: post_request(worker, req, environ, resp).")
_hook("child_exit", "Called in the master when a worker has exited: child_exit(server, worker).")
_hook("worker_exit", "Called in a worker as it exits: worker_exit(server, worker).")
_hook("nworkers_changed", "Called in the master when the worker count changes: "
      "nworkers_changed(server, new, old).")
_hook("on_exit", "Called in the master as it exits: on_exit(server).")
_hook("on_message", "Called in the master when a worker posts a message: "
      "on_message(server, worker, message).")
_hook("ssl_context", "Builds the TLS context: ssl_context(config, default_factory).")

SETTINGS: tuple[Setting, ...] = tuple(_S)
BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
#: every key a config file or ``TIAMAT_`` variable may use, mapped to the setting it sets
BY_KEY: dict[str, Setting] = {**{a: s for s in SETTINGS for a in s.aliases}, **BY_NAME}
SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(s.section for s in SETTINGS))



assert len(BY_KEY) == len(SETTINGS) + sum(len(s.aliases) for s in SETTINGS), "duplicate key"
assert all(s.kind in KINDS for s in SETTINGS)

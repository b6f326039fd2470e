"""Reading, coercing and layering settings: defaults < config file < environment < CLI.

Everything here is driven by ``tiamat.settings.SETTINGS``; no setting name appears in this
module except where a setting needs logic beyond its type (the bind addresses).
A bad value never gets as far as binding a socket: it raises :class:`ConfigError`, which
the CLI turns into one line naming the key and where it came from, and exit code 2.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import runpy
import types
from collections.abc import Mapping
from typing import Any

from tiamat.settings import BY_KEY, BY_NAME, SETTINGS, Setting

#: gunicorn settings that tiamat accepts in a config file and ignores (with a warning),
#: because they describe machinery tiamat does not have (a heartbeat temp file, say).
IGNORED_GUNICORN_KEYS = frozenset({
    "worker_tmp_dir", "tmp_upload_dir", "spew", "initgroups", "enable_stdio_inheritance",
    "disable_redirect_access_to_syslog", "logger_class", "default_proc_name",
    "suppress_ragged_eofs", "do_handshake_on_connect", "ssl_version", "reload_engine",
})

_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f", ""}


class ConfigError(Exception):
    """A setting that cannot be used; the message is one line naming key and origin."""

    exit_code = 2


class Config:
    """Final setting values, readable as attributes (``cfg.workers``).

    ``sources`` remembers where each value came from (default, a file, the environment, the
    command line), which ``--print-config`` shows and HUP uses to re-read only the file.
    """

    def __init__(self, values: dict[str, Any], sources: dict[str, str]) -> None:
        # Each value is also an instance attribute, so ``cfg.keepalive`` is a plain attribute
        # read (tens of ns) rather than a failed lookup plus __getattr__ (about 1 us), which
        # matters on paths that read settings per request.
        self.__dict__.update(values)
        self.values = values
        self.sources = sources
        self.warnings: list[str] = []

    def set(self, name: str, value: Any) -> None:
        """Change one value after loading (HUP keeps restart-only settings this way)."""
        self.values[name] = value
        self.__dict__[name] = value

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __repr__(self) -> str:
        return f"Config({self.values!r})"

    # --- derived values ---------------------------------------------------------------
    @property
    def effective_boot_timeout(self) -> float:
        if self.values["boot_timeout"] is not None:
            return float(self.values["boot_timeout"])
        return 2.0 * float(self.values["timeout"]) if self.values["timeout"] else 0.0

    def bind_addresses(self, environ: Mapping[str, str] | None = None) -> list[str]:
        """The addresses to listen on, from bind, else host/port/tcp, else $PORT, else 8000."""
        environ = os.environ if environ is None else environ
        if self.values["bind"]:
            return list(self.values["bind"])
        host, port = self.values["host"], self.values["port"]
        six = self.values["tcp"] == "tcp6"
        if host is None and port is None:
            env_port = environ.get("PORT", "").strip()
            if env_port.isdigit():
                return [f"0.0.0.0:{env_port}"]
            return ["127.0.0.1:8000"]
        if host is None:
            host = "::1" if six else "127.0.0.1"
        elif host == "":
            host = "::" if six else "0.0.0.0"
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return [f"{host}:{8000 if port is None else port}"]

    def describe(self) -> str:
        """``--print-config`` output: every setting, one ``name = value`` line each."""
        width = max(len(s.name) for s in SETTINGS)
        lines = []
        for s in SETTINGS:
            value = self.values[s.name]
            if s.name == "bind" and not value:
                value = self.bind_addresses()  # what will really be bound
            if s.kind == "callable" and value is not None:
                value = f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', value)}"
            lines.append(f"{s.name:<{width}} = {value!r}")
        return "\n".join(lines)


def coerce(setting: Setting, value: Any) -> Any:
    """Turn ``value`` (from a file, the environment or the CLI) into the setting's type.

    Raises ValueError with a short reason; callers add the key and origin.
    """
    kind = setting.kind
    if value is None:
        if setting.default is None or kind in ("callable",):
            return None
        raise ValueError("may not be None")
    if kind == "int" or kind == "size":
        result = _to_int(value, size=kind == "size")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"expected a number, got {type(value).__name__}")
        try:
            result = float(value)
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    elif kind == "bool":
        result = _to_bool(value)
    elif kind == "str":
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {type(value).__name__}")
        result = value
    elif kind == "list":
        if isinstance(value, str):
            result = [part.strip() for part in value.split(",") if part.strip()]
        elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            result = [part.strip() for item in value
                      for part in (item.split(",") if setting.split_items else [item])
                      if part.strip()]
        else:
            raise ValueError(f"expected a string or a list of strings, got {value!r}")
    elif kind == "choice":
        if not isinstance(value, str) or value.lower() not in setting.choices:
            raise ValueError(f"expected one of {', '.join(setting.choices)}, got {value!r}")
        result = value.lower()
    elif kind == "callable":
        result = _to_callable(value)
    elif kind == "dict":
        if not isinstance(value, dict):
            raise ValueError(f"expected a dict, got {type(value).__name__}")
        result = value
    else:  # pragma: no cover - the table is checked at import
        raise AssertionError(kind)
    if setting.minimum is not None and result < setting.minimum:
        raise ValueError(f"must be at least {_num(setting.minimum)}, got {_num(result)}")
    if setting.maximum is not None and result > setting.maximum:
        raise ValueError(f"must be at most {_num(setting.maximum)}, got {_num(result)}")
    return result


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _to_int(value: Any, size: bool) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected a whole number, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text, 0) if text[:2].lower() in ("0o", "0x") else int(text, 10)
        except ValueError:
            pass
        match = _SIZE.match(text) if size else None
        if match:
            unit = (match.group(2) or "b")[0].lower()
            return int(match.group(1)) * {"b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit]
    raise ValueError(f"expected a whole number, got {value!r}")


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise ValueError(f"expected true or false, got {value!r}")


def _to_callable(value: Any) -> Any:
    if callable(value):
        return value
    if isinstance(value, str):
        module_name, sep, attr = value.partition(":")
        if not sep:
            module_name, _, attr = value.rpartition(".")
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except Exception as exc:
            raise ValueError(f"cannot import {value!r}: {exc}") from None
        if callable(obj):
            return obj
    raise ValueError(f"expected a callable or 'module:function', got {value!r}")


def read_config_file(path: str) -> tuple[dict[str, Any], list[str]]:
    """Run a Python config file and return ``(settings, warnings)``.

    The file gives settings as module-level names or, in the original tiamat's form, as a
    ``load()`` function returning a dict.  Names starting with ``_``, modules, classes and
    callables imported from elsewhere are not settings; any other unknown name is an error,
    so that a misspelt hook or setting never passes silently.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found")
    try:
        namespace = runpy.run_path(path, run_name="__tiamat_config__")
    except Exception as exc:
        raise ConfigError(f"{path}: cannot load config file: {type(exc).__name__}: {exc}") from None
    loader = namespace.get("load")
    if callable(loader) and "load" not in BY_KEY:
        try:
            raw = loader()
        except Exception as exc:
            raise ConfigError(f"{path}: load() raised {type(exc).__name__}: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: load() must return a dict, got {type(raw).__name__}")
        items = dict(raw)
    else:
        items = {}
        for key, value in namespace.items():
            if key.startswith("_") or isinstance(value, (types.ModuleType, type)):
                continue
            if key not in BY_KEY and callable(value) and _defined_elsewhere(value):
                continue
            items[key] = value
    warnings = []
    for key in list(items):
        if key in IGNORED_GUNICORN_KEYS:
            warnings.append(f"{path}: {key}: gunicorn setting not used by tiamat; ignored")
            del items[key]
    return items, warnings


def _defined_elsewhere(value: Any) -> bool:
    module = getattr(value, "__module__", None)
    if module == "__tiamat_config__":
        return False
    return not inspect.isfunction(value) or module is not None


def _apply(values: dict[str, Any], sources: dict[str, str], items: Mapping[str, Any],
           origin: str, describe_key: Any) -> None:
    seen: dict[str, str] = {}
    for key, raw in items.items():
        setting = BY_KEY.get(key)
        if setting is None:
            raise ConfigError(f"{origin}: {describe_key(key)}: unknown setting")
        if origin not in ("command line", "environment") and not setting.in_file:
            raise ConfigError(f"{origin}: {describe_key(key)}: can only be given on the command line")
        if setting.name in seen:
            raise ConfigError(
                f"{origin}: {describe_key(key)}: given twice (also as {describe_key(seen[setting.name])})")
        seen[setting.name] = key
        try:
            values[setting.name] = coerce(setting, raw)
        except ValueError as exc:
            raise ConfigError(f"{origin}: {describe_key(key)}: {exc}") from None
        sources[setting.name] = origin


def load_config(cli: Mapping[str, Any] | None = None,
                environ: Mapping[str, str] | None = None) -> Config:
    """Layer defaults, the config file, ``TIAMAT_*`` variables and the CLI into a Config."""
    cli = dict(cli or {})
    environ = os.environ if environ is None else environ
    values = {s.name: s.default_for(environ) for s in SETTINGS}
    sources = dict.fromkeys(values, "default")

    env_items = {s.name: environ[s.env_var] for s in SETTINGS
                 if s.from_env and s.env_var in environ}
    config_path = cli.get("config") or env_items.get("config")
    warnings: list[str] = []
    if config_path:
        file_items, warnings = read_config_file(str(config_path))
        _apply(values, sources, file_items, str(config_path), str)
    _apply(values, sources, env_items, "environment", lambda k: BY_NAME[k].env_var)
    _apply(values, sources, cli, "command line", _flag_name)
    validate(values, sources)
    config = Config(values, sources)
    config.warnings = warnings
    return config


def _flag_name(name: str) -> str:
    setting = BY_NAME.get(name)
    if setting is None:
        return name
    flags = setting.flags or setting.off_flags
    longs = [f for f in flags if f.startswith("--")]
    return longs[0] if longs else (flags[0] if flags else name.upper())


def validate(values: Mapping[str, Any], sources: Mapping[str, str] | None = None) -> None:
    """Checks that involve more than one setting or more than a type.

    Each error names the key and where its value came from, like the per-key checks do.
    """
    from tiamat.refork import parse_thresholds  # refork imports nothing from config
    from tiamat.sockets import parse_address  # sockets imports nothing from config

    def fail(name: str, reason: str) -> ConfigError:
        origin = (sources or {}).get(name, "default")
        key = _flag_name(name) if origin == "command line" else (
            BY_NAME[name].env_var if origin == "environment" else name)
        return ConfigError(f"{origin}: {key}: {reason}")

    for address in values["bind"]:
        try:
            parse_address(address)
        except ValueError as exc:
            raise fail("bind", str(exc)) from None
    if values["keyfile"] and not values["certfile"]:
        raise fail("keyfile", "given without certfile")
    try:
        parse_thresholds(values["refork_after"])
    except ValueError as exc:
        raise fail("refork_after", str(exc)) from None
    for key in ("certfile", "keyfile", "ca_certs"):
        path = values[key]
        if path and not os.path.isfile(path):
            raise fail(key, f"no such file: {path}")
    if values["chdir"] and not os.path.isdir(values["chdir"]):
        raise fail("chdir", f"no such directory: {values['chdir']}")
    for item in values["raw_env"]:
        if "=" not in item:
            raise fail("raw_env", f"expected KEY=VALUE, got {item!r}")

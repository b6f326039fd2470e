"""Finding the user's application from the APP string.

Forms: ``module:attr``, ``module:factory()``, ``module:create_app('prod', debug=False)``,
``module`` (tries ``application``, then ``app``), ``path/to/file.py[:attr]``, and the
original tiamat's worker-script contract: a file or module whose ``run(config)`` returns
the app.  Every failure becomes :class:`AppLoadError`, whose message is the one line the
user sees (``cannot load 'myapp:app': No module named 'myapp'``).
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import inspect
import os
import sys
import traceback
import types
from typing import Any

DEFAULT_ATTRS = ("application", "app")


class AppLoadError(Exception):
    """The app could not be loaded; ``str()`` is the one-line message, ``details`` the traceback."""

    exit_code = 4

    def __init__(self, spec: str, reason: str, details: str = "") -> None:
        super().__init__(f"cannot load {spec!r}: {reason}")
        self.spec = spec
        self.details = details


def prepare_sys_path(chdir: str | None, pythonpath: str | None = None,
                     also: str | None = None) -> None:
    """Put --pythonpath entries, the working directory and ``also`` (the directory tiamat was
    started in, before --chdir) first on sys.path, in that order, once each."""
    entries = [p for p in (pythonpath or "").split(",") if p.strip()]
    entries.append(os.path.abspath(chdir) if chdir else os.getcwd())
    if also:
        entries.append(also)
    for entry in reversed(entries):
        entry = os.path.abspath(entry.strip())
        if entry in sys.path:
            sys.path.remove(entry)
        sys.path.insert(0, entry)


def split_spec(spec: str) -> tuple[str, str | None]:
    """``'pkg.mod:attr'`` -> ``('pkg.mod', 'attr')``; a path keeps its drive-free colon rules."""
    target, sep, attr = spec.partition(":")
    if spec.endswith(".py") or (os.sep in target and not sep):
        return spec, None
    return target, (attr or None) if sep else None


def load_app(spec: str, config: Any = None) -> Any:
    """Import and return the application named by ``spec``; raise AppLoadError on any failure."""
    if not spec:
        raise AppLoadError("", "no application given (tiamat [OPTIONS] APP, or -s SCRIPT)")
    target, attr = split_spec(spec)
    try:
        module = _import_target(target)
    except AppLoadError:
        raise
    except ModuleNotFoundError as exc:
        raise AppLoadError(spec, str(exc), traceback.format_exc()) from None
    except SystemExit as exc:
        raise AppLoadError(spec, f"the module called sys.exit({exc.code!r}) while importing") from None
    except BaseException as exc:
        raise AppLoadError(spec, f"{type(exc).__name__}: {exc}", traceback.format_exc()) from None
    try:
        app = _resolve(module, attr, config)
    except AppLoadError as exc:
        raise AppLoadError(spec, str(exc).split(": ", 1)[-1], exc.details) from None
    except Exception as exc:
        raise AppLoadError(spec, f"{type(exc).__name__}: {exc}", traceback.format_exc()) from None
    if not callable(app):
        raise AppLoadError(spec, f"the application is not callable (got {type(app).__name__})")
    return app


def _import_target(target: str) -> types.ModuleType:
    if target.endswith(".py") or os.sep in target:
        path = os.path.abspath(target)
        if not os.path.isfile(path):
            raise AppLoadError(target, f"no such file: {target}")
        directory = os.path.dirname(path)
        if directory not in sys.path:
            sys.path.insert(0, directory)
        name = os.path.splitext(os.path.basename(path))[0] or "tiamat_app"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise AppLoadError(target, f"cannot import {path}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
        return module
    if not target or not all(part.isidentifier() for part in target.split(".")):
        raise AppLoadError(target, "expected module:attribute or path/to/file.py")
    return importlib.import_module(target)


def _resolve(module: types.ModuleType, attr: str | None, config: Any) -> Any:
    if attr is None:
        for name in DEFAULT_ATTRS:
            if hasattr(module, name):
                return getattr(module, name)
        run = getattr(module, "run", None)
        if callable(run):
            return _call_run(run, config)
        raise AppLoadError("", f"module {module.__name__!r} has no 'application' or 'app' "
                               "attribute and no run(config) function")
    try:
        expression = ast.parse(attr.strip(), mode="eval").body
    except SyntaxError:
        raise AppLoadError("", f"cannot parse attribute {attr!r}") from None
    call_args: tuple[list[Any], dict[str, Any]] | None = None
    if isinstance(expression, ast.Call):
        try:
            args = [ast.literal_eval(arg) for arg in expression.args]
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in expression.keywords if kw.arg}
        except ValueError:
            raise AppLoadError("", f"factory arguments must be literals in {attr!r}") from None
        call_args = (args, kwargs)
        expression = expression.func
    names: list[str] = []
    while isinstance(expression, ast.Attribute):
        names.insert(0, expression.attr)
        expression = expression.value
    if not isinstance(expression, ast.Name):
        raise AppLoadError("", f"expected a name or a factory call, got {attr!r}")
    names.insert(0, expression.id)
    obj: Any = module
    for name in names:
        try:
            obj = getattr(obj, name)
        except AttributeError:
            raise AppLoadError("", f"module {module.__name__!r} has no attribute "
                                   f"{'.'.join(names)!r}") from None
    if call_args is not None:
        obj = obj(*call_args[0], **call_args[1])
    elif names == ["run"] and inspect.isfunction(obj):
        obj = _call_run(obj, config)
    return obj


def _call_run(run: Any, config: Any) -> Any:
    """The original tiamat's contract: ``run(config)`` returns the app, or
    ``run(config, next)`` hands it to ``next``."""
    try:
        nparams = len(inspect.signature(run).parameters)
    except (TypeError, ValueError):
        nparams = 1
    if nparams >= 2:
        handed: list[Any] = []
        run(config, handed.append)
        if not handed:
            raise AppLoadError("", "run(config, next) returned without calling next(app)")
        return handed[0]
    return run(config) if nparams == 1 else run()


def is_asgi(app: Any) -> bool:
    """True for an ASGI 3 app (a coroutine function, or an object whose ``__call__`` is one,
    taking ``scope, receive, send``) or an ASGI 2 class (instantiated with the scope, then
    awaited with ``receive, send``); everything else is treated as WSGI.

    The parameter count matters: ``async def handle(reader, writer)`` is a ``-k tcp`` handler,
    not an ASGI app.
    """
    while isinstance(app, functools.partial):
        app = app.func
    if inspect.isclass(app):
        call = getattr(app, "__call__", None)  # noqa: B004 - ASGI 2: the instance's __call__
        return inspect.iscoroutinefunction(call) or hasattr(app, "__await__")
    target = app if inspect.isroutine(app) else getattr(app, "__call__", None)  # noqa: B004
    if not inspect.iscoroutinefunction(target):
        return False
    try:
        params = inspect.signature(app).parameters.values()
    except (TypeError, ValueError):
        return True
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    return len(required) <= 3 <= len(positional)

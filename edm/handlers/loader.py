"""Turn ``amqp.handler`` and ``amqp.handler_options`` into the handler each thread calls.

``amqp.handler`` is ``module:attr`` or a built-in name. ``attr`` is a function, shared by
every thread, or a class, built once per handler thread as ``Class(options)``; an instance's
``close()``, if it has one, is called when its thread stops or a reload replaces it.

Only the worker builds handlers. A command that checks a config (``edm reload``,
``check-config``) imports the module without building anything: a constructor may open
connections, and the worker reports a constructor that raises as an error naming
``amqp.handler`` at start (the start fails) or at reload (the running handler stays).
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from edm.errors import ConfigError
from edm.handlers.api import BUILT_IN_HANDLERS, Handler

log = logging.getLogger(__name__)

BUILT_IN = BUILT_IN_HANDLERS


@dataclass
class Bound:
    """The handler of one thread, and how to let it go."""

    call: Handler
    close: Callable[[], object] | None = None

    def release(self) -> None:
        """Call the instance's ``close()``; a failure there is logged, never raised."""
        if self.close is None:
            return
        try:
            self.close()
        except Exception:
            log.error("amqp.handler: close() of the handler failed.", exc_info=True)


@dataclass(frozen=True)
class HandlerFactory:
    """A resolved ``amqp.handler``: ``build()`` gives one thread its handler."""

    spec: str
    target: Callable[..., Any]
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_class(self) -> bool:
        return inspect.isclass(self.target)

    def build(self) -> Bound:
        """The function itself, or a new instance; ConfigError naming amqp.handler if it fails."""
        if not self.is_class:
            return Bound(self.target)
        try:
            instance = self.target(dict(self.options))
        except Exception as exc:  # noqa: BLE001 - any constructor failure is a config problem
            raise ConfigError(
                f"amqp.handler: {self.spec} could not be built: {type(exc).__name__}: {exc}"
            ) from None
        if not callable(instance):
            raise ConfigError(f"amqp.handler: instances of {self.spec} are not callable (no __call__)")
        close = getattr(instance, "close", None)
        return Bound(instance, close if callable(close) else None)


def resolve(spec: str) -> str:
    """``module:attr`` for a built-in name; a ``module:attr`` spec as it is."""
    if ":" in spec:
        return spec
    target = BUILT_IN.get(spec)
    if target is None:
        names = ", ".join(sorted(BUILT_IN))
        raise ConfigError(f"amqp.handler: {spec!r} is not a built-in handler ({names}) nor 'module:attr'")
    return target


def load(spec: str, options: Mapping[str, Any] | None = None) -> HandlerFactory:
    """Import the handler; raise ConfigError naming amqp.handler (or handler_options)."""
    module_name, _, attr = resolve(spec).partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if spec in BUILT_IN and exc.name == module_name:
            raise ConfigError(
                f"amqp.handler: the built-in {spec!r} handler is not in this version of edm"
            ) from None
        raise ConfigError(f"amqp.handler: cannot import {module_name!r}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any import failure is a config problem
        raise ConfigError(f"amqp.handler: cannot import {module_name!r}: {exc}") from None
    except SystemExit as exc:  # a module that calls sys.exit() must not end the process importing it
        raise ConfigError(f"amqp.handler: importing {module_name!r} called sys.exit({exc.code!r})") from None
    target = getattr(module, attr, None)
    if not callable(target):
        raise ConfigError(f"amqp.handler: {module_name!r} has no callable {attr!r}")
    options = dict(options or {})
    if options and not inspect.isclass(target):
        raise ConfigError(f"amqp.handler_options: {spec} is a function; only a handler class takes options")
    return HandlerFactory(spec, target, options)

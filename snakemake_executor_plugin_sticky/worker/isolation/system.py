"""`sys` as each invocation sees it: its own stdout and stderr, `sys.argv` and `sys.path`.

`sys` keeps its identity (C code and every module hold it). While invocations run, its class is a
module type whose properties answer per invocation, and `print` and C code write to the objects
in `sys.__dict__`, routers that pass each write on to the calling invocation's stream; between
invocations `sys` is plain again. An assignment such as `sys.stdout = open(log, "w")`, or
`contextlib.redirect_stdout`, made while an invocation runs, holds for that invocation alone, so
two scripts side by side each keep their own.
"""

from __future__ import annotations

import importlib._bootstrap
import io
import sys
import types
from typing import Any, Callable

from .context import current

STREAMS = ("stdout", "stderr")


class StreamRouter(io.TextIOBase):
    """The object in `sys.__dict__` for a standard stream: writes go to the calling invocation's
    stream, and from threads of no invocation to the worker's real one."""

    def __init__(self, name: str, real: Any) -> None:
        self.name = name
        self.real = real

    def target(self) -> Any:
        """The stream this thread writes to now."""
        context = current()
        if context is None:
            return self.real
        stream = context.stream(self.name)
        return self.real if stream is None else stream

    def write(self, text: str) -> int:
        """Write to this thread's stream."""
        return self.target().write(text)

    def writelines(self, lines: Any) -> None:
        """Write each line to this thread's stream."""
        target = self.target()
        for line in lines:
            target.write(line)

    def flush(self) -> None:
        """Flush this thread's stream."""
        self.target().flush()

    def fileno(self) -> int:
        """The real stream's descriptor, for code that writes to it directly (as subprocesses do)."""
        return self.real.fileno()

    def isatty(self) -> bool:
        """Whether this thread's stream is a terminal."""
        target = self.target()
        return target is self.real and bool(getattr(self.real, "isatty", lambda: False)())

    def writable(self) -> bool:
        """Always: a standard output stream."""
        return True

    def __getattr__(self, name: str) -> Any:
        # the rest of the stream's interface (`reconfigure`, `line_buffering`, ...) is the target's
        return getattr(self.target(), name)

    @property
    def buffer(self) -> Any:  # type: ignore[override]
        """This thread's stream's bytes, for `sys.stdout.buffer.write`."""
        return self.target().buffer

    @property
    def encoding(self) -> str:  # type: ignore[override]
        """This thread's stream's encoding."""
        return getattr(self.target(), "encoding", None) or "utf-8"

    @property
    def errors(self) -> str:  # type: ignore[override]
        """This thread's stream's error handler."""
        return getattr(self.target(), "errors", None) or "strict"


def _stream(name: str) -> property:
    def get(module: types.ModuleType) -> Any:
        context = current() if module is sys else None
        if context is not None:
            override = context.overrides.get(name)
            if override is not None:
                return override
        try:
            return module.__dict__[name]
        except KeyError:
            raise AttributeError(name) from None

    def set_(module: types.ModuleType, value: Any) -> None:
        if module is not sys:
            module.__dict__[name] = value
            return
        router = module.__dict__[name]
        context = current()
        if context is not None:
            if value is router:
                context.overrides.pop(name, None)
            else:
                context.overrides[name] = value
        elif value is not router:
            router.real = value  # the worker's own stream, for every thread of no invocation

    return property(get, set_)


def _own(name: str) -> property:
    def get(module: types.ModuleType) -> Any:
        context = current() if module is sys else None
        try:
            return module.__dict__[name] if context is None else getattr(context, name)
        except KeyError:
            raise AttributeError(name) from None

    def set_(module: types.ModuleType, value: Any) -> None:
        context = current() if module is sys else None
        if context is None:
            module.__dict__[name] = value
        else:
            setattr(context, name, value)

    return property(get, set_)


class InvocationSys(types.ModuleType):
    """The class of `sys` in a resident worker: per-invocation streams, argv and path. (importlib
    makes new modules with `type(sys)`: `install` has it make plain ones, and for any other module
    these attributes are plain.)"""

    stdout = _stream("stdout")
    stderr = _stream("stderr")
    argv = _own("argv")
    path = _own("path")


_routers: dict[str, StreamRouter] = {}


def install() -> Callable[[], None]:
    """Make the routers of `sys`'s streams, argv and path; they route while invocations run
    (`activate`), and between them `sys` is plain. Returns the undo."""
    _routers.update({name: StreamRouter(name, sys.__dict__[name]) for name in STREAMS})
    new_module = importlib._bootstrap._new_module  # type: ignore[attr-defined]
    importlib._bootstrap._new_module = types.ModuleType  # type: ignore[attr-defined]

    def undo() -> None:
        deactivate()
        importlib._bootstrap._new_module = new_module  # type: ignore[attr-defined]
        _routers.clear()

    return undo


def activate() -> None:
    """The first of overlapping invocations begins: `sys` routes per invocation. A stream the
    worker replaced meanwhile (`sys.stdout = ...`) becomes the router's real one."""
    for name, router in _routers.items():
        value = sys.__dict__[name]
        if value is not router:
            router.real = value
            sys.__dict__[name] = router
    sys.__class__ = InvocationSys


def deactivate() -> None:
    """The last of overlapping invocations has ended: `sys` is the plain module again, its
    streams the worker's own, so the process pays nothing for the routing between invocations."""
    sys.__class__ = types.ModuleType
    for name, router in _routers.items():
        if sys.__dict__.get(name) is router:
            sys.__dict__[name] = router.real

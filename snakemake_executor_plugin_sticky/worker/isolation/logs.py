"""Logging as each invocation sees it: the handlers, levels and filters a script sets up are its own.

`logging.basicConfig(filename=snakemake.log[0])` in a fresh job configures a fresh root logger.
In a resident worker the loggers are the process's, shared by every invocation and by the
template. So `Logger`'s `handlers`, `level`, `propagate`, `disabled` and `filters` (and the
manager's `disable`) become descriptors: a change made by the script's own code goes into its
invocation's view of that logger, which the invocation alone sees, and ends with it; the
handlers it added are flushed and closed then. Changes made by installed packages or the
template stay the process's, as in a fresh job that imported them.

A script that starts its logging afresh (`basicConfig(force=True)`, `dictConfig`, `fileConfig`)
closes the handlers it added, never the process's. A level set anywhere reaches every
invocation's cache of enabled levels at once.
"""

from __future__ import annotations

import logging
import logging.config
import traceback
from typing import Any, Callable, Optional

from .context import InvocationContext, current

LOGGER_FIELDS = ("handlers", "level", "propagate", "disabled", "filters")
LIST_FIELDS = ("handlers", "filters")


class SharedList(list):
    """A list of the process (a logger's handlers or filters, `warnings.filters`). The script's
    changes to it go into its invocation's own copy, made on the first change; once the
    invocation has its copy, it reads and changes that one."""

    def __init__(self, owner: Any, name: str, items: Any = ()) -> None:
        super().__init__(items)
        self.owner = owner
        self.name = name

    def own(self, create: bool) -> Optional[list]:
        """The calling invocation's copy; with `create`, made now if the script changes the list."""
        context = current()
        if context is None:
            return None
        view = context.viewed(self.owner)
        mine = None if view is None else view.get(self.name)
        if mine is None and create and context.owns_caller():
            mine = context.view(self.owner)[self.name] = list.__getitem__(self, slice(None))
        return mine


def _forward(method: str, create: bool) -> Callable:
    shared = getattr(list, method)

    def forward(self: SharedList, *args: Any) -> Any:
        mine = self.own(create)
        return shared(self, *args) if mine is None else getattr(mine, method)(*args)

    forward.__name__ = method
    return forward


CHANGES = ("append", "extend", "insert", "remove", "pop", "clear", "sort", "reverse", "__setitem__", "__delitem__")
for _method in CHANGES:
    setattr(SharedList, _method, _forward(_method, create=True))
for _method in ("__contains__", "__iter__", "__len__", "__getitem__", "index", "count", "copy"):
    setattr(SharedList, _method, _forward(_method, create=False))


def _iadd(self: SharedList, other: Any) -> Any:
    mine = self.own(create=True)
    if mine is None:
        return list.__iadd__(self, other)
    mine.extend(other)
    return self


SharedList.__iadd__ = _iadd  # type: ignore[method-assign]


class Field:
    """A logger's (or the manager's) attribute: the process's value, or the invocation's own.
    The process's value stays where logging keeps it (`storage`, through `convert` as logging's
    own property would)."""

    def __init__(self, name: str, storage: Optional[str] = None, convert: Callable[[Any], Any] = lambda v: v) -> None:
        self.name = name
        self.storage = storage or name
        self.convert = convert

    def __get__(self, target: Any, owner: Any = None) -> Any:
        if target is None:
            return self
        context = current()
        if context is not None:
            view = context.viewed(target)
            if view is not None and self.name in view:
                return view[self.name]
        try:
            return target.__dict__[self.storage]
        except KeyError:
            raise AttributeError(self.name) from None

    def __set__(self, target: Any, value: Any) -> None:
        shared = target.__dict__
        value = self.convert(value)
        context = current()
        if self.storage in shared and context is not None:
            view = context.viewed(target)
            if (view is not None and self.name in view) or context.owns_caller():
                context.view(target)[self.name] = value
                return
        if self.name in LIST_FIELDS and not (isinstance(value, SharedList) and value.owner is target):
            value = SharedList(target, self.name, value)
        shared[self.storage] = value


class Cache:
    """`Logger._cache` (levels enabled): under an invocation's views, a cache of its own. Any
    level change anywhere (the manager's `_clear_cache`, which clears the caches of the thread
    that makes it) empties every invocation's caches too: a level an installed package or the
    template sets while a script holds views reaches that script at once."""

    generation = 0  # level changes made so far, by anyone

    def __get__(self, target: Any, owner: Any = None) -> Any:
        if target is None:
            return self
        context = current()
        if context is not None and context.views:
            if context.caches_generation != Cache.generation:
                context.caches.clear()
                context.caches_generation = Cache.generation
            return context.caches.setdefault(id(target), {})
        return target.__dict__["_cache"]

    def __set__(self, target: Any, value: Any) -> None:
        target.__dict__["_cache"] = value


def install() -> Callable[[], None]:
    """Give each invocation its own view of the loggers; returns the undo."""
    loggers = [logging.root, *(v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger))]
    for logger in loggers:
        for name in LIST_FIELDS:
            logger.__dict__[name] = SharedList(logger, name, list(logger.__dict__.get(name, ())))
    for name in LIST_FIELDS:
        setattr(logging.Logger, name, Field(name))
    _saved_disable.append(logging.Manager.__dict__.get("disable"))
    clear_cache = logging.Manager._clear_cache  # type: ignore[attr-defined]

    def _clear_cache(manager: logging.Manager) -> None:
        Cache.generation += 1
        for logger in (manager.root, *manager.loggerDict.values()):
            if isinstance(logger, logging.Logger):
                logger.__dict__["_cache"].clear()  # the process's, whoever changed a level

    logging.Manager._clear_cache = _clear_cache  # type: ignore[attr-defined]
    basic_config, clear_handlers = logging.basicConfig, logging.config._clearExistingHandlers  # type: ignore[attr-defined]
    logging.basicConfig = _basic_config(basic_config)
    logging.config._clearExistingHandlers = _clear_existing_handlers(clear_handlers)  # type: ignore[attr-defined]

    def undo() -> None:
        deactivate()
        for name in LIST_FIELDS:
            delattr(logging.Logger, name)
        _saved_disable.clear()
        logging.Manager._clear_cache = clear_cache  # type: ignore[attr-defined]
        logging.basicConfig = basic_config
        logging.config._clearExistingHandlers = clear_handlers  # type: ignore[attr-defined]
        for logger in logging.Logger.manager.loggerDict.values():
            if isinstance(logger, logging.Logger):
                for name in LIST_FIELDS:
                    logger.__dict__[name] = list.__getitem__(logger.__dict__.get(name, []), slice(None))
        for name in LIST_FIELDS:
            logging.root.__dict__[name] = list.__getitem__(logging.root.__dict__[name], slice(None))

    return undo


SCALAR_FIELDS = tuple(name for name in LOGGER_FIELDS if name not in LIST_FIELDS)
_saved_disable: list[Any] = []  # the manager's own `disable` (a property from Python 3.11 on)


def activate() -> None:
    """The first of overlapping invocations begins: the loggers' levels, `propagate`, `disabled`,
    caches and the manager's `disable` answer per invocation. (Their lists of handlers and
    filters always do: they are read only when a record is handled.)"""
    for name in SCALAR_FIELDS:
        setattr(logging.Logger, name, Field(name))
    logging.Logger._cache = Cache()  # type: ignore[attr-defined]
    if isinstance(_saved_disable[0], property):  # keeps a checked level in `_disable`
        logging.Manager.disable = Field("disable", "_disable", logging._checkLevel)  # type: ignore
    else:
        logging.Manager.disable = Field("disable")  # type: ignore[attr-defined]


def deactivate() -> None:
    """The last of overlapping invocations has ended: what a disabled log call reads is plain
    again (each field keeps the process's value where logging keeps it)."""
    if "_cache" not in logging.Logger.__dict__:
        return
    for name in (*SCALAR_FIELDS, "_cache"):
        delattr(logging.Logger, name)
    if _saved_disable[0] is None:
        del logging.Manager.disable
    else:
        logging.Manager.disable = _saved_disable[0]  # type: ignore[attr-defined]


def _added(context: InvocationContext) -> list[logging.Handler]:
    """The handlers the invocation added to its views of the loggers."""
    added: list[logging.Handler] = []
    for target, view in context.views.values():
        own = view.get("handlers")
        if own is not None:
            shared = list.__getitem__(target.__dict__.get("handlers", []), slice(None))
            added += [h for h in own if h not in shared and h not in added]
    return added


def _close(handlers: list[logging.Handler]) -> None:
    for handler in handlers:
        try:
            handler.flush()
            handler.close()
        except Exception:  # said in the job's stderr, as logging says it at a process's exit
            traceback.print_exc()


def end(context: InvocationContext) -> None:
    """Flush and close the handlers the invocation added, as its process's exit would."""
    _close(_added(context))


def _scripts(context: Optional[InvocationContext]) -> bool:
    return context is not None and context.owns_caller()


def _basic_config(real: Callable[..., None]) -> Callable[..., None]:
    """`basicConfig(force=True)` in a script removes the root's handlers from its view and closes
    those it added: the process's handlers are not the script's to close."""

    def basicConfig(**kwargs: Any) -> None:
        context = current()
        if kwargs.get("force") and _scripts(context):
            kwargs["force"] = False
            shared = list.__getitem__(logging.root.__dict__["handlers"], slice(None))
            seen = logging.root.handlers[:]
            for handler in seen:
                logging.root.removeHandler(handler)
            _close([h for h in seen if h not in shared])
        real(**kwargs)

    basicConfig.__doc__ = real.__doc__
    return basicConfig


def _clear_existing_handlers(real: Callable[[], None]) -> Callable[[], None]:
    """`dictConfig` and `fileConfig` in a script close the handlers it added, not the process's
    (theirs would close every handler of the process)."""

    def clear() -> None:
        context = current()
        if not _scripts(context):
            return real()
        own = _added(context)  # type: ignore[arg-type]
        for name, handler in list(logging._handlers.items()):  # type: ignore[attr-defined]
            if handler in own:
                del logging._handlers[name]  # type: ignore[attr-defined]
        _close(own)

    return clear

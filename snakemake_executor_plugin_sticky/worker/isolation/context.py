"""The invocation a thread runs for, whose code a call comes from, and who may change the process.

A resident worker runs many scripts in one process, one after another (`slots: 1`) or side by side
in threads. Everything the isolation routes (streams, `sys.path`, logging, warnings, modules, ...)
asks `current()` which invocation the calling thread works for; threads a script starts inherit
its invocation. Changes are the script's when the code that makes them is the script's own (its
file, or a workflow module it imported): what an installed package or the template changes, even
while a script runs, belongs to the process, as it would in a fresh job that imported them.
"""

from __future__ import annotations

import io
import os
import sys
import sysconfig
import threading
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

_local = threading.local()
_HERE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_STDLIB = tuple({os.path.realpath(sysconfig.get_path(k)) + os.sep for k in ("stdlib", "platstdlib")})
_STDLIB += tuple({sysconfig.get_path(k) + os.sep for k in ("stdlib", "platstdlib")})
_transparent: dict[str, bool] = {}


class IsolationError(RuntimeError):
    """A script changes what belongs to the whole worker process while other invocations run in it."""


class InvocationExit(BaseException):
    """A script called `os._exit(status)`, or handed its process to a program (`os.exec*`): in a
    fresh process the process would end with that status; in a resident worker the invocation
    does, and the worker lives on."""

    def __init__(self, status: int, how: str = "") -> None:
        super().__init__(status)
        self.status = status
        self.how = how or f"os._exit({status})"  # what ended it, as the job's error says


@dataclass(eq=False)
class InvocationContext:
    """What one invocation sees of the process: its own streams, `sys.argv`, `sys.path`, `__main__`,
    workflow modules, logging and warnings views, random generators, figures and `atexit` hooks."""

    key: str
    rule: str
    template: str
    slots: int
    script: str
    threads: int
    workdir: str
    roots: tuple[str, ...]  # the workflow's folders: modules found there are the invocation's own
    path: list[str]
    argv: list[str]
    main: types.ModuleType
    tmpdir: str = ""  # the rule's tmpdir resource, for TMPDIR and its kin
    files: set[str] = field(default_factory=set)  # code files whose calls are the script's
    builtins: Any = None  # a module of builtins whose `__import__` finds the invocation's own modules
    modules: dict[str, types.ModuleType] = field(default_factory=dict)  # the invocation's own modules
    found: dict[str, Any] = field(default_factory=dict)  # top-level names: a spec of its own, or None
    cleanup_script: bool = True  # remove the script's copy at the end (no --skip-script-cleanup)
    script_copy: Optional[str] = None  # as Snakemake's runner writes it: `__real_file__`, a new Python's main
    overrides: dict[str, Any] = field(default_factory=dict)  # stdout/stderr the script assigned
    views: dict[int, tuple[Any, dict[str, Any]]] = field(default_factory=dict)  # per-object overlays
    caches: dict[int, dict] = field(default_factory=dict)  # logging's level caches under the overlays
    caches_generation: int = 0  # logs.Cache.generation the caches were made under
    environ: dict[str, Optional[str]] = field(default_factory=dict)  # values before the script's changes
    env_overlay: dict[str, Optional[str]] = field(default_factory=dict)  # slots > 1: its own (None: unset)
    exit_hooks: list[tuple[Callable, tuple, dict]] = field(default_factory=list)
    started: list[threading.Thread] = field(default_factory=list)  # threads the script started
    generators: dict[str, Any] = field(default_factory=dict)  # random, numpy.random
    cleanup: list[Callable[[], None]] = field(default_factory=list)
    forked: bool = False  # a child forked by the script: its buffers stay with the worker
    ended: bool = False

    def __post_init__(self) -> None:
        self.out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace", write_through=True)
        self.err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace", write_through=True)
        if self.script:
            self.files.add(self.script)

    def stream(self, name: str) -> Any:
        """Where this invocation's `sys.<name>` writes: what the script assigned, else its buffer."""
        override = self.overrides.get(name)
        if override is not None:
            return override
        if self.forked:
            return None
        return self.out if name == "stdout" else self.err

    def output(self) -> tuple[str, str]:
        """What the invocation printed, to send back with its result."""
        return tuple(s.buffer.getvalue().decode("utf-8", "backslashreplace") for s in (self.out, self.err))

    def view(self, target: Any) -> dict[str, Any]:
        """This invocation's own values of `target`'s attributes (made on its first change)."""
        entry = self.views.get(id(target))
        if entry is None:
            entry = self.views[id(target)] = (target, {})
        return entry[1]

    def viewed(self, target: Any) -> Optional[dict[str, Any]]:
        """This invocation's own values of `target`'s attributes, if it changed any."""
        entry = self.views.get(id(target))
        return None if entry is None else entry[1]

    def owns_caller(self) -> bool:
        """Whether the code calling into the isolation is the script's own: the innermost frame
        outside the standard library and this package is the script or a module of its own."""
        frame = sys._getframe(1)
        while frame is not None:
            name = frame.f_code.co_filename
            transparent = _transparent.get(name)
            if transparent is None:
                transparent = _transparent[name] = is_transparent(name)
            if not transparent:
                return name in self.files
            frame = frame.f_back
        return False


def is_transparent(filename: str) -> bool:
    """Frames that act for their caller: the standard library, generated code, the isolation."""
    if filename.startswith("<") or filename.startswith(_HERE):
        return True
    return filename.startswith(_STDLIB) and "-packages" + os.sep not in filename


def current() -> Optional[InvocationContext]:
    """The invocation this thread works for, or None (the worker's own threads, the template's)."""
    context = getattr(_local, "context", None)
    if context is None or context.ended:
        return None
    return context


def set_current(context: Optional[InvocationContext]) -> None:
    """This thread works for `context` from now on (None: for nobody)."""
    _local.context = context


class Admission:
    """The invocations running in this process. A script may change what belongs to the process
    (its working directory, its environment) only while it runs alone; the process is then its
    own until it ends, and invocations that arrive meanwhile wait. The first to enter and the last
    to leave a group of overlapping invocations run `on_first` and `on_last` (values of the
    process that only a group can have, such as the thread variables, are set and put back)."""

    def __init__(self, on_first: Callable[[InvocationContext], None], on_last: Callable[[], None]) -> None:
        self._changed = threading.Condition()
        self.running: set[InvocationContext] = set()
        self.holder: Optional[InvocationContext] = None
        self.on_first = on_first
        self.on_last = on_last

    def enter(self, context: InvocationContext) -> None:
        """Admit the invocation once no other holds the process alone."""
        with self._changed:
            self._changed.wait_for(lambda: self.holder is None)
            if not self.running:
                self.on_first(context)
            self.running.add(context)

    def leave(self, context: InvocationContext) -> None:
        """The invocation has ended."""
        with self._changed:
            self.running.discard(context)
            if self.holder is context:
                self.holder = None
            if not self.running:
                self.on_last()
            self._changed.notify_all()

    def claim(self, context: InvocationContext, call: str, what: str, shared: bool = False) -> None:
        """The script is about to change the process's `what`: allowed only while it runs alone.
        What is `shared` (the working directory, the standard descriptors) is refused every time
        a template has slots above 1, whether a neighbour runs now or not: the first test run
        shows it, not a busy day in production."""
        with self._changed:
            if self.holder is context:
                return
            others = len(self.running - {context})
            if others or (shared and context.slots > 1):
                raise IsolationError(
                    f"Rule '{context.rule}' ({context.script}): {call} changes the {what} of the whole worker "
                    f"process, which the invocations running beside this one share (template "
                    f"'{context.template}' has slots: {context.slots}). The change was not made. Give template "
                    f"'{context.template}' slots: 1 to let its scripts change the {what}, or pass the value "
                    "to what needs it (e.g. subprocess.run(..., cwd=..., env=...), absolute paths)."
                )
            self.holder = context

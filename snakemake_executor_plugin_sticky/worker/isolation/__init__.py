"""Each invocation in a resident worker sees the process a fresh job would see.

Scripts are written for a process of their own: Snakemake starts one per job. A resident worker
runs many scripts in one process, one after another or side by side (`slots` above 1). What a
script changes in the process (its streams, logging, warnings filters, working directory,
environment, `sys.argv`, `sys.path`, the modules of the workflow's folders, `__main__`, the global
random generators, pyplot's figures, `atexit` hooks, threads) is kept to its invocation and
undone when it ends; what it cannot keep to itself with neighbours beside it (the directory and
the environment) fails clearly instead of reaching them. The template's state, and the packages
it and the scripts import, stay: that is what makes the next invocation cheap.

The table of what is per invocation and what is shared is in docs/further.md ("What the script
sees"). Each part lives in a module of its own: `system` (streams, argv, path), `modules`,
`logs`, `libraries` (warnings, random, pyplot), `process` (directory, environment, exit hooks,
threads), around the routing core in `context`.
"""

from __future__ import annotations

import os
import pickle
import sys
import tempfile
import types
from contextlib import contextmanager
from importlib.machinery import SourceFileLoader
from typing import Any, Callable, Iterator, Optional

from . import libraries, logs, modules, process, system, threadpools
from .context import Admission, InvocationContext, InvocationExit, IsolationError, current, set_current

__all__ = ["Isolation", "IsolationError", "InvocationContext", "InvocationExit", "current", "preamble"]


class Isolation:
    """The isolation of one resident worker process: installed when it becomes resident."""

    def __init__(self, workdir: str, slots: int) -> None:
        self.workdir = workdir
        self.slots = slots
        self.libraries = libraries.Libraries()
        self.pools = threadpools.ThreadPools()
        self.admission = Admission(self._first, self._last)
        self._job_variables: dict[str, Optional[str]] = {}
        self._tempdir: Optional[str] = None

    def install(self) -> Callable[[], None]:
        """Route what scripts may change per invocation; returns the undo (attach mode)."""
        undo = [system.install(), modules.install(), logs.install(), self.libraries.install()]
        undo.append(process.install(self.admission))
        undo.append(threadpools.install())
        modules.IMPORT_HOOKS.append(self.libraries.check)

        def uninstall() -> None:
            modules.IMPORT_HOOKS.remove(self.libraries.check)
            while undo:
                undo.pop()()

        return uninstall

    def _first(self, context: InvocationContext) -> None:
        for part in (system, logs, process):  # between invocations the process pays nothing
            part.activate()
        self.libraries.first()
        self._job_variables = process.set_job_variables(context.threads, context.tmpdir)
        if self.slots == 1:
            self.pools.begin(context.threads, libraries.loaded("torch"))
        self._tempdir = tempfile.tempdir
        tempfile.tempdir = None  # `tempfile` looks at the job's TMPDIR anew

    def _last(self) -> None:
        process.restore_environment(self._job_variables)
        process.restore_settings()
        tempfile.tempdir = self._tempdir
        self.pools.end()
        self.libraries.last()
        for part in (process, logs, system):
            part.deactivate()

    @contextmanager
    def invocation(self, invocation: Any) -> Iterator[InvocationContext]:
        """Run the body as the invocation's own process; undo what its script changed at the end.
        A failure anywhere in it, as it begins too, fails this invocation alone: what began is
        undone and the invocation leaves, so the process stays as clean as before."""
        context = self.context(invocation)
        self.admission.enter(context)
        before = list(sys.modules)
        try:
            before = modules.begin(context)
            if invocation.script:  # a `shell:` job runs no Python of its own
                context.main.__dict__.update(preamble(invocation, context.builtins))
                copy = modules.write_script_copy(context)
                context.main.__dict__.update(__real_file__=copy, __loader__=SourceFileLoader("__main__", copy))
            self.libraries.check()
            libraries.begin(context)
            set_current(context)
            yield context
        finally:
            try:
                self.end(context, before)
            finally:
                context.ended = True
                set_current(None)
                self.admission.leave(context)

    def context(self, invocation: Any) -> InvocationContext:
        """A new invocation's view of the process."""
        script = invocation.script
        folders = {self.workdir, os.path.dirname(script) or self.workdir, invocation.basedir or self.workdir}
        # as in a job Snakemake starts: its script's copy's folder first, the script's last
        path = [os.path.join(self.workdir, ".snakemake", "scripts"), *sys.__dict__["path"]]
        if script and os.path.dirname(script) not in path:
            path.append(os.path.dirname(script))
        return InvocationContext(
            key=invocation.key,
            rule=invocation.rule,
            template=invocation.template,
            slots=self.slots,
            script=script,
            threads=int(invocation.snakemake.threads),
            tmpdir=str(getattr(getattr(invocation.snakemake, "resources", None), "tmpdir", "") or ""),
            workdir=self.workdir,
            roots=tuple(sorted({os.path.realpath(f) + os.sep for f in folders})),
            path=path,
            argv=[script],
            main=types.ModuleType("__main__"),
            cleanup_script=getattr(invocation, "cleanup_scripts", True),
        )

    def end(self, context: InvocationContext, before: list[str]) -> None:
        """Undo, in the order a process's exit would, every step even when one fails (the
        first failure is raised once all have run)."""
        steps = [
            lambda: process.end(context),
            lambda: libraries.end(context),
            lambda: logs.end(context),
            lambda: [s.flush() for s in context.overrides.values() if not getattr(s, "closed", False)],
            lambda: modules.end(context, before),
        ]
        failure: Optional[BaseException] = None
        for step in steps:
            try:
                step()
            except BaseException as e:
                failure = failure or e
        if failure is not None:
            raise failure


def preamble(invocation: Any, builtins: types.ModuleType) -> dict[str, Any]:
    """The globals Snakemake's script preamble gives a script (snakemake.script.PythonScript),
    with the script's builtins; `__real_file__` is the script's copy once it is written."""
    from snakemake.iocontainers import Snakemake
    from snakemake.logging import logger

    real = os.path.realpath(invocation.script)
    return {
        "__builtins__": builtins,
        "__file__": real,
        "__real_file__": real,
        "__cached__": None,
        "sys": sys,
        "pickle": pickle,
        "snakemake": invocation.snakemake,
        "logger": logger,
        "Snakemake": Snakemake,
    }

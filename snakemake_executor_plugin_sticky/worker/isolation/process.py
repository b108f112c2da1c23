"""What belongs to the whole process: its working directory, its environment, exit hooks, threads.

- `os.chdir` and changes to `os.environ` made by a script are undone when it ends. With `slots`
  above 1 they would reach the invocations beside it, so a script may make them only while it
  runs alone (the process is then its own until it ends); otherwise the call fails, naming
  itself and `slots: 1` (see context.Admission).
- The rule's `threads` reach `OMP_NUM_THREADS` and the other variables Snakemake sets for a job,
  for the script and the programs it starts.
- `atexit` hooks a script registers run at its end, as its process's exit would run them, after
  the threads it started have ended (an executor's idle threads are shut down, as at exit).
- Threads a script starts work for its invocation: their prints and logs are the job's.
- A process forked in the worker starts with a fresh Python's SIGTERM and SIGINT handlers.
- The standard file descriptors a script points elsewhere (`os.dup2(log, 1)`) are put back at
  its end; moving one beside a neighbour fails as a directory change does. Signal handlers, the
  umask and the locale scripts set are put back to the process's own once the invocations that
  overlapped have all ended (after each with `slots: 1`), whatever order they end in.
"""

from __future__ import annotations

import atexit
import locale
import os
import signal
import subprocess
import sys
import threading
import traceback
from typing import Any, Callable, Iterator, Optional

from .context import Admission, InvocationContext, InvocationExit, IsolationError, current, set_current

# What Snakemake sets for a job from its `tmpdir` resource
TMPDIR_VARIABLES = ("TMPDIR", "TMP", "TEMP", "TEMPDIR")
# What Snakemake's shell sets for a job: its `threads` for every threading library
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "GOTO_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)
_set = os._Environ.__setitem__
_unset = os._Environ.__delitem__
_get = os._Environ.__getitem__
_keys = os._Environ.__iter__
_admission: Optional[Admission] = None
_installed = False
# The process's own, before the worker relays and journals `signal.signal`: a fork child sets its
# handlers with it (it has one thread, and nothing to journal).
_set_handler = signal.signal


class InvocationEnviron(os._Environ):
    """The class of `os.environ` in a resident worker: a script's changes are its invocation's.
    With `slots: 1` they are made in the process and undone at the script's end. With more slots
    they are the invocation's own, over the process's: what runs for the invocation reads them
    (the script, the libraries it calls, the threads it starts), the processes it starts get them,
    and its neighbours never see them. Writing the value already there changes nothing."""

    def __getitem__(self, key: str) -> str:
        overlay = _overlay()
        if overlay and key in overlay:
            value = overlay[key]
            if value is None:
                raise KeyError(key)
            return value
        return _get(self, key)

    def __iter__(self) -> Iterator[str]:
        overlay = _overlay()
        keys = list(_keys(self))
        if not overlay:
            yield from keys
            return
        yield from (key for key in keys if overlay.get(key, "") is not None)
        present = set(keys)
        yield from (key for key, value in overlay.items() if value is not None and key not in present)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __setitem__(self, key: str, value: str) -> None:
        overlay = _overlay(writing=True)
        if overlay is not None:
            self.encodevalue(value), self.encodekey(key)  # refused as os.environ refuses it
            overlay[key] = value
            return
        if self.get(key) == value:
            return
        _changing_environment(key)
        _set(self, key, value)

    def __delitem__(self, key: str) -> None:
        overlay = _overlay(writing=True)
        if overlay is not None:
            if key not in self:
                raise KeyError(key)
            overlay[key] = None
            return
        _changing_environment(key)
        _unset(self, key)


def _overlay(writing: bool = False) -> Optional[dict[str, Optional[str]]]:
    """The environment of the calling thread's invocation, over the process's, where neighbours
    may run beside it (slots above 1); None elsewhere. A change is the invocation's when the
    script's own code makes it; what a library sets while it runs is the process's."""
    context = current()
    if context is None or context.slots <= 1 or context.forked:
        return None
    if writing and not context.owns_caller():
        return None
    return context.env_overlay


def _get_or_none(key: str) -> Optional[str]:
    """The process's own value of the variable."""
    try:
        return _get(os.environ, key)
    except KeyError:
        return None


def invocation_environment() -> Optional[dict[str, str]]:
    """The whole environment of the calling thread's invocation, for a process it starts; None
    where it is the process's."""
    return dict(os.environ) if _overlay() else None


def _popen_init(real: Callable[..., None]) -> Callable[..., None]:
    def init(self: Any, args: Any, *rest: Any, **kwargs: Any) -> None:
        if kwargs.get("env") is None and len(rest) < 10:  # env is Popen's eleventh parameter
            kwargs["env"] = invocation_environment()
        real(self, args, *rest, **kwargs)

    return init


def _system(real: Callable[[str], int]) -> Callable[[str], int]:
    def system(command: str) -> int:
        env = invocation_environment()
        if env is None:
            return real(command)
        code = subprocess.call(command, shell=True, env=env)
        return code << 8 if code >= 0 else -code  # a wait status, as os.system returns

    system.__name__, system.__doc__ = "system", real.__doc__
    return system


def _changing_environment(key: str) -> None:
    context = current()
    if context is None or _admission is None or not context.owns_caller():
        return
    _admission.claim(context, f"os.environ[{key!r}] = ...", "environment")
    if key not in context.environ:
        context.environ[key] = os.environ.get(key)


def _guard_chdir(real: Callable[[Any], None], name: str) -> Callable[[Any], None]:
    def chdir(path: Any) -> None:
        context = current()
        if context is not None and _admission is not None and context.owns_caller():
            _admission.claim(context, f"os.{name}({path!r})", "working directory", shared=True)
        real(path)

    chdir.__name__ = name
    chdir.__doc__ = real.__doc__
    return chdir


def _guard_dup2(real: Callable[..., int], saved: dict[int, int]) -> Callable[..., int]:
    def dup2(fd: int, fd2: int, inheritable: bool = True) -> int:
        context = current()
        if fd2 in saved and context is not None and _admission is not None and context.owns_caller():
            _admission.claim(context, f"os.dup2({fd}, {fd2})", "standard file descriptors", shared=True)
            context.cleanup.append(lambda: real(saved[fd2], fd2, True))
        return real(fd, fd2, inheritable)

    dup2.__doc__ = real.__doc__
    return dup2


# The process's own values of the settings scripts changed (the umask, a locale category, a
# signal's handler), kept at the first change since no invocation ran and put back when the last
# of the invocations that overlapped ends: whatever order neighbours change and end in, the
# process ends with its own value.
_originals: dict[tuple[str, Any], tuple[Callable, tuple, Any]] = {}
_originals_lock = threading.Lock()


def _journal(real: Callable[..., Any], previous: Callable[..., Any], changes: Callable[..., bool]) -> Callable:
    """`real`, whose changes made by scripts are undone once the invocations that overlapped have
    ended: `previous(*args)` reads what the call replaces, before it is made, and
    `changes(*args)` says whether the call changes it."""

    def journaled(*args: Any, **kwargs: Any) -> Any:
        context = current()
        if context is None or not changes(*args, **kwargs) or not context.owns_caller():
            return real(*args, **kwargs)
        key = (real.__name__, args[0] if args and real.__name__ != "umask" else None)
        with _originals_lock:
            if key not in _originals:
                _originals[key] = (journaled, args, previous(*args, **kwargs))
            return real(*args, **kwargs)

    journaled.__doc__ = real.__doc__
    journaled.__name__ = real.__name__
    return journaled


def restore_settings() -> None:
    """Put back the process's own umask, locale and signal handlers (the last of the overlapping
    invocations has ended)."""
    with _originals_lock:
        kept = list(_originals.values())
        _originals.clear()
    for call, args, before in kept:
        _put_back(call, args, before)


def _put_back(call: Callable, args: tuple, before: Any) -> None:
    if call.__name__ == "umask":
        os.umask(before)
    elif call.__name__ == "setlocale":
        locale.setlocale(args[0], before)
    else:
        signal.signal(args[0], before)


def _register(real: Callable) -> Callable:
    def register(func: Callable, *args: Any, **kwargs: Any) -> Callable:
        context = current()
        if context is not None and context.owns_caller():
            context.exit_hooks.append((func, args, kwargs))
            return func
        return real(func, *args, **kwargs)

    register.__doc__ = real.__doc__
    return register


def _unregister(real: Callable) -> Callable:
    def unregister(func: Callable) -> None:
        context = current()
        if context is not None:
            context.exit_hooks[:] = [hook for hook in context.exit_hooks if hook[0] != func]
        real(func)

    unregister.__doc__ = real.__doc__
    return unregister


def _after_fork_in_child() -> None:
    """A process forked in a resident worker (a script's `multiprocessing.Pool`) is not the
    worker: it gets a fresh Python's SIGTERM and SIGINT, not the worker's. With the worker's
    handler a pool child outlives `Pool.terminate`, and the script waits for it forever."""
    if not _installed:
        return
    _set_handler(signal.SIGTERM, signal.SIG_DFL)
    _set_handler(signal.SIGINT, signal.default_int_handler)
    context = current()
    if context is not None:
        for key, value in (context.env_overlay if context.slots > 1 else {}).items():
            if value is None:
                if _get_or_none(key) is not None:
                    _unset(os.environ, key)
            else:
                _set(os.environ, key, value)  # the invocation's environment is the child's own
        context.forked = True  # the child's prints go to the descriptors it inherited


def install(admission: Admission) -> Callable[[], None]:
    """Guard the process's directory and environment, keep exit hooks and threads to the
    invocation that makes them; returns the undo."""
    global _admission, _installed
    _admission, _installed = admission, True
    saved = [(os, "chdir", os.chdir), (os, "fchdir", os.fchdir), (atexit, "register", atexit.register)]
    saved += [(atexit, "unregister", atexit.unregister), (threading.Thread, "start", threading.Thread.start)]
    saved += [(threading.Thread, "_bootstrap_inner", threading.Thread._bootstrap_inner)]  # type: ignore[attr-defined]
    saved += [(threading.Thread, "__init__", threading.Thread.__init__), (os, "dup2", os.dup2)]
    saved += [(os, "umask", os.umask), (locale, "setlocale", locale.setlocale), (signal, "signal", signal.signal)]
    saved += [(os, "_exit", os._exit), (signal, "alarm", signal.alarm), (signal, "setitimer", signal.setitimer)]
    saved += [(os, "execv", os.execv), (os, "execve", os.execve)]
    saved += [(subprocess.Popen, "__init__", subprocess.Popen.__init__), (os, "system", os.system)]
    subprocess.Popen.__init__ = _popen_init(subprocess.Popen.__init__)  # type: ignore[method-assign]
    os.system = _system(os.system)
    worker = os.getpid()
    os._exit = _guard_exit(os._exit, worker)
    os.execv = _exec_as_child(os.execv, worker)
    os.execve = _exec_as_child(os.execve, worker)
    signal.alarm = _refuse_timer(signal.alarm, "alarm", worker)
    signal.setitimer = _refuse_timer(signal.setitimer, "setitimer", worker)
    standard = {fd: os.dup(fd) for fd in (0, 1, 2) if _is_open(fd)}
    os.dup2 = _guard_dup2(os.dup2, standard)
    umask = os.umask
    os.umask = _journal(umask, lambda mask: _current_umask(umask), lambda mask: True)
    setlocale = locale.setlocale
    locale.setlocale = _journal(setlocale, lambda c, value=None: setlocale(c), lambda c, value=None: value is not None)
    signal.signal = _journal(signal.signal, lambda signum, handler: signal.getsignal(signum), lambda s, h: True)
    os.chdir = _guard_chdir(os.chdir, "chdir")
    os.fchdir = _guard_chdir(os.fchdir, "fchdir")
    atexit.register = _register(atexit.register)
    atexit.unregister = _unregister(atexit.unregister)
    threading.Thread.__init__ = _init(threading.Thread.__init__)  # type: ignore[method-assign]
    threading.Thread.start = _start(threading.Thread.start)  # type: ignore[method-assign]
    threading.Thread._bootstrap_inner = _bootstrap(threading.Thread._bootstrap_inner)  # type: ignore[attr-defined]
    if not getattr(os, "_sticky_fork_hook", False):
        os.register_at_fork(after_in_child=_after_fork_in_child)  # cannot be undone: it checks _installed
        os._sticky_fork_hook = True  # type: ignore[attr-defined]

    def undo() -> None:
        global _admission, _installed
        os.environ.__class__ = os._Environ
        for owner, name, value in saved:
            setattr(owner, name, value)
        for fd in standard.values():
            os.close(fd)
        _admission, _installed = None, False

    return undo


def activate() -> None:
    """The first of overlapping invocations begins: `os.environ` is the invocations'."""
    os.environ.__class__ = InvocationEnviron


def deactivate() -> None:
    """The last of overlapping invocations has ended: `os.environ` is plain between them."""
    os.environ.__class__ = os._Environ


def _in_script(worker: int) -> Optional[InvocationContext]:
    """The invocation whose script makes the call, in the worker itself (not a forked child)."""
    context = current()
    return context if context is not None and os.getpid() == worker and context.owns_caller() else None


def _guard_exit(real: Callable[[int], Any], worker: int) -> Callable[[int], Any]:
    def _exit(status: int) -> Any:
        if _in_script(worker) is not None:
            raise InvocationExit(status)
        real(status)

    _exit.__name__, _exit.__doc__ = "_exit", real.__doc__
    return _exit


def _exec_as_child(real: Callable[..., Any], worker: int) -> Callable[..., Any]:
    """`os.exec*` in a script: in a fresh job the program replaces the job's process, and its
    status ends the job. In a worker it runs as the invocation's child, with the environment
    given or else the invocation's, and its status ends the invocation as `os._exit` would (a
    signal's as a shell reports it, 128 + its number); the worker lives on. (`execl`, `execlp`,
    `execvp` and the rest call `execv` or `execve`.)"""

    def exec_(path: Any, args: Any, *env: Any) -> Any:
        if _in_script(worker) is None:
            return real(path, args, *env)
        environment = dict(env[0]) if env else invocation_environment()
        code = subprocess.call(list(args), executable=os.fspath(path), env=environment)
        status = code if code >= 0 else 128 - code
        raise InvocationExit(status, f"os.{real.__name__}({os.fspath(path)!r}, ...), which ended with status {status}")

    exec_.__name__, exec_.__doc__ = real.__name__, real.__doc__
    return exec_


def _refuse_timer(real: Callable[..., Any], name: str, worker: int) -> Callable[..., Any]:
    """signal.alarm and setitimer deliver SIGALRM to the worker's main thread, not to the script's
    thread, and one left set would end the worker: a script may cancel one, not set one."""

    def timer(*args: Any, **kwargs: Any) -> Any:
        context = _in_script(worker)
        seconds = args[0] if name == "alarm" else (args[1] if len(args) > 1 else kwargs.get("seconds", 0))
        if context is not None and seconds:
            raise IsolationError(
                f"Rule '{context.rule}' ({context.script}): signal.{name}(...) cannot interrupt a script in a "
                "resident worker (SIGALRM goes to the worker's main thread, and one left set would end the "
                "worker). The timer was not set. Limit the rule with its runtime resource or "
                "--sticky-invocation-timeout, or use a timeout of the call that may hang."
            )
        return real(*args, **kwargs)

    timer.__name__, timer.__doc__ = name, real.__doc__
    return timer


def _init(real: Callable) -> Callable:
    def init(self: threading.Thread, *args: Any, **kwargs: Any) -> None:
        real(self, *args, **kwargs)
        if kwargs.get("daemon") is None:
            context = current()
            if context is not None and context.owns_caller():
                # A script's thread is not a daemon unless it asks, as in its own process (the
                # worker's task threads are daemons, and a new thread takes its creator's flag).
                self.daemon = False

    init.__doc__ = real.__doc__
    return init


def _start(real: Callable) -> Callable:
    def start(self: threading.Thread) -> None:
        context = current()
        if context is not None and context.owns_caller():
            self._sticky_invocation = context  # type: ignore[attr-defined]
            context.started.append(self)
        real(self)

    start.__doc__ = real.__doc__
    return start


def _bootstrap(real: Callable) -> Callable:
    def bootstrap_inner(self: threading.Thread) -> None:
        context = self.__dict__.get("_sticky_invocation")
        if context is not None:
            set_current(context)
        real(self)

    return bootstrap_inner


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def _current_umask(umask: Callable[[int], int]) -> int:
    mask = umask(0o022)
    umask(mask)
    return mask


def job_variables(threads: int, tmpdir: str) -> dict[str, str]:
    """What Snakemake sets for a job: its thread variables and, from its `tmpdir` resource, its
    temporary folder's."""
    values = {name: str(threads) for name in THREAD_VARIABLES}
    if tmpdir:
        values.update({name: tmpdir for name in TMPDIR_VARIABLES})
    return values


def set_job_variables(threads: int, tmpdir: str) -> dict[str, Optional[str]]:
    """Set what Snakemake sets for a job (which `tempfile` then follows); returns what they were."""
    values = job_variables(threads, tmpdir)
    before = {name: os.environ.get(name) for name in values}
    for name, value in values.items():
        _set(os.environ, name, value)
    return before


def restore_environment(values: dict[str, Optional[str]]) -> None:
    """Put variables back as `values` has them (None: unset)."""
    for name, value in reversed(list(values.items())):
        if value is not None:
            _set(os.environ, name, value)
        elif name in os.environ:
            _unset(os.environ, name)


def end(context: InvocationContext) -> None:
    """What a process's exit does for a script: wait for its threads, run its exit hooks; then
    put back the directory and the environment it changed."""
    join_threads(context)
    while context.exit_hooks:
        func, args, kwargs = context.exit_hooks.pop()
        try:
            func(*args, **kwargs)
        except Exception:
            print(f"Exception ignored in atexit callback {func!r}:", file=sys.stderr)
            traceback.print_exc()
    while context.cleanup:
        context.cleanup.pop()()
    restore_environment(context.environ)
    try:
        moved = os.getcwd() != context.workdir
    except FileNotFoundError:
        moved = True
    if moved:
        os.chdir(context.workdir)  # the isolation's own call: no claim


def join_threads(context: InvocationContext) -> None:
    """Wait for the non-daemon threads the script started, as Python's exit does; the idle
    threads of an executor the script left open are asked to leave first."""
    queues = getattr(sys.modules.get("concurrent.futures.thread"), "_threads_queues", {})
    for thread in context.started:
        if thread in queues and thread.is_alive():
            reference = getattr(thread, "_args", (None,))[0]
            executor = reference() if callable(reference) else None
            if executor is not None and hasattr(executor, "shutdown"):
                executor.shutdown(wait=False)
    for thread in context.started:
        if not thread.daemon and thread is not threading.current_thread() and thread.ident is not None:
            thread.join()

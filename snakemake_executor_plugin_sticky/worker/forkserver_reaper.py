"""Imported by the forkserver process alone (see forkserver.py): it makes the forkserver the
`Reaper` of the local workers it forks (see processes.py).

The standard library's forkserver loop forks each worker with `os.fork` and collects ended
children with `os.waitpid(-1, WNOHANG)` when SIGCHLD wakes it. Both are wrapped here:

- a fork records the worker's pid; the worker itself, in its first instant, becomes a subreaper
  in a process group of its own (so Ctrl-C in the terminal reaches Snakemake, which shuts the
  workers down in order, and not the template's helpers);
- when a worker has ended, its orphaned tree (adopted here) is killed before its exit status goes
  to its Nanny, so the Nanny's replacement starts only once the old tree is gone;
- orphans that end are collected here silently; they are nobody's business but the reaper's.

When Snakemake exits, or dies, the forkserver's pipe from it closes and the loop raises
SystemExit: every worker tree is killed then. The forkserver then leaves through `os._exit`:
Python's usual finalization of a process that has Dask imported is slow (docs/benchmarks.md,
"Start-up costs"), and meanwhile it would still hold Snakemake's stdout and stderr open, so
whoever reads Snakemake's output would wait that long for the end.
"""

import atexit
import os
import signal
import sys

from ..wire import REAPER_ENV
from .processes import Reaper, set_subreaper


def to_stderr(message: str) -> None:
    """A line on Snakemake's stderr, which the forkserver shares."""
    print(message, file=sys.stderr, flush=True)


def in_forkserver() -> bool:
    """Whether this is the forkserver process (its command runs multiprocessing.forkserver.main)."""
    try:
        with open("/proc/self/cmdline", "rb") as f:
            return b"from multiprocessing.forkserver import main" in f.read()
    except OSError:
        return False


_fork, _waitpid = os.fork, os.waitpid
reaper = Reaper(to_stderr) if in_forkserver() else None


def fork() -> int:
    """The forkserver's fork of a worker: recorded; the worker becomes a subreaper in a group of its own."""
    assert reaper is not None
    pid = _fork()
    if pid == 0:  # a worker process
        os.fork, os.waitpid = _fork, _waitpid
        os.setpgid(0, 0)
        set_subreaper()
        os.environ[REAPER_ENV] = str(os.getppid())
    else:
        reaper.workers.add(pid)
    return pid


def waitpid(pid: int, options: int) -> tuple[int, int]:
    """The forkserver's collection of ended children: a worker's tree is ended first, orphans quietly."""
    assert reaper is not None
    while True:
        got, status = _waitpid(pid, options)
        if pid != -1 or got == 0 or got in reaper.workers:
            if got in reaper.workers:
                reaper.workers.discard(got)
                reaper.end_orphans(f"worker process {got}, which has ended,")
            return got, status
        # an orphan that was adopted here ended: collected, and the loop looks for more


# Installed only where the forkserver loop will use them, never in Snakemake's own process.
if reaper is not None:
    os.fork, os.waitpid = fork, waitpid
    # Out of Snakemake's process group: a signal to that group (kill -9 of a shell job) leaves
    # the reaper standing to kill the workers' trees. Writing to the terminal from a background
    # group must not stop it (stty tostop).
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    os.setpgid(0, 0)
    atexit.register(os._exit, 0)
    atexit.register(reaper.end_all, "Snakemake, which has ended,")  # runs before os._exit

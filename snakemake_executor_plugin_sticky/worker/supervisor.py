"""`python -m snakemake_executor_plugin_sticky.worker.supervisor COMMAND [ARGS...]`: run a worker so that
nothing it starts outlives it, and exit with the worker's real status.

Batch-job workers run under it (`-m distributed.cli.dask_worker ...`), and so can the workers of
attach mode (`... supervisor dask worker tls://host:8786 ...`). The supervisor is the worker's parent and
a `Reaper` (processes.py): a process the worker's tree leaves behind while the worker runs, or
the whole tree once the worker has ended, is adopted by the supervisor and ended. Signals the batch
system sends (SIGTERM before a preemption, SIGINT, SIGHUP, SIGUSR1/2) are passed on to the worker.

While the worker's process lives and is not stopped, the supervisor vouches for it to the
scheduler once a second (voucher.py): a step that holds the worker's interpreter lock stops the
worker's own heartbeats, and a busy worker is no lost one.

The exit status is the worker's: its exit code, or 128 + the signal that killed it, so a crashed
worker's job shows as failed, never as completed.

A local worker in a template's own environment runs under it too, started by the Snakemake
process, which passes it the read end of a pipe (its number in STICKY_SUPERVISOR_WATCH_FD) whose write
end only that process holds: when the pipe closes, that process is gone (killed, say), and the
supervisor ends the worker as the batch system would end a job. A pipe, not the parent's pid: a
container runtime may stand between the two.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import sys
import time

from ..wire import REAPER_ENV, WATCH_FD_ENV
from .processes import POLL_S, Reaper, descendants, end_tree
from .voucher import start_vouching

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
# After the worker ends: what it left gets SIGTERM, this long to go, then SIGKILL.
LEFTOVER_GRACE_S = 5.0
# A worker whose Snakemake process is gone gets SIGTERM (it leaves, running its teardown), and
# SIGKILL if it still runs this long after.
ORPHANED_GRACE_S = 30.0
USAGE = (
    "usage: python -m snakemake_executor_plugin_sticky.worker.supervisor COMMAND [ARGS...]  (or -m MODULE [ARGS...])"
)


def to_stderr(message: str) -> None:
    """A line on the job's stderr."""
    print(message, file=sys.stderr, flush=True)


def command_of(argv: list[str]) -> list[str]:
    """`-m MODULE ...` runs MODULE with this Python; anything else is a command on PATH."""
    if argv[0] == "-m":
        return [sys.executable, *argv]
    found = shutil.which(argv[0])
    if found is None:
        raise SystemExit(f"supervisor: command not found: {argv[0]}\n{USAGE}")
    return [found, *argv[1:]]


def exit_status(status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128 + the signal."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)


def watched_pipe() -> int | None:
    """The pipe of STICKY_SUPERVISOR_WATCH_FD, kept from the worker; None where there is none (a
    container runtime may not pass it on: then the worker's own loss of its scheduler ends it)."""
    try:
        fd = int(os.environ.get(WATCH_FD_ENV) or -1)
        os.fstat(fd)
    except (ValueError, OSError):
        return None
    os.set_inheritable(fd, False)
    return fd


class Forwarder:
    """Passes the signals the batch system sends on to the worker, until the worker's status is
    collected: its pid may then belong to another process, and nothing is sent."""

    def __init__(self, pid: int) -> None:
        self.pid: int | None = pid

    def __call__(self, sig: int, _frame: object = None) -> None:
        pid = self.pid
        if pid is None:
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        """The worker's status is collected: forward nothing more."""
        self.pid = None


def keep(argv: list[str]) -> int:
    """Run the command as the supervisor; return the exit status the supervisor should end with."""
    if not argv:
        raise SystemExit(USAGE)
    command = command_of(argv)
    reaper = Reaper(to_stderr)
    # A signal that comes between the spawn and the handlers waits (blocked) and is then passed
    # on: it neither kills the supervisor, orphaning the worker, nor gets lost. The worker starts
    # with no signal blocked.
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    watch = watched_pipe()
    environ = {k: v for k, v in os.environ.items() if k != WATCH_FD_ENV}
    worker = os.posix_spawn(command[0], command, {**environ, REAPER_ENV: str(os.getpid())}, setsigmask=())
    reaper.workers.add(worker)
    start_vouching(worker, command)
    forward = Forwarder(worker)
    for sig in FORWARDED:
        signal.signal(sig, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    orphaned_at = None
    status = None
    while status is None:
        if watch is not None and orphaned_at is None and select.select([watch], [], [], 0)[0]:
            to_stderr(f"supervisor: the process that started worker process {worker} is gone: ending the worker.")
            orphaned_at = time.monotonic()
            forward(signal.SIGTERM, None)
        elif orphaned_at is not None and time.monotonic() - orphaned_at > ORPHANED_GRACE_S:
            orphaned_at = float("inf")  # once
            forward(signal.SIGKILL, None)
        # Collect whatever ended (the worker, or orphans adopted here), then end new orphans:
        # they come from a process of the worker's tree that has died.
        while True:
            # blocked meanwhile: no signal is forwarded between the worker's reaping and the stop
            signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
            try:
                pid, raw = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid = 0
            if pid == worker:
                forward.stop()
                status = raw
            signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
            if pid == 0:
                break
        if status is None:
            if reaper.has_orphans():
                reaper.end_orphans("a process of the worker, which has ended,")
            time.sleep(10 * POLL_S)
    reaper.workers.clear()
    if descendants(os.getpid()):
        end_tree(os.getpid(), LEFTOVER_GRACE_S)
        reaper.end_orphans(f"worker process {worker}, which has ended,")
    return exit_status(status)


if __name__ == "__main__":
    sys.exit(keep(sys.argv[1:]))

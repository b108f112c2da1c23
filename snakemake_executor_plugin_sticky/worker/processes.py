"""A resident worker's process tree: the template may start processes at any depth, and none of
them outlives the worker.

Inference engines start helpers of their own: vLLM's engine core, DataLoader workers, tokenizer
pools, a model server binary. A helper that outlives its worker keeps its GPU memory (the next
worker on that GPU runs out of memory) and the pipes it inherited (`snakemake ... | tee run.log`
waits for it). Three parts keep the tree together, on Linux:

- Every worker is a *child subreaper* (`PR_SET_CHILD_SUBREAPER`): a helper whose own parent ends
  (a server that double-forks, the child of a pool process) is adopted by the worker instead of
  init, so everything the template starts stays in the worker's tree while the worker lives.
- A retiring worker ends its tree after the template's `teardown`: SIGTERM, the grace period,
  then SIGKILL (`end_tree`).
- A worker's parent is a `Reaper`, a subreaper too: the forkserver of local workers, the supervisor of
  batch-job workers (supervisor.py). When a worker dies abruptly (SIGKILL, a native crash, the OOM
  killer, its Nanny killing a hung worker), its tree is adopted by that parent, which kills it at
  once. The forkserver reports a worker's end to its Nanny only once the tree is gone, so a
  replacement never starts beside the old tree's GPU memory. When Snakemake itself dies, the
  forkserver sees its pipe close and kills every worker tree before it exits.

Not covered: processes started outside the tree (through a daemon such as Docker's or systemd's,
over ssh or srun on other nodes), processes in uninterruptible sleep (they end when the kernel
lets them), and SIGKILL of the reaper itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from ..wire import REAPER_ENV

PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37
POLL_S = 0.05
KILL_WAIT_S = 10.0  # how long SIGKILLed processes may take to go (a GPU context takes a moment)
WARN_AFTER_S = 2.0
TRACKER_GRACE_S = 1.0  # a reaper that waits longer than this says what it waits for
REAPER_GIVES_UP_S = 60.0  # processes that survive SIGKILL this long are stuck in the kernel
# set by a reaper (the forkserver, the supervisor) in the environment of the workers it guards

_libc: Optional[ctypes.CDLL] = None


def _prctl(option: int, value: int) -> bool:
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    return _libc.prctl(option, value, 0, 0, 0) == 0


def set_subreaper(on: bool = True) -> bool:
    """Make this process adopt its orphaned descendants (Linux only); False where it cannot."""
    return _prctl(PR_SET_CHILD_SUBREAPER, int(on))


def is_subreaper() -> bool:
    """Whether this process adopts its orphaned descendants."""
    if not sys.platform.startswith("linux"):
        return False
    value = ctypes.c_int(0)
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    _libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(value), 0, 0, 0)
    return bool(value.value)


@dataclass(frozen=True)
class Proc:
    """A process as /proc shows it; (pid, started) names it even after its pid is reused."""

    pid: int
    ppid: int
    started: int  # clock ticks after boot
    state: str
    name: str

    @property
    def running(self) -> bool:
        """Whether the process runs yet (it is not a zombie)."""
        return self.state not in ("Z", "X")

    def __str__(self) -> str:
        return f"{self.pid} ({self.name})"


def process_table() -> dict[int, Proc]:
    """Every process of this machine that /proc shows (none where there is no /proc)."""
    table: dict[int, Proc] = {}
    if not os.path.isdir("/proc"):
        return table
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                raw = f.read().decode(errors="replace")
        except OSError:  # ended meanwhile
            continue
        # the name may hold spaces and parentheses: the fields after it follow the last ')'
        name = raw[raw.find("(") + 1 : raw.rfind(")")]
        fields = raw[raw.rfind(")") + 2 :].split()
        table[int(entry)] = Proc(int(entry), int(fields[1]), int(fields[19]), fields[0], name)
    return table


def descendants(root: int, table: Optional[dict[int, Proc]] = None) -> list[Proc]:
    """The processes below `root`, at any depth, parents before their children."""
    table = process_table() if table is None else table
    children: dict[int, list[Proc]] = {}
    for proc in table.values():
        children.setdefault(proc.ppid, []).append(proc)
    found, frontier = [], [root]
    while frontier:
        below = [c for pid in frontier for c in children.get(pid, ()) if c.pid != root]
        found += below
        frontier = [c.pid for c in below]
    return found


def still_running(procs: Iterable[Proc], table: Optional[dict[int, Proc]] = None) -> list[Proc]:
    """Those of `procs` that run yet: not ended, not a zombie, their pid not reused."""
    table = process_table() if table is None else table
    return [p for p in procs if (now := table.get(p.pid)) is not None and now.started == p.started and now.running]


def is_resource_tracker(proc: Proc) -> bool:
    """A multiprocessing resource tracker: it ignores SIGTERM and, once the processes it serves
    are gone, removes the semaphores and shared memory they leaked. It is left to do that."""
    try:
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            return b"multiprocessing.resource_tracker" in f.read()
    except OSError:
        return False


def send(procs: Iterable[Proc], sig: int) -> None:
    """Send a signal to each of the processes that still exist."""
    for proc in procs:
        try:
            os.kill(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def end_tree(
    root: int,
    grace: float,
    spare: Callable[[], set[int]] = lambda: set(),
) -> list[Proc]:
    """End every process below `root`: SIGTERM, up to `grace` seconds to go, then SIGKILL. What
    appears meanwhile (a helper forking as it ends) is ended too. Processes whose pids `spare`
    returns are left alone, but not what runs below them: a forkserver helper's children are the
    template's pool processes. Returns those that would not end."""
    sent: dict[tuple[int, int], Proc] = {}
    deadline = time.monotonic() + grace
    sig = signal.SIGTERM
    while True:
        table = process_table()
        spared = spare()
        tree = [p for p in descendants(root, table) if p.pid not in spared]
        fresh = [p for p in tree if p.running and (p.pid, p.started) not in sent]
        send([p for p in fresh if not is_resource_tracker(p)], sig)
        sent.update({(p.pid, p.started): p for p in fresh})
        left = still_running(sent.values(), table)
        if not left:
            return []
        if time.monotonic() >= deadline:
            if sig == signal.SIGKILL:
                return left
            sig = signal.SIGKILL
            send(left, sig)
            deadline = time.monotonic() + KILL_WAIT_S
        time.sleep(POLL_S)


def guarded_by_reaper() -> bool:
    """Whether a reaper (the forkserver, the supervisor) is an ancestor of this process: it ends the
    processes this one started should it die abruptly."""
    reaper = os.environ.get(REAPER_ENV, "")
    if not reaper.isdigit():
        return False
    table = process_table()
    proc = table.get(os.getpid())
    while proc is not None and proc.ppid > 1:
        if proc.ppid == int(reaper):
            return True
        proc = table.get(proc.ppid)
    return False


def multiprocessing_helpers() -> set[int]:
    """This process's multiprocessing resource tracker and forkserver, if it started them: they
    serve the process, not a template (they ignore SIGTERM and end when the process does)."""
    pids = set()
    tracker = sys.modules.get("multiprocessing.resource_tracker")
    server = sys.modules.get("multiprocessing.forkserver")
    for module, owner, attribute in (
        (tracker, "_resource_tracker", "_pid"),
        (server, "_forkserver", "_forkserver_pid"),
    ):
        pid = getattr(getattr(module, owner, None), attribute, None)
        if isinstance(pid, int):
            pids.add(pid)
    return pids


class Reaper:
    """The parent of workers, made a subreaper: every child of it that is not one of its workers
    is an orphan that a dead worker left (a live worker, a subreaper itself, keeps its own), and is
    killed with everything below it."""

    def __init__(self, warn: Callable[[str], None]) -> None:
        self.workers: set[int] = set()
        self.warn = warn
        set_subreaper()

    def orphans(self, table: dict[int, Proc]) -> list[Proc]:
        """The reaper's children that are not its workers: the trees of dead workers."""
        me = os.getpid()
        return [p for p in table.values() if p.ppid == me and p.pid not in self.workers]

    def has_orphans(self) -> bool:
        """Whether a dead worker left processes here."""
        return bool(self.orphans(process_table()))

    def end_orphans(self, cause: str) -> None:
        """SIGKILL the orphans and all below them; return once they are gone (reaped), saying what
        it waits for when that takes more than a moment."""
        started = time.monotonic()
        said = 0.0
        while True:
            table = process_table()
            orphans = self.orphans(table)
            if not orphans:
                return
            tree = orphans + [d for o in orphans for d in descendants(o.pid, table)]
            waited = time.monotonic() - started
            # resource trackers get a moment to clean up after the processes they served
            trackers_too = waited >= TRACKER_GRACE_S
            send([p for p in tree if p.running and (trackers_too or not is_resource_tracker(p))], signal.SIGKILL)
            for orphan in orphans:
                reap(orphan.pid)
            if waited >= REAPER_GIVES_UP_S:
                self.warn(
                    f"Sticky: {len(tree)} process(es) that {cause} left did not end after SIGKILL "
                    f"within {REAPER_GIVES_UP_S:.0f} s ({', '.join(map(str, tree[:5]))}); going on without them."
                )
                return
            if waited >= WARN_AFTER_S and (not said or waited - said >= 10):
                said = waited
                self.warn(
                    f"Sticky: {cause} left {len(tree)} process(es); waiting for them to end before "
                    f"another worker starts ({', '.join(map(str, tree[:5]))})."
                )
            time.sleep(POLL_S)

    def end_all(self, cause: str) -> None:
        """The reaper is leaving: SIGKILL its workers too, with everything below them."""
        self.workers.clear()
        self.end_orphans(cause)


def reap(pid: int) -> Optional[int]:
    """Collect an ended child's exit status without waiting; None while it runs."""
    try:
        got, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return status if got == pid else None

"""The contract between the Snakemake process (head/) and the resident workers (worker/, api/):
everything both sides must agree on, in one place.

- The invocation a worker runs and the result it sends back.
- The event records a worker (or the scheduler) sends the run: frozen dataclasses, turned into
  the plain dicts Dask's events carry (`to_message`) and back (`from_message`).
- The Dask event topics, and the environment variables one side sets for the other.

It imports nothing of the package, and nothing heavier than the standard library.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import secrets
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Optional

PACKAGE = "snakemake-executor-plugin-sticky"

# Dask event topics
EVENT_TOPIC = "sticky"  # worker announcements and removals: the records below
RUNNING_TOPIC = "sticky-running"  # invocations starting and ending, for the scheduler plugin alone
STAGE_TOPIC = "sticky-stage"  # which worker holds which stage() copy
VOUCH_HANDLER = "sticky_vouch"  # the scheduler's handler a supervisor calls: its worker is alive

# Environment variables
LIFETIME_ENV = "STICKY_WORKER_LIFETIME_S"  # seconds after its start at which a batch-job worker leaves
REAPER_ENV = "STICKY_REAPER_PID"  # the reaper (forkserver, supervisor) above a worker
WATCH_FD_ENV = "STICKY_SUPERVISOR_WATCH_FD"  # a pipe whose end tells the supervisor the run is gone
CACHE_DIR_ENV = "STICKY_CACHE_DIR"  # where stage() caches in a process that is no resident worker


@dataclass
class ShellCommand:
    """A sticky `shell:` job's command, formatted by the head as Snakemake formats it (its prefix,
    such as bash's strict mode, and suffix included), except that its outputs' and logs' paths
    are tokens: the worker puts in the paths its attempt writes (see resolve). A field quoted in
    the command (`{output:q}`) is a token of its own, quoted once its paths are in."""

    command: str
    executable: Optional[str]  # Snakemake's shell executable (None: /bin/sh)
    tokens: dict[str, tuple[str, int]]  # token -> ("output" or "log", index)
    quoted: dict[str, str] = field(default_factory=dict)  # token -> the text to quote, with path tokens

    def resolve(self, snakemake: Any) -> str:
        """The command with the paths of `snakemake.output` and `snakemake.log` in place of the
        tokens; a path below the working directory stays relative to it, as Snakemake gives it."""
        paths = {}
        for token, (kind, index) in self.tokens.items():
            path = str(getattr(snakemake, kind)[index])
            if os.path.isabs(path) and not os.path.relpath(path).startswith(os.pardir):
                path = os.path.relpath(path)
            paths[token] = path

        def put(text: str) -> str:
            for token, path in paths.items():
                text = text.replace(token, path)
            return text

        command = self.command
        for token, text in self.quoted.items():
            command = command.replace(token, shlex.quote(put(text)))
        return put(command)


@dataclass
class Invocation:
    """One sticky job as a worker runs it: the script and the `snakemake` object it sees (what
    Snakemake's own `script:` preamble would give it), or a `shell:` job's command (`script` is
    then empty). Nothing of the workflow travels."""

    key: str
    template: str
    identity: str
    tag: str
    rule: str
    jobid: int
    script: str
    snakemake: Any  # snakemake.iocontainers.Snakemake
    timeout_s: Optional[float] = None
    basedir: Optional[str] = None  # the folder of the rule's Snakefile: its modules are the workflow's
    attempts: Optional[str] = None  # where fenced attempts write (see attempt_path); None: in place
    cleanup_scripts: bool = True  # remove the script's copy under .snakemake/scripts (--skip-script-cleanup)
    shell: Optional[ShellCommand] = None  # a `shell:` job: its command, run as a child of the worker (no script)


@dataclass
class InvocationResult:
    """What a worker reports for one invocation; `error` is a formatted traceback or None."""

    key: str
    worker: str
    address: str
    pid: int
    started: float
    finished: float
    error: Optional[str] = None
    stdout: str = ""
    stderr: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether the script ran to its end without an error."""
        return self.error is None


class Packed:
    """Invocations on their way to a worker, pickled once. Dask pickles a task where the client
    sends it, and the scheduler unpickles and pickles it again to pass it on: these stay bytes
    until the worker that runs them unpacks them. `dumps` is the pickler (cloudpickle's, which
    also takes what the workflow's config may hold); `count` is known without unpacking."""

    def __init__(
        self, items: Optional[list[Any]] = None, data: Optional[bytes] = None, count: int = 0, dumps: Any = None
    ) -> None:
        self._items = items
        self._data = data
        self.count = len(items) if items is not None else count
        self._dumps = dumps

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        if self._data is None:
            self._data = (self._dumps or pickle.dumps)(self._items)
        return (Packed, (None, self._data, self.count))

    def unpack(self) -> list[Any]:
        """The invocations."""
        return self._items if self._items is not None else pickle.loads(self._data or b"")


@dataclass
class Lost:
    """What a Dask task of invocations returns in place of their results when the worker that ran
    it was lost with one of them running (see head/engines/scheduler_plugin.py): the head, not
    Dask, decides which of them run again, so that one that crashed its workers too often runs
    nowhere any more."""

    address: str  # the worker that was lost


def worker_name(template: str, *parts: object) -> str:
    """The name a worker of the run joins with: its template's, then what tells it apart. The
    head knows a worker's template by it before the worker's first event (see template_of)."""
    return "-".join([template, *map(str, parts)])


def template_of(name: str, templates: Iterable[str]) -> Optional[str]:
    """The template of the run's worker named `name` (see worker_name), or None for a worker that
    is not the run's (attach mode)."""
    return max((t for t in templates if name.startswith(f"{t}-")), key=len, default=None)


def attempt_path(attempt: str, path: str, beside: bool = False) -> str:
    """Where a fenced attempt (folder `attempt`) writes its job's output or log `path`, which the
    head moves to `path` when it accepts the attempt's result.

    A path relative to the working directory keeps that relative path below the attempt's folder,
    so that the file's folder has its own name, what a script writes beside it (an index, a
    suffix) lands beside it, and relative links between outputs still hold once moved. Another
    path keeps its whole absolute path below `.absolute/`. With `beside` (the file's folder is on
    another file system than the attempt's), the file is written in a folder of the attempt's own
    next to where it belongs, so that moving it is a rename on its own file system."""
    normal = os.path.normpath(path)
    if beside:
        where = os.path.abspath(normal)
        return os.path.join(os.path.dirname(where), f".sticky-{os.path.basename(attempt)}", os.path.basename(where))
    if os.path.isabs(normal) or normal.split(os.sep)[0] == os.pardir:
        return os.path.join(attempt, ".absolute", os.path.abspath(normal).lstrip(os.sep))
    return os.path.join(attempt, normal)


# -- event records ------------------------------------------------------------------------------

EVENTS: dict[str, type["Event"]] = {}


@dataclass(frozen=True)
class Event:
    """A record of the engine's events; `kind` names it in the message."""

    kind: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            EVENTS[cls.kind] = cls

    def to_message(self) -> dict[str, Any]:
        """The plain dict a Dask event carries."""
        message = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"event": self.kind, **message}

    @staticmethod
    def from_message(message: dict[str, Any]) -> "Event":
        """The record a Dask event's dict carries; ValueError for one of no known kind."""
        kind = EVENTS.get(message.get("event", ""))
        if kind is None:
            raise ValueError(f"no sticky event of kind {message.get('event')!r}")
        values = {f.name: message[f.name] for f in dataclasses.fields(kind) if f.name in message}
        for name in ("gpus", "running", "keys"):
            if isinstance(values.get(name), list):
                values[name] = tuple(values[name])
        return kind(**values)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class WorkerEvent(Event):
    """An announcement of a resident worker: who it is, and when."""

    template: str
    name: str
    address: str
    host: str
    pid: int
    gpus: tuple[str, ...]
    time: float


@dataclass(frozen=True)
class SetupStarted(WorkerEvent):
    kind = "setup-start"


@dataclass(frozen=True)
class Ready(WorkerEvent):
    kind = "ready"
    setup_s: float = 0.0
    setup_started: float = 0.0


@dataclass(frozen=True)
class SetupFailed(WorkerEvent):
    kind = "setup-failed"
    error: str = ""
    setup_started: float = 0.0


@dataclass(frozen=True)
class Poisoned(WorkerEvent):
    kind = "poisoned"
    cause: str = ""


@dataclass(frozen=True)
class InvocationTimedOut(WorkerEvent):
    kind = "invocation-timeout"
    key: str = ""
    rule: str = ""
    timeout_s: float = 0.0


@dataclass(frozen=True)
class Preempted(WorkerEvent):
    kind = "preempted"
    grace_s: float = 0.0


@dataclass(frozen=True)
class WalltimeNear(WorkerEvent):
    kind = "walltime"
    grace_s: float = 0.0


@dataclass(frozen=True)
class Staged(WorkerEvent):
    kind = "staged"
    source: str = ""
    origin: str = ""  # "cache", "shared" or "peer <address>"
    bytes: int = 0
    seconds: float = 0.0  # the whole stage() call
    copy_seconds: float = 0.0  # the copy itself, from the shared source or a peer (0 from the cache)
    stage_started: float = 0.0


@dataclass(frozen=True)
class WorkerWarning(WorkerEvent):
    kind = "warning"
    text: str = ""


@dataclass(frozen=True)
class Removed(Event):
    """The scheduler removed a worker: on purpose (`graceful`) or lost; the invocations it ran."""

    kind = "removed"
    address: str
    graceful: bool
    running: tuple[str, ...]
    time: float
    name: str = ""  # the worker's name (a batch job's), as it joined


@dataclass(frozen=True)
class HandedBack(Event):
    """A worker gives back the rest of a shared Dask task (worker/shared_task.py) while one of
    its invocations runs long: the results of those that ran (`results`: a pickled list of
    InvocationResult) and the keys of those it has not started. The task returns the long one's
    result alone."""

    kind = "handed-back"
    address: str
    task: str  # the Dask key of the task
    keys: tuple[str, ...]
    results: bytes


@dataclass(frozen=True)
class JobStarted(Event):
    """A worker's batch job started: its worker joined `queued_s` after the job was submitted to
    `partition` (the history keeps the waits, and the forecast tells them)."""

    kind = "job-started"
    template: str
    name: str
    queued_s: float
    partition: str
    time: float


@dataclass(frozen=True)
class WorkerExited(Event):
    """A local worker process ended, with its exit code (a signal as its negative)."""

    kind = "worker-exit"
    address: str
    exitcode: int


def write_atomically(path: Path, text: str) -> None:
    """Write a small file aside, on disk, then rename it into place: readers never see half of
    it, even after a crash of the node (stage()'s manifests, the run history, the identity cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(3)}")
    with open(partial, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


# What each run measured, for the forecasts and identities of the runs after it: one JSON line
# per run, below the working directory (head/history.py writes it).
HISTORY = Path(".snakemake") / "sticky" / "history.jsonl"


def read_history(workdir: Path) -> list[dict[str, Any]]:
    """The runs recorded in the working directory, oldest first (a damaged line is left out)."""
    try:
        lines = (workdir / HISTORY).read_text().splitlines()
    except FileNotFoundError:
        return []
    runs = []
    for line in lines:
        try:
            runs.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return runs

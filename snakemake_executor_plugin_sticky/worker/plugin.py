"""The Dask worker plugin that makes a worker the resident worker of a template: it changes the
process as a resident worker needs (and puts it back for a worker that is not ours), builds the
state in a thread of its own so the worker's event loop keeps answering heartbeats during a
minutes-long model load, leaves in good order on preemption or near its walltime, and tears
down, ending every process the template started.

Invocations run in the worker's task threads, in this same process (no fork, so a CUDA context
built by setup is usable): see task.py.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import importlib.metadata
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable, Optional

from distributed import WorkerPlugin
from distributed.core import Status

from ..api import resident, stage
from ..api.resident import StageSettings
from ..templates import TemplateSpec
from ..wire import EVENT_TOPIC, LIFETIME_ENV, PACKAGE, Preempted, WalltimeNear, WorkerWarning
from . import processes
from .endpoint import Endpoint
from .isolation import Isolation
from .isolation.process import restore_environment
from .resident import ResidentState, ResidentWorker
from .served import Served

# A worker of ours that has not exited this long after its teardown leaves through os._exit: a
# thread of the template that never ends would hold Python's exit, and Dask's close would wait
# for invocations that were given up.
EXIT_AFTER_TEARDOWN_S = 2.0
# How long a thread waits for the worker's main thread to install a signal handler for it.
SIGNAL_RELAY_TIMEOUT_S = 30.0
UNGUARDED = (
    "no reaper guards this worker: should it die abruptly (SIGKILL, a crash), the processes its template "
    "started would outlive it. Start it under the supervisor: python -m "
    "snakemake_executor_plugin_sticky.worker.supervisor dask worker ... (docs/further.md, Attach mode)."
)


class ProcessChanges:
    """What a resident worker changes in its process, and how to put it back for a worker that
    is not ours (attach mode) once the template leaves it."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def apply(self, workdir: str, owned: bool, loop: Any, on_sigterm: Callable[[], None], slots: int) -> Isolation:
        """Make this process a resident worker of the template (see the class); its isolation of
        scripts."""
        self._undo.append(relay_signal_handlers(loop))
        if threading.current_thread() is threading.main_thread():
            previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
            # Ctrl-C reaches the whole process group; the Snakemake process shuts workers down.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            # Batch systems send SIGTERM before they kill a preempted job.
            signal.signal(signal.SIGTERM, lambda *_: on_sigterm())
            self._undo.append(lambda: [signal.signal(s, h) for s, h in previous.items()])
        cwd = os.getcwd()
        os.chdir(workdir)
        self._undo.append(lambda: os.chdir(cwd))
        isolation = Isolation(workdir, slots)
        self._undo.append(isolation.install())
        # Dask starts worker processes as daemons, and a daemon may not start processes: the
        # template's may (the tree ends with the worker, see processes.py).
        process = multiprocessing.current_process()
        if process.daemon:
            process.daemon = False
            self._undo.append(lambda: setattr(process, "daemon", True))
        # A process started by multiprocessing (a Nanny's worker) has its parent's start method
        # as its default; the template gets the platform's, as in a script run by Snakemake.
        method = multiprocessing.get_start_method(allow_none=True)
        multiprocessing.set_start_method(multiprocessing.get_all_start_methods()[0], force=True)
        self._undo.append(lambda: multiprocessing.set_start_method(method, force=True))
        if not processes.is_subreaper() and processes.set_subreaper():
            self._undo.append(lambda: processes.set_subreaper(False))
        if owned:
            # Runs first at interpreter exit (after Dask's own shutdown of this process is done):
            # the state is torn down by then, and finalizing torch's modules would take a second.
            atexit.register(os._exit, 0)
        return isolation

    def on_undo(self, undo: Callable[[], Any]) -> None:
        """Undo this, too, when the template leaves the worker."""
        self._undo.append(undo)

    def undo(self) -> None:
        """Put back what was changed, last change first."""
        while self._undo:
            self._undo.pop()()


class StickyWorkerPlugin(WorkerPlugin):
    """Makes a Dask worker a resident worker of one template: the workers that offer the
    template's resource tag. Registered with a scheduler, it reaches every worker that joins
    (batch jobs, hand-started workers) and stays inactive on those that offer other tags.

    `owned` workers (embedded and batch-job ones) end with the template; a worker of attach mode
    is the user's, and gets back what the template changed in it."""

    def __init__(
        self,
        spec: TemplateSpec,
        workdir: str,
        setup_attempts: int,
        setup_retry_delay: float,
        preempt_grace: float,
        teardown_grace: float,
        owned: bool,
        stage_settings: Optional[dict[str, Any]] = None,
        endpoint_key: str = "",
    ):
        self.spec = spec
        self.name = f"sticky-template-{spec.name}"
        self.workdir = workdir
        self.setup_attempts = setup_attempts
        self.setup_retry_delay = setup_retry_delay
        self.preempt_grace = preempt_grace
        self.teardown_grace = teardown_grace
        self.owned = owned
        self.stage_settings = stage_settings or {}
        self.endpoint_key = endpoint_key  # the run's key to its workers' OpenAI-compatible endpoints
        self.endpoint: Optional[Endpoint] = None
        self.version = package_version()
        self._leaving = False

    def setup(self, worker: Any) -> None:
        """The worker offers the template's tag: become its resident worker and build the state."""
        if self.spec.tag not in worker.state.total_resources:
            return
        if package_version() != self.version:
            # A worker that joins later with another version of this package takes none of
            # the template's invocations: its own code might not run what this run sends.
            self.refuse(
                worker,
                f"it has {PACKAGE} {package_version()} and this run {self.version}: it takes none of "
                f"template '{self.spec.name}''s invocations. Install {PACKAGE}=={self.version} there.",
            )
            return
        held = resident.current()
        if held is not None and held.template != self.spec.name:
            # Batchers, stage() copies and the process tree are the process's: one template each.
            self.refuse(
                worker,
                f"it offers the tags of templates '{held.template}' and '{self.spec.name}'; a worker "
                f"holds one template, so it takes none of '{self.spec.name}''s invocations. "
                "Start one worker per template.",
            )
            return
        if self.owned and getattr(worker, "http_server", None) is not None:
            # Dask serves HTTP (health, metrics) with no authentication; a worker of ours needs none.
            worker.http_server.stop()
        self.changes = ProcessChanges()
        isolation = self.changes.apply(
            self.workdir,
            self.owned,
            worker.loop,
            lambda: worker.loop.add_callback(self.leave, worker, "preempted"),
            self.spec.slots,
        )
        try:
            self.become_resident(worker, isolation)
        except BaseException:  # the worker stays as it was, and Dask reports the failure
            self.changes.undo()
            raise

    def refuse(self, worker: Any, text: str) -> None:
        """This worker takes none of the template's invocations, and the run is told why."""
        worker.loop.add_callback(worker.set_resources, **{self.spec.tag: 0})
        identity = dict(name=str(worker.name), address=worker.address, host=socket.gethostname(), pid=os.getpid())
        warning = WorkerWarning(template=self.spec.name, gpus=(), time=time.time(), text=text, **identity)
        worker.log_event(EVENT_TOPIC, warning.to_message())

    def become_resident(self, worker: Any, isolation: Isolation) -> None:
        """Announce the worker, serve its stage() copies, and start building the state."""
        from dask.utils import parse_bytes

        size = self.stage_settings.get("cache_size")
        settings = StageSettings(
            cache_dir=self.stage_settings.get("cache_dir"),
            cache_size=parse_bytes(size) if size else None,
            readers=int(self.stage_settings.get("readers", 1)),
        )
        holder = ResidentState(self.spec, self.setup_attempts, self.setup_retry_delay, lambda k, **f: None)
        this = ResidentWorker(self.spec, holder, worker, settings)
        holder.announce = this.announce
        holder.on_served = lambda served: self.open_endpoint(holder, served)
        this.isolation = isolation
        self.resident = this
        resident.attach(this)
        self.changes.on_undo(lambda: resident.attach(None))
        self.serve_stage_copies(worker)
        self.quiet_heartbeat_at_close(worker)
        if not processes.guarded_by_reaper():
            this.announce(WorkerWarning, text=UNGUARDED)
        lifetime = os.environ.get(LIFETIME_ENV)
        if lifetime:  # a batch job: leave in good order before the walltime ends
            worker.loop.call_later(float(lifetime), lambda: worker.loop.add_callback(self.leave, worker, "walltime"))
        holder.start()

    def open_endpoint(self, holder: ResidentState, served: Served) -> None:
        """The template serves (its setup file's `serve`): start this worker's endpoint once, or
        take the address of the engine's own server, and give the invocations its address and
        key (OPENAI_BASE_URL, OPENAI_API_KEY), which the official clients and the docs' curl read."""
        if served.base_url is not None:
            address = {"OPENAI_BASE_URL": served.base_url, "OPENAI_API_KEY": served.api_key or self.endpoint_key}
        else:
            if self.endpoint is None:

                def poisoned(error: BaseException) -> None:
                    if holder.poisons(error):
                        holder.rebuild(f"{type(error).__name__} in the endpoint", holder.generation)

                endpoint = Endpoint(self.endpoint_key, holder.current_served, poisoned)
                endpoint.start()
                self.endpoint = endpoint
                self.changes.on_undo(self.close_endpoint)
            address = {"OPENAI_BASE_URL": self.endpoint.base_url, "OPENAI_API_KEY": self.endpoint_key}
        before = {name: os.environ.get(name) for name in address}
        os.environ.update(address)
        self.changes.on_undo(lambda: restore_environment(before))

    def close_endpoint(self) -> None:
        """Stop serving (the state is torn down, or the template leaves an attached worker)."""
        endpoint, self.endpoint = self.endpoint, None
        if endpoint is not None:
            endpoint.stop()

    def quiet_heartbeat_at_close(self, worker: Any) -> None:
        """A worker that closes (it retires, or the run ends) while a heartbeat is on its way has
        that heartbeat cut by its own close, and Dask logs it as an error with a traceback. It is
        none: while the worker closes, that one line stays out of the log; a heartbeat that
        fails while the worker runs is still said."""
        from distributed.core import Status

        def keep(record: logging.LogRecord) -> bool:
            closing = worker.status in (Status.closing, Status.closing_gracefully, Status.closed)
            return not (
                closing and record.getMessage().startswith("Failed to communicate with scheduler during heartbeat")
            )

        logger = logging.getLogger("distributed.worker")
        logger.addFilter(keep)
        self.changes.on_undo(lambda: logger.removeFilter(keep))

    def serve_stage_copies(self, worker: Any) -> None:
        """Serve this worker's stage() copies to peers."""
        previous = worker.handlers.get("sticky_stage_read")
        worker.handlers["sticky_stage_read"] = stage.serve_chunk
        self.changes.on_undo(
            lambda: (
                worker.handlers.__setitem__("sticky_stage_read", previous)
                if previous is not None
                else worker.handlers.pop("sticky_stage_read", None)
            )
        )
        self.changes.on_undo(stage.forget_pool)

    async def leave(self, worker: Any, reason: str) -> None:
        """SIGTERM ("preempted") or the job's walltime near ("walltime"): take no new
        invocations, let running ones finish within the grace period, then leave (the scheduler
        hands what is left to other workers) and tear down."""
        if self._leaving or worker.status not in (Status.running, Status.paused):
            return
        self._leaving = True
        self.resident.announce(Preempted if reason == "preempted" else WalltimeNear, grace_s=self.preempt_grace)
        worker.status = Status.paused  # the scheduler sends no more work; queued work stays put
        deadline = time.monotonic() + self.preempt_grace
        # Finished results stay until the client has fetched and released them: a result that
        # leaves with its worker is lost, and the scheduler would run the invocation again.
        while worker.state.executing_count or worker.data:
            if time.monotonic() >= deadline:
                self.resident.announce(
                    WorkerWarning,
                    text=f"{worker.state.executing_count} invocation(s) still ran and {len(worker.data)} result(s) "
                    f"were not fetched after the grace of {self.preempt_grace:g} s; the worker leaves anyway and "
                    "the scheduler runs them elsewhere.",
                )
                break
            await asyncio.sleep(0.1)
        await worker.close(nanny=False, reason="sticky-worker-preempted")

    async def teardown(self, worker: Any) -> None:
        """The worker retires (or the run ends, in attach mode): the state is torn down and every
        process the template started is ended, within --sticky-teardown-grace."""
        this = getattr(self, "resident", None)
        if this is None or this.holder.closed:
            return
        await asyncio.to_thread(self.end, this)
        if self.owned:
            threading.Thread(target=exit_soon, name="sticky-exit", daemon=True).start()
        else:
            self.changes.undo()

    def end(self, this: ResidentWorker) -> None:
        """Tear the state down and end the template's processes, within --sticky-teardown-grace."""
        grace = self.teardown_grace
        deadline = time.monotonic() + grace
        if not this.holder.close(deadline):
            this.announce(
                WorkerWarning,
                text=f"teardown() of template '{self.spec.name}' did not return within --sticky-teardown-grace "
                f"{grace:g} s; the worker ends its processes anyway.",
            )
        self.close_endpoint()
        # The template's processes get what is left of the grace (at least a moment) after SIGTERM.
        stuck = processes.end_tree(
            os.getpid(), max(deadline - time.monotonic(), 1.0), spare=processes.multiprocessing_helpers
        )
        if stuck:
            this.announce(
                WorkerWarning,
                text=f"process(es) of template '{self.spec.name}' did not end after SIGKILL: "
                + ", ".join(map(str, stuck)),
            )
        sys.stdout.flush()
        sys.stderr.flush()


def relay_signal_handlers(loop: Any) -> Callable[[], None]:
    """Python installs signal handlers from the main thread only, but a template's setup and its
    invocations run in other threads, and engines install handlers as they start (SGLang's
    Engine does). In a resident worker, `signal.signal` called from another thread is carried out
    by the main thread, which runs the worker's event loop. Returns the undo."""
    original = signal.signal

    def relayed(signum: int, handler: Any) -> Any:
        if threading.current_thread() is threading.main_thread():
            return original(signum, handler)
        done: concurrent.futures.Future = concurrent.futures.Future()

        def install() -> None:
            try:
                done.set_result(original(signum, handler))
            except BaseException as e:
                done.set_exception(e)

        loop.add_callback(install)
        return done.result(timeout=SIGNAL_RELAY_TIMEOUT_S)

    signal.signal = relayed  # type: ignore[assignment]
    return lambda: setattr(signal, "signal", original)


def package_version() -> Optional[str]:
    """This package's installed version, or None."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def exit_soon() -> None:
    """A worker of ours leaves shortly after its teardown, even if a thread that the template
    started never ends (an engine's loop): Python's exit would wait for it forever."""
    time.sleep(EXIT_AFTER_TEARDOWN_S)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

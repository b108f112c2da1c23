"""What runs inside a resident worker process: build the state once, run invocations, tear down.

The state is built in a background thread started by a Dask WorkerPlugin, so the worker's event
loop keeps answering heartbeats during a minutes-long model load. Invocations run in the worker's
task threads, in this same process (no fork, so a CUDA context built by setup is usable), and
wait for the state if it is still being built.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextvars
import importlib.metadata
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

from distributed import WorkerPlugin, get_worker
from distributed.core import Status

from . import batching, processes, staging
from .invocation import EVENT_TOPIC, RUNNING_TOPIC, Invocation, InvocationResult
from .isolation import Isolation, current
from .state import register_resident, teardown_state
from .templates import TemplateSpec, load_template_module

PACKAGE = "snakemake-executor-plugin-sticky"
_holders: dict[str, "ResidentState"] = {}
_isolation: Optional[Isolation] = None  # this process's, once it is a resident worker
# At retirement, a state build in progress gets this long to finish (then torn down too).
BUILD_WAIT_S = 3.0
# A worker of ours that has not exited this long after its teardown leaves through os._exit: a
# thread of the template that never ends would hold Python's exit, and Dask's close would wait
# for invocations that were given up.
EXIT_AFTER_TEARDOWN_S = 2.0
# How long a thread waits for the worker's main thread to install a signal handler for it.
SIGNAL_RELAY_TIMEOUT_S = 30.0
# seconds after its start at which a batch-job worker leaves (set in its job script)
LIFETIME_ENV = "STICKY_WORKER_LIFETIME_S"


class TemplateSetupError(RuntimeError):
    """The template's state is not available on this worker: its setup failed on every attempt,
    or the worker is retiring."""


class ResidentState:
    """One template's state in this process: built once (with bounded retries), rebuilt only when
    an invocation raised an exception the template declares as poisoning it, torn down once.

    Invocations hold the state while they run (`use`). A rebuild waits until every invocation
    holding the poisoned state has finished, then tears it down and builds it again; invocations
    that come meanwhile wait for the new state. No invocation sees a state that was torn down.
    """

    def __init__(self, spec: TemplateSpec, attempts: int, retry_delay: float, announce: Callable[[dict], None]):
        self.spec = spec
        self.attempts = attempts
        self.retry_delay = retry_delay
        self.announce = announce
        self.state: Any = None
        self.error: Optional[str] = None
        self.setup_s: Optional[float] = None
        self.poisoned_by: tuple[Any, ...] = ()  # exception classes or their (dotted) names
        self.generation = 0  # states built so far
        self._phase = "building"  # building, ready, failed, draining (for a rebuild), closed
        self._users = 0  # invocations holding the state
        self._changed = threading.Condition()
        self._closing = threading.Event()
        # sends what was announced and not sent yet (set by the worker plugin; see become_resident)
        self.deliver_events: Callable[[], None] = lambda: None
        batching.set_poisoning(self.poisons)  # a Batcher of the state passes these on unsplit
        batching.set_running(lambda: self._users)  # and waits only for invocations that run

    def start(self) -> None:
        """Build the state in a thread of its own: the worker's event loop keeps answering meanwhile."""
        threading.Thread(target=self.build, name="sticky-setup", daemon=True).start()

    def build(self) -> None:
        """Build the state, retrying a failing setup with a doubling delay; publish it, or the error."""
        if self._closing.is_set():
            self._set_phase("closed")
            return
        delay = self.retry_delay
        failures = []
        began = time.time()
        self.announce({"event": "setup-start"})
        for attempt in range(1, self.attempts + 1):
            started = time.monotonic()
            try:
                module = load_template_module(self.spec)
                self.poisoned_by = tuple(getattr(module, "poisoned_by", ()) or ())
                state = module.setup(**self.spec.kwargs)
            except Exception:
                failures.append(f"attempt {attempt}:\n{traceback.format_exc()}")
                if attempt < self.attempts and not self._closing.wait(delay):
                    delay *= 2
                    continue
                error = (
                    f"Sticky template '{self.spec.name}' ({self.spec.setup}) could not be set up "
                    f"after {attempt} attempt(s):\n" + "\n".join(failures)
                )
                with self._changed:
                    self.error = error
                    if self._phase != "closed":
                        self._phase = "failed"
                    self._changed.notify_all()
                self.announce({"event": "setup-failed", "error": error, "setup_started": began})
                return
            setup_s = time.monotonic() - started
            with self._changed:
                late = self._phase == "closed"  # the worker retired while this build ran
                if not late:
                    self.state, self.setup_s = state, setup_s
                    self.generation += 1
                    self._phase = "ready"
                    self._changed.notify_all()
            if late:
                self._teardown(state)
            else:
                self.announce({"event": "ready", "setup_s": setup_s, "setup_started": began})
            return

    def _set_phase(self, phase: str) -> None:
        with self._changed:
            self._phase = phase
            self._changed.notify_all()

    @contextmanager
    def use(self) -> Iterator[int]:
        """Hold the state for one invocation (waiting for it to be built); yields its generation."""
        with self._changed:
            self._changed.wait_for(lambda: self._phase in ("ready", "failed", "closed"))
            self._raise_if_unavailable()
            self._users += 1
            generation = self.generation
        try:
            yield generation
        finally:
            with self._changed:
                self._users -= 1
                self._changed.notify_all()
            batching.invocation_ended()

    def get(self) -> Any:
        """The state, for `sticky_state` in an invocation (which holds it)."""
        with self._changed:
            self._changed.wait_for(lambda: self._phase != "building")
            self._raise_if_unavailable()
            return self.state

    def _raise_if_unavailable(self) -> None:
        if self._phase == "failed":
            raise TemplateSetupError(self.error)
        if self._phase == "closed":
            raise TemplateSetupError(f"Sticky template '{self.spec.name}': this worker is retiring.")

    def poisons(self, error: BaseException) -> bool:
        """Whether the template declared this exception as one that leaves the state unusable."""
        names = {f"{c.__module__}.{c.__qualname__}" for c in type(error).__mro__}
        names |= {c.__qualname__ for c in type(error).__mro__}
        return any((p if isinstance(p, str) else f"{p.__module__}.{p.__qualname__}") in names for p in self.poisoned_by)

    def announce_timeout(self, invocation: Invocation) -> None:
        """Tell the run that an invocation has run longer than its limit."""
        self.announce(
            {
                "event": "invocation-timeout",
                "key": invocation.key,
                "rule": invocation.rule,
                "timeout_s": invocation.timeout_s,
            }
        )

    def rebuild(self, cause: str, generation: int) -> None:
        """The state of `generation` is poisoned: once the invocations holding it have finished,
        tear it down and build it again. New invocations wait for the new state."""
        with self._changed:
            if self._phase != "ready" or generation != self.generation:
                return  # another invocation of the same state started the rebuild already
            self._phase = "draining"
        self.announce({"event": "poisoned", "cause": cause})
        threading.Thread(target=self._rebuild, name="sticky-rebuild", daemon=True).start()

    def _rebuild(self) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._users == 0)
            state, self.state, self.setup_s = self.state, None, None
            if self._phase == "draining":
                self._phase = "building"
        self._teardown(state)
        self.build()

    def close(self, deadline: float) -> bool:
        """Retirement: a build in progress gets a moment to finish (its state is torn down too),
        then the state is torn down and later invocations are refused. Invocations still running
        now were given up (the run was cancelled, they hung, or a preempted worker handed them
        back): they are not waited for. Returns False when teardown() did not return by the deadline."""
        self._closing.set()
        building_until = min(deadline, time.monotonic() + BUILD_WAIT_S)
        with self._changed:
            while self._phase == "building" and time.monotonic() < building_until:
                self._changed.wait(building_until - time.monotonic())
            state = self.state if self._phase in ("ready", "draining") else None
            self.state, self._phase = None, "closed"
            self._changed.notify_all()
        return within(deadline, lambda: self._teardown(state))

    def _teardown(self, state: Any) -> None:
        if state is None:
            return
        try:
            teardown_state(self.spec, state)
        except Exception:
            print(f"Sticky template '{self.spec.name}': teardown() failed:", file=sys.stderr)
            traceback.print_exc()
        finally:  # callers still waiting on a Batcher of the state must not wait forever
            batching.close_all(f"the state of sticky template '{self.spec.name}' was torn down")
            staging.release_all()  # its stage() copies may be evicted now


def within(deadline: float, work: Callable[[], None]) -> bool:
    """Run `work` in a thread of its own; False if it has not returned by the deadline (it is
    left running: a thread cannot be stopped, the worker's exit ends it)."""
    thread = threading.Thread(target=work, name="sticky-teardown", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    return not thread.is_alive()


class ProcessChanges:
    """What a resident worker changes in its process, and how to put it back for a worker that
    is not ours (attach mode) once the template leaves it."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def apply(self, workdir: str, owned: bool, loop: Any, on_sigterm: Callable[[], None], slots: int) -> None:
        """Make this process a resident worker of the template (see the class)."""
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
        global _isolation
        _isolation = Isolation(workdir, slots)
        self._undo.append(_isolation.install())
        self._undo.append(lambda: globals().__setitem__("_isolation", None))
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
        resident = next((h.spec.name for i, h in _holders.items() if i != self.spec.identity), None)
        if resident is not None:
            # Batchers, stage() copies and the process tree are the process's: one template each.
            self.refuse(
                worker,
                f"it offers the tags of templates '{resident}' and '{self.spec.name}'; a worker "
                f"holds one template, so it takes none of '{self.spec.name}''s invocations. "
                "Start one worker per template.",
            )
            return
        if self.owned and getattr(worker, "http_server", None) is not None:
            # Dask serves HTTP (health, metrics) with no authentication; a worker of ours needs none.
            worker.http_server.stop()
        self.changes = ProcessChanges()
        self.changes.apply(
            self.workdir,
            self.owned,
            worker.loop,
            lambda: worker.loop.add_callback(self.leave, worker, "preempted"),
            self.spec.slots,
        )
        try:
            self.become_resident(worker)
        except BaseException:  # the worker stays as it was, and Dask reports the failure
            self.changes.undo()
            raise

    def refuse(self, worker: Any, text: str) -> None:
        """This worker takes none of the template's invocations, and the run is told why."""
        worker.loop.add_callback(worker.set_resources, **{self.spec.tag: 0})
        worker.log_event(
            EVENT_TOPIC,
            {
                "event": "warning",
                "template": self.spec.name,
                "name": str(worker.name),
                "address": worker.address,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "gpus": [],
                "time": time.time(),
                "text": text,
            },
        )

    def become_resident(self, worker: Any) -> None:
        """Announce the worker, serve its stage() copies, and start building the state."""
        identity = {
            "template": self.spec.name,
            "name": str(worker.name),
            "address": worker.address,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "gpus": [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g],
        }
        pending: list[dict] = []

        async def flush(wait: bool = True) -> None:
            # Events sent before the worker has registered with the scheduler would be lost.
            for _ in range(600 if wait else 0):
                if worker.status in (Status.running, Status.paused):
                    break
                await asyncio.sleep(0.1)
            while pending:
                worker.log_event(EVENT_TOPIC, pending.pop(0))

        def announce(message: dict) -> None:
            pending.append({**identity, **message, "time": time.time()})
            worker.loop.add_callback(flush)

        def deliver() -> None:
            # From an invocation's thread (the worker got a task: it is registered): what was
            # announced goes to the scheduler before the invocation's result, on the same stream,
            # so a run of short invocations never ends before it hears of the worker's setup.
            if pending:
                asyncio.run_coroutine_threadsafe(flush(wait=False), worker.loop.asyncio_loop).result(10)

        self.announce = announce
        self.serve_stage_copies(worker, announce)
        if not processes.guarded_by_reaper():
            announce(
                {
                    "event": "warning",
                    "text": "no reaper guards this worker: should it die abruptly (SIGKILL, a crash), the "
                    "processes its template started would outlive it. Start it under the keeper: python -m "
                    "snakemake_executor_plugin_sticky.keeper dask worker ... (docs/further.md, Attach mode).",
                }
            )
        lifetime = os.environ.get(LIFETIME_ENV)
        if lifetime:  # a batch job: leave in good order before the walltime ends
            worker.loop.call_later(float(lifetime), lambda: worker.loop.add_callback(self.leave, worker, "walltime"))
        holder = ResidentState(self.spec, self.setup_attempts, self.setup_retry_delay, announce)
        holder.deliver_events = deliver
        _holders[self.spec.identity] = holder
        register_resident(self.spec.name, holder.get)
        holder.start()

    def serve_stage_copies(self, worker: Any, announce: Callable[[dict], None]) -> None:
        """stage() in this worker uses the run's cache settings, and serves its copies to peers."""
        from dask.utils import parse_bytes

        size = self.stage_settings.get("cache_size")
        staging.configure(
            cache_dir=self.stage_settings.get("cache_dir"),
            cache_size=parse_bytes(size) if size else None,
            readers=int(self.stage_settings.get("readers", 1)),
            worker=worker,
            announce=announce,
        )
        previous = worker.handlers.get("sticky_stage_read")
        worker.handlers["sticky_stage_read"] = staging.serve_chunk
        self.changes.on_undo(
            lambda: (
                worker.handlers.__setitem__("sticky_stage_read", previous)
                if previous is not None
                else worker.handlers.pop("sticky_stage_read", None)
            )
        )
        self.changes.on_undo(lambda: staging.configure())

    async def leave(self, worker: Any, reason: str) -> None:
        """SIGTERM ("preempted") or the job's walltime near ("walltime"): take no new
        invocations, let running ones finish within the grace period, then leave (the scheduler
        hands what is left to other workers) and tear down."""
        if self._leaving or worker.status not in (Status.running, Status.paused):
            return
        self._leaving = True
        self.announce({"event": reason, "grace_s": self.preempt_grace})
        worker.status = Status.paused  # the scheduler sends no more work; queued work stays put
        deadline = time.monotonic() + self.preempt_grace
        # Finished results stay until the client has fetched and released them: a result that
        # leaves with its worker is lost, and the scheduler would run the invocation again.
        while (worker.state.executing_count or worker.data) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await worker.close(nanny=False, reason="sticky-worker-preempted")

    async def teardown(self, worker: Any) -> None:
        """The worker retires (or the run ends, in attach mode): the state is torn down and every
        process the template started is ended, within --sticky-teardown-grace."""
        holder = _holders.pop(self.spec.identity, None)
        if holder is None:
            return
        await asyncio.to_thread(self.end, holder)
        if self.owned:
            threading.Thread(target=exit_soon, name="sticky-exit", daemon=True).start()
        else:
            self.changes.undo()

    def end(self, holder: ResidentState) -> None:
        """Tear the state down and end the template's processes, within --sticky-teardown-grace."""
        grace = self.teardown_grace
        deadline = time.monotonic() + grace
        if not holder.close(deadline):
            self.announce(
                {
                    "event": "warning",
                    "text": f"teardown() of template '{self.spec.name}' did not return within "
                    f"--sticky-teardown-grace {grace:g} s; the worker ends its processes anyway.",
                }
            )
        # The template's processes get what is left of the grace (at least a moment) after SIGTERM.
        stuck = processes.end_tree(
            os.getpid(), max(deadline - time.monotonic(), 1.0), spare=processes.multiprocessing_helpers
        )
        if stuck:
            self.announce(
                {
                    "event": "warning",
                    "text": f"process(es) of template '{self.spec.name}' did not end after SIGKILL: "
                    + ", ".join(map(str, stuck)),
                }
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


def run_invocation(invocation: Invocation) -> InvocationResult:
    """The Dask task of one invocation: run the script with the resident state at hand, in a
    view of the process of its own (see isolation/)."""
    started = time.time()
    worker = get_worker()
    result = InvocationResult(
        key=invocation.key,
        worker=str(worker.name),
        address=worker.address,
        pid=os.getpid(),
        started=started,
        finished=started,
    )
    holder = _holders.get(invocation.identity)
    if holder is None or _isolation is None:
        result.error = (
            f"This worker does not hold sticky template '{invocation.template}' ({invocation.identity[:12]})."
        )
        return result
    context = None
    try:
        with _isolation.invocation(invocation) as context:
            run_with_state(invocation, holder, worker, result)
            holder.deliver_events()  # the worker's setup is known before this result (ready by now)
    except BaseException:
        if result.error is None:  # the isolation itself failed, before or after the script
            what = "undo what the script changed in it" if context is not None else "give the script its own view of it"
            result.error = f"The worker could not {what}:\n{traceback.format_exc()}"
    if context is not None:
        result.stdout, result.stderr = context.output()
    result.finished = time.time()
    calls = batching.drain_calls()
    if calls:
        result.extra["model_calls"] = calls
    return result


def run_with_state(invocation: Invocation, holder: ResidentState, worker: Any, result: InvocationResult) -> None:
    """Run the script with the state held; its failure becomes the result's error."""
    watchdog = None
    generation = None
    try:
        with holder.use() as generation, running_on(worker):
            result.started = time.time()  # the invocation proper, after any wait for the state
            result.extra["setup_s"] = holder.setup_s
            if invocation.timeout_s is not None:
                watchdog = threading.Timer(invocation.timeout_s, holder.announce_timeout, (invocation,))
                watchdog.daemon = True
                watchdog.start()
            clear_outputs(invocation.snakemake.output)
            run_script(invocation)
    except TemplateSetupError as e:
        result.error = str(e)
    except SystemExit as e:
        if e.code not in (None, 0):
            result.error = f"Script {invocation.script} exited with status {e.code}."
    except BaseException as e:
        result.error = format_script_error(e)
        if generation is not None and holder.poisons(e):
            result.extra["poisoned"] = True
            holder.rebuild(f"{type(e).__name__} in rule {invocation.rule}", generation)
    finally:
        if watchdog is not None:
            watchdog.cancel()


@contextmanager
def running_on(worker: Any) -> Iterator[None]:
    """Tell the scheduler that this task runs with its state now, and when it stops: should the
    worker die meanwhile, the invocation was running there (see WorkerRemovalPlugin)."""
    key = worker.get_current_task()
    worker.log_event(RUNNING_TOPIC, {"worker": worker.address, "key": key, "running": True})
    try:
        yield
    finally:
        worker.log_event(RUNNING_TOPIC, {"worker": worker.address, "key": key, "running": False})


def clear_outputs(paths: Any) -> None:
    """Remove what an earlier attempt on a lost worker may have half written."""
    for path in paths:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


_code_cache: dict[str, tuple[tuple[float, int], Any]] = {}


def compiled_script(path: str) -> Any:
    """The script's code object, compiled once per version of the file."""
    stat = os.stat(path)
    version = (stat.st_mtime, stat.st_size)
    cached = _code_cache.get(path)
    if cached is None or cached[0] != version:
        with open(path, "rb") as f:
            cached = (version, compile(f.read(), path, "exec"))
        _code_cache[path] = cached
    return cached[1]


def run_script(invocation: Invocation) -> None:
    """Run the invocation's script as Snakemake's `script:` would, as the `__main__` of the
    calling thread's invocation (its globals are Snakemake's preamble's, see isolation), in a
    context of its own: context variables it sets (numpy's print options, decimal's context) end
    with it, although the worker's task thread runs the next script."""
    context = current()
    assert context is not None, "run_script runs inside an invocation's isolation"
    contextvars.Context().run(exec, compiled_script(invocation.script), context.main.__dict__)


def format_script_error(error: BaseException) -> str:
    """The traceback from the script's frames on, as Python would print it for the script."""
    tb = error.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(error), error, tb))

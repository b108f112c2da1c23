"""What runs inside a resident worker process: build the state once, run invocations, tear down.

The state is built in a background thread started by a Dask WorkerPlugin, so the worker's event
loop keeps answering heartbeats during a minutes-long model load. Invocations run in the worker's
task threads, in this same process (no fork, so a CUDA context built by setup is usable), and
wait for the state if it is still being built.
"""

from __future__ import annotations

import asyncio
import atexit
import builtins
import io
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

from .invocation import EVENT_TOPIC, Invocation, InvocationResult
from .state import register_resident, teardown_state
from .templates import TemplateSpec, load_template_module

_holders: dict[str, "ResidentState"] = {}
TEARDOWN_WAIT_S = 3.0
# seconds after its start at which a batch-job worker leaves (set in its job script)
LIFETIME_ENV = "STICKY_WORKER_LIFETIME_S"


class TemplateSetupError(RuntimeError):
    """The template's setup failed on every attempt; its invocations cannot run on this worker."""


class ResidentState:
    """One template's state in this process: built once (with bounded retries), rebuilt only when
    an invocation raised an exception the template declares as poisoning it, torn down once."""

    def __init__(self, spec: TemplateSpec, attempts: int, retry_delay: float, announce: Callable[[dict], None]):
        self.spec = spec
        self.attempts = attempts
        self.retry_delay = retry_delay
        self.announce = announce
        self.state: Any = None
        self.error: Optional[str] = None
        self.setup_s: Optional[float] = None
        self.poisoned_by: tuple[Any, ...] = ()  # exception classes or their (dotted) names
        self._ready = threading.Event()
        self._closing = threading.Event()
        self._lock = threading.Lock()

    def start(self) -> None:
        threading.Thread(target=self.build, name="sticky-setup", daemon=True).start()

    def build(self) -> None:
        delay = self.retry_delay
        failures = []
        began = time.time()
        self.announce({"event": "setup-start"})
        for attempt in range(1, self.attempts + 1):
            started = time.monotonic()
            try:
                module = load_template_module(self.spec)
                self.poisoned_by = tuple(getattr(module, "poisoned_by", ()) or ())
                self.state = module.setup(**self.spec.kwargs)
            except Exception:
                failures.append(f"attempt {attempt}:\n{traceback.format_exc()}")
                if attempt < self.attempts and not self._closing.wait(delay):
                    delay *= 2
                    continue
                self.error = (
                    f"Sticky template '{self.spec.name}' ({self.spec.setup}) could not be set up "
                    f"after {attempt} attempt(s):\n" + "\n".join(failures)
                )
                self.announce({"event": "setup-failed", "error": self.error, "setup_started": began})
                break
            else:
                self.setup_s = time.monotonic() - started
                self.announce({"event": "ready", "setup_s": self.setup_s, "setup_started": began})
                break
        self._ready.set()

    def get(self) -> Any:
        self._ready.wait()
        if self.error is not None:
            raise TemplateSetupError(self.error)
        return self.state

    def poisons(self, error: BaseException) -> bool:
        """Whether the template declared this exception as one that leaves the state unusable."""
        names = {f"{c.__module__}.{c.__qualname__}" for c in type(error).__mro__}
        names |= {c.__qualname__ for c in type(error).__mro__}
        return any((p if isinstance(p, str) else f"{p.__module__}.{p.__qualname__}") in names for p in self.poisoned_by)

    def announce_timeout(self, invocation: Invocation) -> None:
        self.announce(
            {"event": "invocation-timeout", "key": invocation.key, "rule": invocation.rule, "timeout_s": invocation.timeout_s}
        )

    def rebuild(self, cause: str) -> None:
        """Tear the poisoned state down and build it again; invocations wait meanwhile."""
        with self._lock:
            if not self._ready.is_set():
                return  # another invocation already started the rebuild
            self._ready.clear()
        self.announce({"event": "poisoned", "cause": cause})
        try:
            teardown_state(self.spec, self.state)
        finally:
            self.state, self.setup_s = None, None
            self.start()

    def teardown(self) -> None:
        self._closing.set()
        # A (re)build in progress gets a moment to finish, so its state is torn down too.
        self._ready.wait(TEARDOWN_WAIT_S)
        if self._ready.is_set() and self.error is None and self.state is not None:
            teardown_state(self.spec, self.state)
            self.state = None


class StickyWorkerPlugin(WorkerPlugin):
    """Makes a Dask worker a resident worker of one template: the workers that offer the
    template's resource tag. Registered with a scheduler, it reaches every worker that joins
    (batch jobs, hand-started workers) and stays inactive on those that offer other tags."""

    def __init__(self, spec: TemplateSpec, workdir: str, setup_attempts: int, setup_retry_delay: float, preempt_grace: float):
        self.spec = spec
        self.name = f"sticky-template-{spec.name}"
        self.workdir = workdir
        self.setup_attempts = setup_attempts
        self.setup_retry_delay = setup_retry_delay
        self.preempt_grace = preempt_grace

    def setup(self, worker: Any) -> None:
        if self.spec.tag not in worker.state.total_resources:
            return
        if threading.current_thread() is threading.main_thread():
            # Ctrl-C reaches the whole process group; the Snakemake process shuts workers down.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            # Batch systems send SIGTERM before they kill a preempted job.
            signal.signal(signal.SIGTERM, lambda *_: worker.loop.add_callback(self.leave, worker, "preempted"))
        os.chdir(self.workdir)
        install_output_capture()
        # Runs first at interpreter exit (after Dask's own shutdown of this process is done): the
        # state is torn down by then, and finalizing torch's modules would take about a second.
        atexit.register(os._exit, 0)
        identity = {
            "template": self.spec.name,
            "name": str(worker.name),
            "address": worker.address,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "gpus": [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g],
        }
        pending: list[dict] = []

        async def flush() -> None:
            # Events sent before the worker has registered with the scheduler would be lost.
            for _ in range(600):
                if worker.status in (Status.running, Status.paused):
                    break
                await asyncio.sleep(0.1)
            while pending:
                worker.log_event(EVENT_TOPIC, pending.pop(0))

        def announce(message: dict) -> None:
            pending.append({**identity, **message, "time": time.time()})
            worker.loop.add_callback(flush)

        self.announce = announce
        lifetime = os.environ.get(LIFETIME_ENV)
        if lifetime:  # a batch job: leave in good order before the walltime ends
            worker.loop.call_later(float(lifetime), lambda: worker.loop.add_callback(self.leave, worker, "walltime"))
        holder = ResidentState(self.spec, self.setup_attempts, self.setup_retry_delay, announce)
        _holders[self.spec.identity] = holder
        register_resident(self.spec.name, holder.get)
        holder.start()

    async def leave(self, worker: Any, reason: str) -> None:
        """SIGTERM ("preempted") or the job's walltime near ("walltime"): take no new
        invocations, let running ones finish within the grace period, then leave (the scheduler
        hands what is left to other workers) and tear down."""
        if worker.status not in (Status.running, Status.paused):
            return
        self.announce({"event": reason, "grace_s": self.preempt_grace})
        worker.status = Status.paused  # the scheduler sends no more work; queued work stays put
        deadline = time.monotonic() + self.preempt_grace
        # Finished results stay until the client has fetched and released them: a result that
        # leaves with its worker is lost, and the scheduler would run the invocation again.
        while (worker.state.executing_count or worker.data) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await worker.close(nanny=False, reason="sticky-worker-preempted")

    def teardown(self, worker: Any) -> None:
        holder = _holders.pop(self.spec.identity, None)
        if holder is not None:
            holder.teardown()
        sys.stdout.flush()
        sys.stderr.flush()


def run_invocation(invocation: Invocation) -> InvocationResult:
    """The Dask task of one invocation: run the script with the resident state at hand."""
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
    watchdog = None
    with captured_output() as (out, err):
        try:
            if holder is None:
                raise TemplateSetupError(
                    f"This worker does not hold sticky template '{invocation.template}' "
                    f"({invocation.identity[:12]})."
                )
            holder.get()
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
            if holder is not None and holder.poisons(e):
                result.extra["poisoned"] = True
                holder.rebuild(f"{type(e).__name__} in rule {invocation.rule}")
        finally:
            if watchdog is not None:
                watchdog.cancel()
    result.stdout, result.stderr = out.getvalue(), err.getvalue()
    result.finished = time.time()
    return result


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
    scriptdir = os.path.dirname(invocation.script)
    if scriptdir not in sys.path:
        sys.path.append(scriptdir)
    namespace = {
        "__name__": "__main__",
        "__file__": invocation.script,
        "__builtins__": builtins,
        "snakemake": invocation.snakemake,
    }
    exec(compiled_script(invocation.script), namespace)


def format_script_error(error: BaseException) -> str:
    """The traceback from the script's frames on, as Python would print it for the script."""
    tb = error.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(error), error, tb))


class _ThreadRoutedStream(io.TextIOBase):
    """sys.stdout/stderr replacement: text written by a thread that runs an invocation goes to
    that invocation's buffer (sent back with its result), everything else to the real stream."""

    def __init__(self, real: Any):
        self.real = real
        self.local = threading.local()

    def write(self, text: str) -> int:
        buffer = getattr(self.local, "buffer", None)
        return (buffer if buffer is not None else self.real).write(text)

    def flush(self) -> None:
        if getattr(self.local, "buffer", None) is None:
            self.real.flush()

    def fileno(self) -> int:
        return self.real.fileno()

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.real, "encoding", "utf-8")


def install_output_capture() -> None:
    if not isinstance(sys.stdout, _ThreadRoutedStream):
        sys.stdout = _ThreadRoutedStream(sys.stdout)
    if not isinstance(sys.stderr, _ThreadRoutedStream):
        sys.stderr = _ThreadRoutedStream(sys.stderr)


@contextmanager
def captured_output() -> Iterator[tuple[io.StringIO, io.StringIO]]:
    out, err = io.StringIO(), io.StringIO()
    routes = [(s, b) for s, b in ((sys.stdout, out), (sys.stderr, err)) if isinstance(s, _ThreadRoutedStream)]
    for stream, buffer in routes:
        stream.local.buffer = buffer
    try:
        yield out, err
    finally:
        for stream, _ in routes:
            stream.local.buffer = None

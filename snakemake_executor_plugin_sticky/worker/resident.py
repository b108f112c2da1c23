"""A template's state in a resident worker, and the worker as the api sees it.

`ResidentState` is the state's lifecycle, driven by calls alone (no Dask, no process): build once
in a thread of its own, hold it for invocations, rebuild it when an invocation raises what
poisons it, close it. `ResidentWorker` is the process as a resident worker of one template: the
object api/resident.py hands to `sticky_state`, the Batcher and `stage()`, and the queue of what
the worker announces to the run.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

from ..api import batcher, stage
from ..api.resident import StageSettings
from ..api.state import teardown_state
from ..templates import TemplateSpec, load_template_module
from ..wire import (
    EVENT_TOPIC,
    Invocation,
    InvocationTimedOut,
    Poisoned,
    Ready,
    SetupFailed,
    SetupStarted,
    WorkerEvent,
)
from .served import Served, read_served

# At retirement, a state build in progress gets this long to finish (then torn down too).
BUILD_WAIT_S = 3.0
# A worker announces its events once it has registered with the scheduler, checking this often.
REGISTERED_POLL_S = 0.1
REGISTERED_WAIT_S = 60.0


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

    def __init__(self, spec: TemplateSpec, attempts: int, retry_delay: float, announce: Callable[..., None]):
        self.spec = spec
        self.attempts = attempts
        self.retry_delay = retry_delay
        self.announce = announce
        self.state: Any = None
        self.error: Optional[str] = None
        self.setup_s: Optional[float] = None
        self.poisoned_by: tuple[Any, ...] = ()  # exception classes or their (dotted) names
        self.generation = 0  # states built so far
        self.served: Optional[Served] = None  # what the state serves through the endpoint (serve())
        self.on_served: Optional[Callable[[Served], None]] = None  # called before such a state is published
        self._phase = "building"  # building, ready, failed, draining (for a rebuild), closed
        self._users = 0  # invocations holding the state
        self._changed = threading.Condition()
        self._closing = threading.Event()

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
        self.announce(SetupStarted)
        for attempt in range(1, self.attempts + 1):
            started = time.monotonic()
            try:
                module = load_template_module(self.spec)
                self.poisoned_by = tuple(getattr(module, "poisoned_by", ()) or ())
                state = module.setup(**self.spec.kwargs)
                served = self._serve(module, state)
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
                self.announce(SetupFailed, error=error, setup_started=began)
                return
            setup_s = time.monotonic() - started
            with self._changed:
                late = self._phase == "closed"  # the worker retired while this build ran
                if not late:
                    self.state, self.setup_s, self.served = state, setup_s, served
                    self.generation += 1
                    self._phase = "ready"
                    self._changed.notify_all()
            if late:
                self._teardown(state)
            else:
                self.announce(Ready, setup_s=setup_s, setup_started=began)
            return

    def _serve(self, module: Any, state: Any) -> Optional[Served]:
        """What the new state serves (the setup file's `serve(state)`), checked, and handed to
        the endpoint before any invocation sees the state; a failure tears the state down."""
        serve = getattr(module, "serve", None)
        if serve is None:
            return None
        try:
            served = read_served(self.spec.name, serve(state))
            if self.on_served is not None:
                self.on_served(served)
        except BaseException:
            self._teardown(state)
            raise
        return served

    def current_served(self) -> Served:
        """What the state serves, waiting while it is built; TemplateSetupError once it is unavailable."""
        with self._changed:
            self._changed.wait_for(lambda: self._phase not in ("building", "draining"))
            self._raise_if_unavailable()
            if self.served is None:
                raise TemplateSetupError(f"Sticky template '{self.spec.name}' serves nothing (no serve()).")
            return self.served

    def _set_phase(self, phase: str) -> None:
        with self._changed:
            self._phase = phase
            self._changed.notify_all()

    @property
    def closed(self) -> bool:
        """Whether the state was closed (the worker retires)."""
        return self._phase == "closed"

    @property
    def users(self) -> int:
        """Invocations holding the state now."""
        return self._users

    @contextmanager
    def use(self) -> Iterator[int]:
        """Hold the state for one invocation (waiting for it to be built); yields its generation."""
        with self._changed:
            self._changed.wait_for(self._settled)
            self._raise_if_unavailable()
            self._users += 1
            generation = self.generation
        try:
            yield generation
        finally:
            with self._changed:
                self._users -= 1
                self._changed.notify_all()
            batcher.invocation_ended()  # a Batcher waiting for this invocation's items waits no more

    def wait_built(self) -> None:
        """Return once no build is under way (the state is ready, failed or closed): an
        invocation's view of the process begins after `setup` has done what it does to it."""
        with self._changed:
            self._changed.wait_for(self._settled)

    def _settled(self) -> bool:
        """No build is under way: the state is ready, failed or closed."""
        return self._phase in ("ready", "failed", "closed")

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
        self.announce(InvocationTimedOut, key=invocation.key, rule=invocation.rule, timeout_s=invocation.timeout_s)

    def rebuild(self, cause: str, generation: int) -> None:
        """The state of `generation` is poisoned: once the invocations holding it have finished,
        tear it down and build it again. New invocations wait for the new state."""
        with self._changed:
            if self._phase != "ready" or generation != self.generation:
                return  # another invocation of the same state started the rebuild already
            self._phase = "draining"
        self.announce(Poisoned, cause=cause)
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
            if self._phase == "building":
                print(
                    f"Sticky template '{self.spec.name}': setup() still runs as the worker retires; "
                    "its state is torn down when it returns.",
                    file=sys.stderr,
                )
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
            batcher.close_all(f"the state of sticky template '{self.spec.name}' was torn down")
            stage.release_all()  # its stage() copies may be evicted now


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


class ResidentWorker:
    """This process as the resident worker of one template (api/resident.py's Resident): its
    state, its isolation of scripts, its stage() settings, and what it announces to the run.

    Announcements queue until the worker has registered with the scheduler (Dask drops events sent
    before), then go on the worker's stream to the scheduler in order."""

    def __init__(self, spec: TemplateSpec, holder: "ResidentState", dask_worker: Any, settings: StageSettings):
        self.template = spec.name
        self.spec = spec
        self.holder = holder
        self.dask_worker = dask_worker
        self.stage_settings = settings
        self.isolation: Any = None  # this process's isolation of scripts (worker/isolation)
        self._pending: list[dict] = []
        self._identity = {
            "template": spec.name,
            "name": str(getattr(dask_worker, "name", "")),
            "address": getattr(dask_worker, "address", ""),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "gpus": tuple(g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g),
        }

    def state(self) -> Any:
        """The template's state, for `sticky_state` in an invocation (which holds it)."""
        return self.holder.get()

    def poisons(self, error: BaseException) -> bool:
        """Whether the template declared this exception as one that leaves the state unusable."""
        return self.holder.poisons(error)

    def invocations_running(self) -> int:
        """Invocations holding the state now."""
        return self.holder.users

    def announce(self, kind: type[WorkerEvent], **fields: Any) -> None:
        """Queue an event record of this worker; it goes to the run once the worker is registered."""
        event = kind(**self._identity, time=time.time(), **fields)
        self._pending.append(event.to_message())
        self.dask_worker.loop.add_callback(self._flush)

    async def _flush(self, wait: bool = True) -> None:
        from distributed.core import Status

        deadline = time.monotonic() + (REGISTERED_WAIT_S if wait else 0.0)
        while self.dask_worker.status not in (Status.running, Status.paused) and time.monotonic() < deadline:
            await asyncio.sleep(REGISTERED_POLL_S)
        if wait and self.dask_worker.status not in (Status.running, Status.paused):
            print(
                f"Sticky worker {self.dask_worker.name}: not registered with the scheduler after "
                f"{REGISTERED_WAIT_S:g} s (status {self.dask_worker.status.name}); its events are sent anyway.",
                file=sys.stderr,
            )
        while self._pending:
            self.dask_worker.log_event(EVENT_TOPIC, self._pending.pop(0))

    def deliver(self) -> None:
        """From an invocation's thread (the worker got a task: it is registered): what was
        announced goes to the scheduler before the invocation's result, on the same stream, so a
        run of short invocations never ends before it hears of the worker's setup."""
        if self._pending:
            loop = self.dask_worker.loop.asyncio_loop
            asyncio.run_coroutine_threadsafe(self._flush(wait=False), loop).result(10)

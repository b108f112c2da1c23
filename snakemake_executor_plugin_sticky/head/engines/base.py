"""The engine interface the executor talks to, and the Dask client side every engine shares.

An engine keeps pools of resident workers, one pool per template, and runs invocations on a
worker of the right pool. Invocations travel in plain Dask tasks (one, or several short ones of
a template) restricted to the template's worker resource tag, so any worker holding the
template can take them and a lost worker's invocations go to another holder. No Dask Actors:
they die with their worker and block scale-in.
"""

from __future__ import annotations

import pickle
import queue
import secrets
import threading
import time
import traceback
import uuid
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import Any, Callable, Optional, Sequence, Union

import cloudpickle
from distributed import Client, Future

from ...settings import ExecutorSettings
from ...templates import TemplateSpec
from ...wire import EVENT_TOPIC, Event, HandedBack, Invocation, InvocationResult, Lost, Packed
from ...worker.plugin import StickyWorkerPlugin
from ...worker.task import run_invocations
from ..fence import Fence
from ..invocations import InvocationCrashedWorkers
from .scheduler_plugin import WorkerRemovalPlugin, subscribed

Outcome = Union[InvocationResult, BaseException]
OnDone = Callable[[Invocation, Outcome], None]
Member = tuple[Invocation, OnDone]  # an invocation of a task, and who hears of its outcome
OnEvent = Callable[[dict[str, Any]], None]
# The longest a fetched result stays held when no submission comes to carry its release.
RELEASE_DELAY_S = 0.02
EVENTS_DRAIN_S = 5.0  # at the end of a run, events already received are handled within this
SUBSCRIBE_TIMEOUT_S = 30.0  # the scheduler has the run's subscription to worker events within this
HUNG_EXIT_WAIT_S = 120.0  # the longest a hung invocation's failure waits for its worker to end


def worker_plugin(
    template: TemplateSpec, workdir: str, settings: ExecutorSettings, owned: bool, endpoint_key: str
) -> StickyWorkerPlugin:
    """What makes a Dask worker that offers the template's tag one of its resident workers;
    `owned` when the engine started the worker (it then ends with the template). `endpoint_key`
    is the run's key to its workers' OpenAI-compatible endpoints."""
    return StickyWorkerPlugin(
        template,
        workdir,
        settings.setup_attempts,
        settings.setup_retry_delay,
        settings.preempt_grace,
        settings.teardown_grace,
        owned,
        stage_settings={
            "cache_dir": settings.cache_dir,
            "cache_size": settings.cache_size,
            "readers": settings.stage_readers,
        },
        endpoint_key=endpoint_key,
    )


class Backend(ABC):
    """Pools of resident workers per template, and invocations routed to them."""

    @abstractmethod
    def start_pool(self, template: TemplateSpec) -> int:
        """Start the template's workers unless they run already (returns how many it started,
        without waiting for them)."""

    @abstractmethod
    def workers_for(self, template: TemplateSpec) -> int:
        """How many workers the template's pool has at most."""

    @abstractmethod
    def submit(self, tasks: Sequence[Sequence[Member]]) -> None:
        """Run each task's invocations (of one template), one after another, on a worker holding
        their template; each `on_done` gets its invocation's outcome."""

    @abstractmethod
    def worker_lost(self, address: str, running: Sequence[str]) -> None:
        """A worker died while running these invocations (keys): count it against them."""

    @abstractmethod
    def worker_removed(self, address: str) -> None:
        """The run has handled the removal of this worker (and charged its losses)."""

    @abstractmethod
    def worker_exited(self, address: str) -> None:
        """A worker process of the run has ended (its supervisor saw it)."""

    @abstractmethod
    def abandon(self, key: str, reason: str, worker: str) -> None:
        """Fail a hung invocation with `reason` and replace the worker (address) that runs it."""

    @abstractmethod
    def fail_pool(self, template: TemplateSpec, reason: str) -> None:
        """The template can no longer be served: fail its waiting and future invocations."""

    def retire_pool(self, template: TemplateSpec) -> int:
        """No job needs the template any more: end its workers before the run ends (returns how
        many). Batch pools keep theirs (idle batch jobs leave by themselves), and attached
        workers are not ours."""
        return 0

    @abstractmethod
    def close(self) -> None:
        """End every worker (each runs its template's teardown) and the engine itself."""

    @abstractmethod
    def cancel(self) -> None:
        """Drop invocations in flight, then close."""


class DaskBackend(Backend):
    """Submission and completion through a Dask client; subclasses own scheduler and workers.

    A Dask task runs one invocation, or several short ones of a template one after another
    (head/chunking.py decides). Dask keys name tasks; invocations keep their own keys, which the
    workers' running events, the hung-invocation events and the fence use."""

    def __init__(self, on_event: OnEvent, crash_limit: int) -> None:
        self.endpoint_key = secrets.token_urlsafe(32)  # the run's key to its workers' endpoints
        self._tasks: dict[str, tuple[Future, list[Member]]] = {}  # Dask key -> its invocations
        self._pending: dict[str, Member] = {}  # invocation key -> invocation not finished yet
        self._strikes: dict[str, list[str]] = {}  # invocation key -> workers that died running it
        self._removals_heard: set[str] = set()  # workers whose removal the run has handled
        self._parked: dict[str, list[Member]] = {}  # worker -> invocations lost with it, see _lost
        self._hung: dict[str, list[tuple[str, str]]] = {}  # worker -> (key, reason) failing once it ends
        self._failed_pools: dict[str, str] = {}
        self._lock = threading.Lock()
        self._on_event = on_event
        self.crash_limit = crash_limit
        self._events_closed = False
        self._broken: Optional[str] = None
        # Event handlers may call the (synchronous) client: never on the client's own loop thread.
        self._event_thread = ThreadPoolExecutor(1, thread_name_prefix="sticky-events")
        self._finished: queue.SimpleQueue[Optional[Future]] = queue.SimpleQueue()
        self._spent: list[Future] = []  # results fetched and not released yet: see release_spent
        self._spent_since = 0.0  # when the oldest of them was fetched
        threading.Thread(target=self._collect_results, name="sticky-results", daemon=True).start()

    @property
    @abstractmethod
    def client(self) -> Client:
        """The Dask client through which invocations are submitted."""

    def watch_workers(self) -> None:
        """Forward worker announcements and removals to `on_event` (call once the client is up,
        before any worker starts). The subscription travels on the client's batched stream:
        until the scheduler has it, the events of a worker that starts at once (a fork of the
        forkserver, ready in milliseconds) would reach nobody, so it is waited for."""
        self.client.subscribe_topic(EVENT_TOPIC, self._forward_event)
        self.client.register_plugin(WorkerRemovalPlugin())
        deadline = time.monotonic() + SUBSCRIBE_TIMEOUT_S
        while not self.client.run_on_scheduler(subscribed, topic=EVENT_TOPIC, client=self.client.id):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Dask scheduler took no subscription to '{EVENT_TOPIC}' events")
            time.sleep(0.01)

    def _forward_event(self, event: tuple[float, dict[str, Any]]) -> None:
        if not self._events_closed:  # events that come as the run closes have no one to go to
            self._event_thread.submit(self._handle_event, event[1])

    def _handle_event(self, message: dict[str, Any]) -> None:
        try:
            event = Event.from_message(message)
            if isinstance(event, HandedBack):
                self.handed_back(event)
            else:
                self._on_event(event)
        except Exception as e:  # an event lost could be a hung invocation never replaced: stop
            traceback.print_exc()
            self.break_down(f"handling the engine event '{message.get('event')}' failed: {type(e).__name__}: {e}")

    def break_down(self, reason: str) -> None:
        """Something the engine relies on failed: every invocation in flight and to come fails
        with the reason, so that Snakemake ends the run with it rather than wait forever."""
        reason = f"The sticky engine cannot go on: {reason}"
        with self._lock:
            self._broken = self._broken or reason
            futures = [future for future, _ in self._tasks.values()]
        for future in futures:
            future.cancel(msg=reason)
        self._fail_parked(reason)

    def submit(self, tasks: Sequence[Sequence[Member]]) -> None:
        """One graph update per template for the whole batch: the scheduler's cost of an update
        hardly depends on how many tasks it carries."""
        by_tag: dict[str, list[list[Member]]] = {}
        for members in tasks:
            with self._lock:
                failure = self._broken or self._failed_pools.get(members[0][0].identity)
            if failure is not None:
                for invocation, on_done in members:
                    on_done(invocation, RuntimeError(failure))
            else:
                by_tag.setdefault(members[0][0].tag, []).append(list(members))
        for tag, groups in by_tag.items():
            try:
                futures = self.client.map(
                    run_invocations,
                    [Packed([invocation for invocation, _ in members], dumps=cloudpickle.dumps) for members in groups],
                    key=[f"{members[0][0].key}-{uuid.uuid4().hex[:6]}" for members in groups],
                    pure=False,
                    resources={tag: 1},
                )
            except Exception as e:  # the client is gone (the run is ending): nothing was sent
                for members in groups:
                    for invocation, on_done in members:
                        on_done(invocation, e)
                continue
            with self._lock:
                for members, future in zip(groups, futures):
                    self._tasks[future.key] = (future, members)
                    self._pending.update((invocation.key, (invocation, on_done)) for invocation, on_done in members)
            for future in futures:
                self._when_done(future)
        try:
            self.release_spent()
        except Exception:  # a release lost holds a result in a worker a little longer
            traceback.print_exc()

    def _when_done(self, future: Future) -> None:
        future.add_done_callback(self._finished.put)

    def handed_back(self, event: HandedBack) -> None:
        """A worker gave back the rest of a shared task while one of its invocations runs long:
        the results of those that ran are reported, and those it had not started are sent again,
        one per task. Should the task have come back already (lost with its worker), it has been
        dealt with whole, and the event is late."""
        results: list[InvocationResult] = pickle.loads(event.results)
        handed = {result.key for result in results} | set(event.keys)
        with self._lock:
            entry = self._tasks.get(event.task)
            if entry is None:
                return
            rest = [m for m in entry[1] if m[0].key not in handed]  # the long one, until it is back
            if rest:
                self._tasks[event.task] = (entry[0], rest)
            else:
                del self._tasks[event.task]
            members = {m[0].key: m for m in entry[1] if m[0].key in handed}
        for result in results:
            self._finish(members[result.key][0], result)
        again = [[members[key]] for key in event.keys]
        if again:
            self.submit(again)

    def worker_lost(self, address: str, running: Sequence[str]) -> None:
        """A worker died while running these invocations: each was running there once more when
        a worker died. One that has been so `crash_limit` times fails alone when its task comes
        back (see _lost); the others run again. With slots above 1, an invocation that ran beside
        the crashing one at each of those deaths is blamed with it: that is the evidence."""
        with self._lock:
            for key in running:
                if key in self._pending:
                    self._strikes.setdefault(key, []).append(address)

    def worker_removed(self, address: str) -> None:
        """The run has handled the removal of this worker (and charged its losses): the
        invocations that came back lost with it may now run again or fail."""
        with self._lock:
            self._removals_heard.add(address)
            parked = self._parked.pop(address, [])
        self._lost(address, parked)

    def _lost(self, address: str, members: list[Member]) -> None:
        """A task came back lost with its worker: each of its invocations that has crashed its
        workers `crash_limit` times fails alone, the others are sent again, one per task. Its
        worker's removal is handled first, as that counts the crashes; until then they wait."""
        with self._lock:
            if address not in self._removals_heard:
                self._parked.setdefault(address, []).extend(members)
                return
            hung = self._hung_keys()
            members = [m for m in members if m[0].key in self._pending and m[0].key not in hung]
            crashed = {
                invocation.key: strikes
                for invocation, _ in members
                if len(strikes := self._strikes.get(invocation.key, [])) >= self.crash_limit
            }
        again = []
        for invocation, on_done in members:
            if invocation.key in crashed:
                self._finish(invocation, InvocationCrashedWorkers(crashed[invocation.key]))
            else:
                again.append([(invocation, on_done)])
        if again:
            self.submit(again)

    def release_spent(self) -> None:
        """Release the fetched results. Done right after a submission, not as each result comes:
        Dask batches what a client sends (10 ms) and what the scheduler sends a worker (5 ms), so
        a release sent just before the next invocations held those back for up to that long."""
        with self._lock:
            spent, self._spent = self._spent, []
        for future in spent:
            future.release()

    def _collect_results(self) -> None:
        """Fetch the results of finished invocations many at a time: fetching each on its own
        costs a round trip through the scheduler per invocation. Nothing may stop this thread:
        every later result depends on it, and Snakemake waits for each."""
        while True:
            try:
                if self._collect_some():
                    return
            except Exception as e:
                traceback.print_exc()
                self.break_down(f"collecting the invocations' results failed: {type(e).__name__}: {e}")
                time.sleep(0.1)  # no tight loop should the failure repeat

    def _collect_some(self) -> bool:
        """One batch of finished tasks; True once the backend is closed."""
        wait = None  # with results held, only until they are due for release
        if self._spent:
            wait = self._spent_since + RELEASE_DELAY_S - time.monotonic()
            if wait <= 0:
                self.release_spent()
                wait = None
        try:
            first = self._finished.get(timeout=wait)
        except queue.Empty:
            self.release_spent()
            return False
        batch = [first]
        while not self._finished.empty():
            batch.append(self._finished.get())
        if None in batch:  # closed
            return True
        futures = [f for f in batch if f is not None]
        done = [f for f in futures if f.status == "finished"]
        try:
            values = self.client.gather(done) if done else []
        except BaseException:  # a worker went with its results: take them one by one
            values, done = [], []
        fetched = {f.key: v for f, v in zip(done, values, strict=True)}
        for future in futures:
            if future.key not in fetched and future.status not in ("finished", "error", "cancelled"):
                # its result left with a lost worker and is being computed again: it comes back
                # here when it is done, and the others are not held up meanwhile
                self._when_done(future)
                continue
            try:
                self._complete(future, fetched.get(future.key))
            except Exception as e:  # this task's jobs fail with the cause; the others go on
                traceback.print_exc()
                self._fail_task(future, RuntimeError(f"its result could not be collected: {type(e).__name__}: {e}"))
        return False

    def _complete(self, future: Future, fetched: Any) -> None:
        """A task is back: its results, or its failure. Its invocations that the worker handed
        back while it ran (see handed_back) have no result in it.

        The future is released (spent) only once its outcome is in hand: a result that left with
        a lost worker is computed again while `result()` waits, and a release meanwhile would
        have the scheduler forget the key and cancel the future."""
        try:
            outcome = fetched if fetched is not None else future.result()
        except BaseException as e:  # cancelled, hung, lost workers, or the pool failed
            self._spend(future)
            self._fail_task(future, e)
            return
        self._spend(future)
        results = {} if isinstance(outcome, Lost) else {result.key: result for result in outcome}
        with self._lock:
            members = self._tasks.pop(future.key, (None, []))[1]
            handed = [m for m in members if m[0].key not in results]
            if handed and not isinstance(outcome, Lost):  # their event is on its way (see handed_back)
                self._tasks[future.key] = (future, handed)
        if isinstance(outcome, Lost):
            self._lost(outcome.address, members)
            return
        for invocation, _ in members:
            if invocation.key in results:
                self._finish(invocation, results[invocation.key])

    def _spend(self, future: Future) -> None:
        """The future's outcome is in hand: it goes with the next release (release_spent)."""
        with self._lock:
            if not self._spent:
                self._spent_since = time.monotonic()
            self._spent.append(future)

    def _fail_task(self, future: Future, error: BaseException) -> None:
        """The task ended without results: each of its invocations not finished yet fails, with
        the reason the run knows (its pool failed, the engine broke down) or else `error`."""
        with self._lock:
            members = self._tasks.pop(future.key, (None, []))[1]
        for invocation, _ in members:
            with self._lock:
                failure = self._failed_pools.get(invocation.identity) or self._broken
            self._finish(invocation, RuntimeError(failure) if failure is not None else error)

    def _fail_parked(self, reason: str, identity: Optional[str] = None) -> None:
        """Fail the invocations waiting for their worker's removal to be handled (see _lost): all
        of them, or those of one template."""
        with self._lock:
            parked = [m for members in self._parked.values() for m in members if identity in (None, m[0].identity)]
        for invocation, _ in parked:
            self._finish(invocation, RuntimeError(reason))

    def _finish(self, invocation: Invocation, outcome: Outcome, hung_worker_ended: bool = False) -> None:
        """The invocation's outcome goes to its `on_done`, once. One abandoned as hung fails only
        once its worker has ended (see abandon), whatever its task becomes meanwhile."""
        with self._lock:
            if not hung_worker_ended and invocation.key in self._hung_keys():
                return
            member = self._pending.pop(invocation.key, None)
            self._strikes.pop(invocation.key, None)
        if member is not None:
            member[1](invocation, outcome)

    def fail_pool(self, template: TemplateSpec, reason: str) -> None:
        """The pool cannot serve: fail its waiting invocations now and later ones at once."""
        with self._lock:
            self._failed_pools[template.identity] = reason
            waiting = [f for f, members in self._tasks.values() if members[0][0].identity == template.identity]
        for future in waiting:
            future.cancel(msg=reason)
        self._fail_parked(reason, template.identity)

    def abandon(self, key: str, reason: str, worker: str) -> None:
        """Fail a hung invocation with `reason` and replace its worker where the engine may (the
        other invocations of its task then come back lost, and run again). Where the hung
        attempt writes in place (no fence), the failure waits until its worker process has
        ended: a retry must not write the same files beside it."""
        with self._lock:
            member = self._pending.get(key)
            alone = [f for f, members in self._tasks.values() if [m[0].key for m in members] == [key]]
            defer = member is not None and self.replaces_hung_workers and self.fence is None
            if defer:
                self._hung.setdefault(worker, []).append((key, reason))
        if member is None:
            return
        if defer:
            timer = threading.Timer(HUNG_EXIT_WAIT_S, self._hung_worker_ended, (worker, HUNG_EXIT_WAIT_S))
            timer.daemon = True
            timer.start()
        else:
            self._finish(member[0], RuntimeError(reason))
        for future in alone:
            future.cancel(msg=reason)
        self.replace_worker(worker)

    def _hung_keys(self) -> set[str]:
        """The invocations abandoned as hung whose workers have not ended yet (the lock held)."""
        return {key for waiting in self._hung.values() for key, _ in waiting}

    def worker_exited(self, address: str) -> None:
        """A worker process of the run has ended: the invocations that hung in it fail now."""
        self._hung_worker_ended(address)

    def _hung_worker_ended(self, address: str, waited_s: Optional[float] = None) -> None:
        """The invocations abandoned on the worker fail now that it has ended (or when it has not
        ended within HUNG_EXIT_WAIT_S, with a word of it)."""
        with self._lock:
            hung = self._hung.pop(address, [])
            members = [(self._pending[key][0], reason) for key, reason in hung if key in self._pending]
        for invocation, reason in members:
            if waited_s is not None:
                reason += f" Its worker had not ended {waited_s:g} s later; a retry may run beside it."
            self._finish(invocation, RuntimeError(reason), hung_worker_ended=True)

    def replace_worker(self, worker: str) -> None:
        """A hung thread cannot be stopped: end the worker (address) that runs it; a new one
        builds the state anew. Only for workers of ours; see `replaces_hung_workers`."""

    replaces_hung_workers = False
    fence: Optional[Fence] = None  # where workers may be given up while they still write

    def close_events(self) -> None:
        """Stop handling the engine's events and results: the run is closing. The events that
        came before are handled first (a worker's setup, heard just before the last results),
        for a moment at most."""
        self._events_closed = True
        futures_wait([self._event_thread.submit(lambda: None)], timeout=EVENTS_DRAIN_S)
        self.release_spent()
        try:
            self.client.unsubscribe_topic(EVENT_TOPIC)
        except Exception:  # the client is gone already: no more events come
            pass
        self._event_thread.shutdown(wait=False, cancel_futures=True)
        self._finished.put(None)
        self._fail_parked("the run ended while its worker's loss was being handled")

    def outstanding(self, identity: str) -> int:
        """Invocations of the template submitted and not finished (waiting or running)."""
        with self._lock:
            return sum(1 for invocation, _ in self._pending.values() if invocation.identity == identity)

    def cancel(self) -> None:
        """Drop the invocations in flight, then close. A second Ctrl-C while the invocations are
        dropped ends the run at once (its KeyboardInterrupt goes up, with no close to wait for:
        the forkserver ends the workers), as one during the close does."""
        try:
            with self._lock:
                futures = [f for f, _ in self._tasks.values()]
            if futures:
                self.client.cancel(futures, force=True)
        except Exception as e:  # the close matters more than the drop
            print(f"Sticky: dropping the invocations in flight failed ({type(e).__name__}: {e}); closing anyway.")
        self.close()

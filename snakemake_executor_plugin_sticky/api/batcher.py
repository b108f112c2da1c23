"""`Batcher`: the items of invocations that run at the same time on one worker share model calls.

A GPU serves a model efficiently only in large batches, but small invocations lose little work
on preemption and spread well over a growing pool. With a Batcher the two no longer conflict:
invocations running side by side (`slots` above 1) hand it their lists, and it calls the model
with up to `max_batch` items at a time, taken from all of them, one call at a time, as one device
does. While a call runs, new items queue; the next call takes them. So the batch size follows the
load, not the size of an invocation.

A template returns a Batcher as (part of) its state:

    def setup(model_dir):
        model = load(model_dir)
        return {"score": Batcher(model.score_batch, max_batch=64)}

and an invocation calls it with its own items: `scores = state["score"](claims)`. Under any
other executor the same template works unchanged: one caller, batches of its own items.

When a merged call raises, the Batcher finds the items that fail by splitting the batch in
halves (bisection): only the invocations whose items fail get the exception, with the item
named; the others get their results. An exception the template declares as poisoning its state
(`poisoned_by`) is not split: every invocation of the call gets it, and the worker rebuilds the
state.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from . import resident

# Calls made in this process and not yet reported (start, end, items): the worker sends them
# with the next invocation that finishes (see drain_calls).
_calls: list[tuple[float, float, int]] = []
_calls_lock = threading.Lock()
_open: "weakref.WeakSet[Batcher]" = weakref.WeakSet()


class BatcherClosed(RuntimeError):
    """The Batcher was closed (its worker retires, or its state is rebuilt) while items waited."""


class BatchItemError(RuntimeError):
    """One item of an invocation's list made the model call fail; the item is named."""


@dataclass
class _Request:
    items: Sequence[Any]
    results: list[Any] = field(default_factory=list)
    taken: int = 0  # items handed to calls so far
    done: int = 0  # items whose results (or failure) are in
    error: Optional[BaseException] = None
    finished: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.results = [None] * len(self.items)


class Batcher:
    """Call `fn` with lists of at most `max_batch` items, merged from every caller waiting.

    `fn(items) -> results` must return one result per item, in order. `max_wait` (seconds, 0 by
    default) lets a call wait at most that long for more items: in a sticky worker only while
    invocations run that have not handed theirs yet, elsewhere only while other callers are
    inside the Batcher. It ends as soon as `max_batch` items wait. With one caller alone it
    never waits.

    Why wait at all: invocations whose items shared a call finish together and are replaced
    together, so without a wait the slots split into groups that take turns, each call serving
    one group; a short wait lets the groups meet again in one call.
    """

    def __init__(
        self,
        fn: Callable[[list[Any]], Sequence[Any]],
        max_batch: int,
        max_wait: float = 0.0,
        poisoned_by: Optional[Callable[[BaseException], bool]] = None,
    ):
        if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
            raise ValueError(f"Batcher: max_batch must be an integer >= 1, got {max_batch!r}.")
        if max_wait < 0:
            raise ValueError(f"Batcher: max_wait must not be negative, got {max_wait!r}.")
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait = max_wait
        self._poisoned_by = poisoned_by
        self._queue: deque[_Request] = deque()
        self._callers = 0  # threads inside __call__
        self._closed: Optional[str] = None
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._serve, name="sticky-batcher", daemon=True)
        self._thread.start()
        _open.add(self)

    def __call__(self, items: Sequence[Any]) -> list[Any]:
        items = list(items)
        if not items:
            return []
        request = _Request(items)
        with self._changed:
            if self._closed is not None:
                raise BatcherClosed(self._closed)
            self._callers += 1
            self._queue.append(request)
            self._changed.notify_all()
        try:
            request.finished.wait()
        finally:
            with self._changed:
                self._callers -= 1
                self._changed.notify_all()
        if request.error is not None:
            raise request.error
        return request.results

    def close(self, reason: str = "the Batcher was closed") -> None:
        """Stop taking items; callers still waiting get BatcherClosed. A call running finishes,
        and close returns once the Batcher's thread has ended: a teardown that frees the model
        next, or a process that exits next, never has the Batcher's thread beside it."""
        with self._changed:
            if self._closed is None:
                self._closed = reason
                waiting = list(self._queue)
                self._queue.clear()
                self._changed.notify_all()
            else:
                waiting = []
        for request in waiting:
            if not request.finished.is_set():
                request.error = BatcherClosed(reason)
                request.finished.set()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    # -- the device thread ----------------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _next_batch(self) -> Optional[list[tuple[_Request, int, int]]]:
        """Up to max_batch items from the requests waiting, oldest first: (request, start, end)."""
        with self._changed:
            while not self._queue and self._closed is None:
                self._changed.wait()
            if self._closed is not None:
                return None
            if self.max_wait > 0 and self._others_coming():
                deadline = time.monotonic() + self.max_wait
                while (
                    self._closed is None
                    and self._pending_items() < self.max_batch
                    and self._others_coming()
                    and (left := deadline - time.monotonic()) > 0
                ):
                    self._changed.wait(left)
                if self._closed is not None:  # closed meanwhile: its callers were released
                    return None
            batch, room = [], self.max_batch
            while self._queue and room:
                request = self._queue[0]
                take = min(room, len(request.items) - request.taken)
                batch.append((request, request.taken, request.taken + take))
                request.taken += take
                room -= take
                if request.taken == len(request.items):
                    self._queue.popleft()
            return batch

    def _pending_items(self) -> int:
        return sum(len(r.items) - r.taken for r in self._queue)

    def _others_coming(self) -> bool:
        """Whether items may still come: in a sticky worker, while more invocations run than
        have items waiting here; elsewhere, while other callers are inside the Batcher."""
        this = resident.current()
        if this is not None:
            return this.invocations_running() > len(self._queue)
        return self._callers > 1

    def wake(self) -> None:
        """Look again at what runs (an invocation ended): a wait for its items ends."""
        with self._changed:
            self._changed.notify_all()

    def _run(self, batch: list[tuple[_Request, int, int]]) -> None:
        try:
            self._call(batch)
        except BaseException as e:  # a poisoning exception: every invocation of the call gets it
            for request, _, _ in batch:
                request.error = request.error or e
                request.finished.set()

    def _call(self, batch: list[tuple[_Request, int, int]]) -> None:
        """One model call for the batch. When it fails, or returns a result count other than its
        item count, the halves are tried until the items at fault are found: only their
        invocations get the error. Raises only what poisons the state."""
        items = [item for request, start, end in batch for item in request.items[start:end]]
        started = time.time()
        try:
            results = list(self.fn(items))
        except Exception as e:
            if self._poisons(e):
                raise
            reason = f"{type(e).__name__}: {e}"
            self._isolate(
                batch, items, lambda what: BatchItemError(f"Batcher: {what} made the model call fail: {reason}"), e
            )
            return
        finally:
            with _calls_lock:
                _calls.append((started, time.time(), len(items)))
        if len(results) != len(items):
            count = len(results)
            self._isolate(
                batch,
                items,
                lambda what: ValueError(
                    f"Batcher: the function returned {count} results for {what}; it must return one result per "
                    "item, in order."
                ),
            )
            return
        at = 0
        for request, start, end in batch:
            request.results[start:end] = results[at : at + end - start]
            at += end - start
            self._settle(request, end - start)

    def _isolate(
        self,
        batch: list[tuple[_Request, int, int]],
        items: list[Any],
        error: Callable[[str], BaseException],
        cause: Optional[BaseException] = None,
    ) -> None:
        """The call for `batch` failed: bisect it, or fail the one item it holds with `error`."""
        if len(items) > 1:
            for half in split(batch):
                self._call(half)
            return
        ((request, start, _),) = batch
        failure = error(f"item {start} of this invocation's list ({short(items[0])})")
        failure.__cause__ = cause
        self._settle(request, 1, failure)

    @staticmethod
    def _settle(request: _Request, count: int, error: Optional[BaseException] = None) -> None:
        request.error = request.error or error
        request.done += count
        if request.done >= len(request.items):
            request.finished.set()

    def _poisons(self, error: BaseException) -> bool:
        this = resident.current()
        check = self._poisoned_by or (this.poisons if this is not None else None)
        return bool(check is not None and check(error))


def split(batch: list[tuple[_Request, int, int]]) -> list[list[tuple[_Request, int, int]]]:
    """The batch's items in two halves, as (request, start, end) slices."""
    total = sum(end - start for _, start, end in batch)
    half, first, second, seen = total // 2, [], [], 0
    for request, start, end in batch:
        if seen + (end - start) <= half:
            first.append((request, start, end))
        elif seen >= half:
            second.append((request, start, end))
        else:
            cut = start + (half - seen)
            first.append((request, start, cut))
            second.append((request, cut, end))
        seen += end - start
    return [first, second]


def short(item: Any, width: int = 120) -> str:
    """An item as a message may show it: its repr, cut to `width`."""
    text = repr(item)
    return text if len(text) <= width else text[: width - 3] + "..."


def drain_calls() -> list[tuple[float, float, int]]:
    """The model calls made since the last drain (start, end, items), for the run's report."""
    with _calls_lock:
        calls = list(_calls)
        _calls.clear()
    return calls


def close_all(reason: str) -> None:
    """Close every Batcher of this process (its state is being torn down)."""
    for batcher in list(_open):
        batcher.close(reason)


def invocation_ended() -> None:
    """Called by a resident worker when an invocation ends: a Batcher waiting for its items
    stops waiting."""
    for batcher in list(_open):
        batcher.wake()

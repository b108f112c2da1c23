"""Finished invocations reported to Snakemake a few at a time.

Snakemake runs a scheduling round whenever jobs are reported finished, and each round costs
about as much as a few no-op invocations whatever the number of jobs it takes: a busy Snakemake
thread that takes reports as they trickle in runs a round for every few invocations. Reports
therefore wait, for at most a tenth of a second, until `batch` of them (half of Snakemake's
window) are back, and go out together, so that one round refills half the window. They go out at
once when the workers run low on queued invocations, or when one failed.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

Report = Callable[[], None]
Fallback = Callable[[BaseException], None]

HOLD_S = 0.1  # the longest a report waits for company


class CompletionBatcher:
    """Collects reports; a thread of its own delivers them, in the order they came."""

    def __init__(self, on_error: Callable[[BaseException], None], hold_s: float = HOLD_S, batch: int = 0):
        self.on_error = on_error
        self.hold_s = hold_s
        self.batch = batch  # 0: no batch size, reports wait for urgency or the hold
        self._pending: list[tuple[Report, Fallback]] = []
        self._first_at = 0.0
        self._urgent = False
        self._closed = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._deliver_forever, name="sticky-completions", daemon=True)
        self._thread.start()

    def add(self, report: Report, urgent: bool, fallback: Fallback) -> None:
        """Queue a report; `urgent` sends it and all before it now (the workers run low), as does
        a full batch.
        Should the report fail, `fallback` gets the error: the job must end somehow, or Snakemake
        would wait for it forever."""
        with self._changed:
            if not self._pending:
                self._first_at = time.monotonic()
            self._pending.append((report, fallback))
            self._urgent = self._urgent or urgent or len(self._pending) >= self.batch > 0
            self._changed.notify()

    def close(self, deliver: bool = True) -> None:
        """Stop the thread; deliver what waits (or drop it, when the run is cancelled)."""
        with self._changed:
            self._closed = True
            if not deliver:
                self._pending.clear()
            self._changed.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _deliver_forever(self) -> None:
        while True:
            with self._changed:
                while not self._pending and not self._closed:
                    self._changed.wait()
                deadline = self._first_at + self.hold_s
                while not (self._urgent or self._closed) and (left := deadline - time.monotonic()) > 0:
                    self._changed.wait(left)
                batch, self._pending, self._urgent = self._pending, [], False
                finished = self._closed
            for report, fallback in batch:
                try:
                    report()
                except Exception as e:  # one failed report must not stop the ones after it
                    try:
                        fallback(e)
                    except Exception as again:
                        self.on_error(again)
            if finished and not batch:
                return

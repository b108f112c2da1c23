"""What the executor counts per template while a run lasts: its jobs not done yet, the invocation
slots its workers offer, the invocations in flight and the worker losses no invocation is blamed
for. Thread-safe: Snakemake's thread, the engine's events and the completions all count."""

from __future__ import annotations

import threading


class TemplateJobs:
    """Counts of a run's templates; `retire_early` when no checkpoint can add sticky jobs later."""

    def __init__(self, jobs: dict[str, int], retire_early: bool):
        self._jobs_left = dict(jobs)
        self._slots: dict[str, int] = {}
        self._losses: dict[str, int] = {}
        self._in_flight = 0
        self.retire_early = retire_early
        self._lock = threading.Lock()

    @property
    def sticky_jobs(self) -> int:
        """Sticky jobs of the run not done yet."""
        with self._lock:
            return sum(self._jobs_left.values())

    def offer(self, template: str, slots: int) -> None:
        """The template's workers offer `slots` invocation slots (counted once per pool)."""
        with self._lock:
            self._slots.setdefault(template, slots)

    def sent(self, count: int) -> None:
        """Invocations were sent to the workers."""
        with self._lock:
            self._in_flight += count

    def returned(self) -> bool:
        """One invocation is back; True when Snakemake must hear of it at once: the workers are
        about to run out of queued ones (fewer than one waiting behind each running one)."""
        with self._lock:
            self._in_flight -= 1
            return self._in_flight <= 2 * sum(self._slots.values())

    def job_done(self, template: str) -> tuple[bool, bool]:
        """One job of the template is done: (retire its workers now, every sticky job is done)."""
        with self._lock:
            left = self._jobs_left[template] = self._jobs_left.get(template, 0) - 1
            if left != 0 or not self.retire_early:
                return False, False
            self._slots.pop(template, None)
            return True, not any(self._jobs_left.values())

    def lost_worker(self, template: str) -> int:
        """A worker of the template was lost with no invocation to blame: the losses so far."""
        with self._lock:
            self._losses[template] = self._losses.get(template, 0) + 1
            return self._losses[template]

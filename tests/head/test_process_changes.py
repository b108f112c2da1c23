"""The changes to Snakemake's process that cut its scheduling passes, without a run."""

from __future__ import annotations

import asyncio
import threading

from snakemake_executor_plugin_sticky.head.executor import prepare_all
from snakemake_executor_plugin_sticky.head.process_changes import (
    REEVALUATION_THREAD,
    ReevaluationTimer,
    cancel_pending_reevaluations,
)


def test_one_reevaluation_waits_at_a_time_and_its_release_lets_the_next_one_start():
    semaphore = threading.Semaphore(0)
    timer = ReevaluationTimer(semaphore)
    for _ in range(50):  # fifty scheduling passes within one timespan
        timer.schedule(0.2)
    assert semaphore.acquire(timeout=5), "the loop is woken a timespan later"
    assert not semaphore.acquire(timeout=0.5), "once, not fifty times"
    timer.schedule(0.05)  # the pass it woke asks again
    assert semaphore.acquire(timeout=5), "the next timespan is looked at, too"


def test_waiting_reevaluations_are_cancelled_at_the_end():
    semaphore = threading.Semaphore(0)
    ReevaluationTimer(semaphore).schedule(30)
    assert any(t.name == REEVALUATION_THREAD for t in threading.enumerate())
    cancel_pending_reevaluations()
    for thread in threading.enumerate():
        if thread.name == REEVALUATION_THREAD:
            thread.join(5)
            assert not thread.is_alive()
    assert not semaphore.acquire(timeout=0.1)


class Job:
    def __init__(self, name: str, error: Exception | None = None):
        self.name, self.error, self.prepared = name, error, False

    async def prepare(self) -> None:
        if self.error is not None:
            raise self.error
        self.prepared = True


def test_a_rounds_jobs_are_prepared_in_order_each_with_its_own_error():
    broken = OSError("output folder not writable")
    jobs = [Job("a"), Job("b", broken), Job("c")]
    errors = asyncio.run(prepare_all(jobs))
    assert errors == [None, broken, None]
    assert [job.prepared for job in jobs] == [True, False, True], "a failed job does not stop the others"


def test_a_request_that_falls_due_sooner_than_the_waiting_one_is_kept():
    semaphore = threading.Semaphore(0)
    timer = ReevaluationTimer(semaphore)
    timer.schedule(30)  # Snakemake waiting ten seconds for queue input, say
    timer.schedule(0.05)  # then the rate limiter's timespan
    assert semaphore.acquire(timeout=5), "the sooner one is not held back by the later one"
    cancel_pending_reevaluations()

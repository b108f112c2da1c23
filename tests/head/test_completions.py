"""Finished invocations are reported to Snakemake in batches: held briefly, never lost, in order."""

from __future__ import annotations

import threading
import time

from snakemake_executor_plugin_sticky.head.completions import CompletionBatcher


class Recorder:
    def __init__(self) -> None:
        self.delivered: list[tuple[str, float]] = []
        self.errors: list[BaseException] = []
        self.arrived = threading.Event()

    def report(self, name: str):
        def deliver() -> None:
            self.delivered.append((name, time.monotonic()))
            self.arrived.set()

        return deliver


def test_reports_wait_for_company_then_go_out_together_in_order():
    seen = Recorder()
    batcher = CompletionBatcher(seen.errors.append, hold_s=0.3)
    try:
        start = time.monotonic()
        for name in "abc":
            batcher.add(seen.report(name), urgent=False, fallback=seen.errors.append)
        assert seen.arrived.wait(5)
        time.sleep(0.05)
        assert [name for name, _ in seen.delivered] == ["a", "b", "c"]
        assert all(at - start >= 0.3 for _, at in seen.delivered), "held for company, all of them"
    finally:
        batcher.close()


def test_an_urgent_report_sends_everything_held_at_once():
    seen = Recorder()
    batcher = CompletionBatcher(seen.errors.append, hold_s=30)
    try:
        batcher.add(seen.report("held"), urgent=False, fallback=seen.errors.append)
        time.sleep(0.1)
        assert seen.delivered == []
        batcher.add(seen.report("urgent"), urgent=True, fallback=seen.errors.append)
        assert seen.arrived.wait(5), "not held for the 30 s"
        time.sleep(0.05)
        assert [name for name, _ in seen.delivered] == ["held", "urgent"]
    finally:
        batcher.close()


def test_close_delivers_what_waits_unless_the_run_is_cancelled():
    seen = Recorder()
    batcher = CompletionBatcher(seen.errors.append, hold_s=30)
    batcher.add(seen.report("last"), urgent=False, fallback=seen.errors.append)
    batcher.close()
    assert [name for name, _ in seen.delivered] == ["last"]

    dropped = Recorder()
    batcher = CompletionBatcher(dropped.errors.append, hold_s=30)
    batcher.add(dropped.report("cancelled"), urgent=False, fallback=seen.errors.append)
    batcher.close(deliver=False)
    assert dropped.delivered == []


def test_a_failing_report_goes_to_its_fallback_and_the_rest_still_go_out():
    seen = Recorder()
    fallen_back: list[BaseException] = []

    def broken() -> None:
        raise RuntimeError("callback broke")

    def broken_fallback(error: BaseException) -> None:
        raise RuntimeError(f"fallback broke after {error}")

    batcher = CompletionBatcher(seen.errors.append, hold_s=30)
    batcher.add(broken, urgent=False, fallback=fallen_back.append)
    batcher.add(broken, urgent=False, fallback=broken_fallback)
    batcher.add(seen.report("after"), urgent=True, fallback=seen.errors.append)
    assert seen.arrived.wait(5)
    batcher.close()
    assert [name for name, _ in seen.delivered] == ["after"]
    assert [str(e) for e in fallen_back] == ["callback broke"], "the job's fallback heard of it"
    assert [str(e) for e in seen.errors] == ["fallback broke after callback broke"]


def test_a_full_batch_goes_out_without_waiting():
    seen = Recorder()
    batcher = CompletionBatcher(seen.errors.append, hold_s=30, batch=3)
    try:
        for name in "ab":
            batcher.add(seen.report(name), urgent=False, fallback=seen.errors.append)
        time.sleep(0.1)
        assert seen.delivered == [], "two of a batch of three wait"
        batcher.add(seen.report("c"), urgent=False, fallback=seen.errors.append)
        assert seen.arrived.wait(5), "not held for the 30 s"
        time.sleep(0.05)
        assert [name for name, _ in seen.delivered] == ["a", "b", "c"]
    finally:
        batcher.close()

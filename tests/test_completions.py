"""Finished invocations are reported to Snakemake in batches: held briefly, never lost, in order."""

from __future__ import annotations

import threading
import time

from snakemake_executor_plugin_sticky.completions import CompletionBatcher


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
            batcher.add(seen.report(name), urgent=False)
        assert seen.arrived.wait(5)
        time.sleep(0.05)
        assert [name for name, _ in seen.delivered] == ["a", "b", "c"]
        first = seen.delivered[0][1] - start
        assert first >= 0.3, "held for company"
        assert seen.delivered[-1][1] - seen.delivered[0][1] < 0.1, "one batch"
    finally:
        batcher.close()


def test_an_urgent_report_sends_everything_held_at_once():
    seen = Recorder()
    batcher = CompletionBatcher(seen.errors.append, hold_s=30)
    try:
        batcher.add(seen.report("held"), urgent=False)
        time.sleep(0.1)
        assert seen.delivered == []
        batcher.add(seen.report("urgent"), urgent=True)
        assert seen.arrived.wait(5), "not held for the 30 s"
        time.sleep(0.05)
        assert [name for name, _ in seen.delivered] == ["held", "urgent"]
    finally:
        batcher.close()


def test_close_delivers_what_waits_unless_the_run_is_cancelled():
    seen = Recorder()
    batcher = CompletionBatcher(seen.errors.append, hold_s=30)
    batcher.add(seen.report("last"), urgent=False)
    batcher.close()
    assert [name for name, _ in seen.delivered] == ["last"]

    dropped = Recorder()
    batcher = CompletionBatcher(dropped.errors.append, hold_s=30)
    batcher.add(dropped.report("cancelled"), urgent=False)
    batcher.close(deliver=False)
    assert dropped.delivered == []


def test_a_failing_report_is_handed_on_and_the_rest_still_go_out():
    seen = Recorder()

    def broken() -> None:
        raise RuntimeError("callback broke")

    batcher = CompletionBatcher(seen.errors.append, hold_s=30)
    batcher.add(broken, urgent=False)
    batcher.add(seen.report("after"), urgent=True)
    assert seen.arrived.wait(5)
    batcher.close()
    assert [name for name, _ in seen.delivered] == ["after"]
    assert [str(e) for e in seen.errors] == ["callback broke"]

"""A shared task hands its rest back when one of its invocations runs long (worker/shared_task.py):
the task's bookkeeping alone, with no worker and no clock but the one given."""

from __future__ import annotations

from snakemake_executor_plugin_sticky.wire import Invocation, InvocationResult
from snakemake_executor_plugin_sticky.worker.shared_task import SharedTask


def invocation(key: str) -> Invocation:
    return Invocation(key, "llm", "id", "sticky-llm", "infer", 1, "/s.py", None)


def result(key: str) -> InvocationResult:
    return InvocationResult(key, "llm-0", "tls://w0", 1, 0.0, 0.0)


def test_a_task_with_nothing_running_long_keeps_everything():
    task = SharedTask("t-1", [invocation(k) for k in "abc"])
    while (next_one := task.next()) is not None:
        assert task.hand_back(now=0.0, after_s=1.0) is None, "each runs shorter than after_s"
        task.done(result(next_one.key))
    assert task.hand_back(now=float("inf"), after_s=1.0) is None, "nothing runs"
    assert [r.key for r in task.results()] == ["a", "b", "c"]


def test_a_long_invocation_hands_back_the_results_before_it_and_the_invocations_behind_it():
    task = SharedTask("t-1", [invocation(k) for k in "abcd"])
    task.done(result(task.next().key))  # a ran
    started = task.next()  # b runs long
    assert started.key == "b"
    assert task.hand_back(now=0.0, after_s=1.0) is None, "not long yet"
    handed = task.hand_back(now=float("inf"), after_s=1.0)
    assert handed is not None
    results, waiting = handed
    assert [r.key for r in results] == ["a"] and waiting == ["c", "d"]
    assert task.hand_back(now=float("inf"), after_s=1.0) is None, "handed back once"
    task.done(result("b"))
    assert task.next() is None, "the rest is the head's now"
    assert [r.key for r in task.results()] == ["b"], "the task returns the long one alone"


def test_a_long_last_invocation_with_nothing_before_it_hands_nothing_back():
    task = SharedTask("t-1", [invocation("a")])
    task.next()
    assert task.hand_back(now=float("inf"), after_s=1.0) is None

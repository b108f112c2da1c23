"""How many invocations travel in one Dask task (head/chunking.py): a pure policy, no run."""

from __future__ import annotations

from snakemake_executor_plugin_sticky.head.chunking import Chunking

T = ("template", "infer")
OTHER = ("template", "other")


def test_until_a_rule_has_a_measured_invocation_each_travels_alone():
    chunking = Chunking(task_s=0.05)
    assert chunking.split(T, list(range(5)), slots=2) == [[0], [1], [2], [3], [4]]


def test_short_invocations_share_tasks_yet_every_slot_gets_one():
    chunking = Chunking(task_s=0.05)
    chunking.observe(T, 0.002)
    assert chunking.size(T, count=16, slots=2) == 8, "16 ready for 2 slots: a task for each"
    assert chunking.size(T, count=16, slots=16) == 1
    assert chunking.size(T, count=1000, slots=2) == 25, "as many as run in task_s"
    tasks = chunking.split(T, list(range(17)), slots=2)
    assert tasks == [list(range(9)), list(range(9, 17))], "in order, none lost"


def test_long_invocations_travel_alone_and_the_mean_follows_the_latest():
    chunking = Chunking(task_s=0.05)
    chunking.observe(T, 2.0)
    assert chunking.size(T, count=32, slots=2) == 1
    for _ in range(40):
        chunking.observe(T, 0.001)
    assert chunking.size(T, count=32, slots=2) == 16, "the rule's invocations became short"
    chunking.observe(OTHER, -1.0)  # a clock step back counts as no time, not as negative time
    assert chunking.size(OTHER, count=4, slots=1) == 4
    assert chunking.size(T, count=0, slots=2) == 1


def test_each_rule_of_a_template_learns_alone():
    chunking = Chunking(task_s=0.05)
    for _ in range(100):
        chunking.observe(T, 0.001)
    assert chunking.size(T, count=100, slots=2) == 50
    assert chunking.size(OTHER, count=100, slots=2) == 1, "no measure of this rule yet: each alone"
    chunking.observe(OTHER, 3.0)
    assert chunking.size(OTHER, count=100, slots=2) == 1, "a slow rule is never packed by a fast one's mean"
    assert chunking.size(T, count=100, slots=2) == 50

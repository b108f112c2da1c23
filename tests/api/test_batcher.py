"""The Batcher: invocations' lists merged into model calls, each caller getting exactly its own
results; a bad item found by bisection; no deadlock or starvation. On its own with real threads,
then in workflows with real Snakemake and real Dask."""

from __future__ import annotations

import json
import threading
import time

import pytest

from snakemake_executor_plugin_sticky import Batcher
from snakemake_executor_plugin_sticky.api import batcher as batching
from snakemake_executor_plugin_sticky.api.batcher import BatcherClosed, BatchItemError, drain_calls

from conftest import Workflow, interrupt
from helpers import as_resident


class Model:
    """One device: one call at a time (checked), a fixed cost per call and a cost per item."""

    def __init__(self, fixed_s: float = 0.02, per_item_s: float = 0.0, bad: object = None, poison: object = None):
        self.fixed_s, self.per_item_s, self.bad, self.poison = fixed_s, per_item_s, bad, poison
        self.calls: list[list] = []
        self.busy = threading.Lock()

    def __call__(self, items: list) -> list:
        assert self.busy.acquire(blocking=False), "two calls at once"
        try:
            self.calls.append(list(items))
            if self.poison is not None and self.poison in items:
                raise MemoryError("CUDA out of memory")
            if self.bad is not None and self.bad in items:
                raise ValueError("malformed item")
            time.sleep(self.fixed_s + self.per_item_s * len(items))
            return [("done", item) for item in items]
        finally:
            self.busy.release()


def call_all(batcher: Batcher, lists: dict[str, list]) -> dict[str, object]:
    """Every list from a thread of its own, all at once; what each thread got back."""
    got: dict[str, object] = {}
    start = threading.Barrier(len(lists))

    def caller(name: str, items: list) -> None:
        start.wait()
        try:
            got[name] = batcher(items)
        except Exception as e:
            got[name] = e

    threads = [threading.Thread(target=caller, args=item) for item in lists.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive(), "a caller never got its results"
    return got


def test_every_caller_gets_exactly_its_own_results_from_merged_calls():
    model = Model(fixed_s=0.05)
    batcher = Batcher(model, max_batch=16)
    lists = {f"inv{i}": [f"inv{i}-item{j}" for j in range(i % 4)] for i in range(40)}  # 0 to 3 items
    got = call_all(batcher, lists)
    for name, items in lists.items():
        assert got[name] == [("done", item) for item in items]
    sizes = [len(call) for call in model.calls]
    assert max(sizes) <= 16 and sum(sizes) == sum(map(len, lists.values()))
    assert len(model.calls) < sum(1 for items in lists.values() if items), "calls were shared"
    batcher.close()


def test_a_list_larger_than_max_batch_is_split_and_others_are_not_starved():
    model = Model()
    batcher = Batcher(model, max_batch=8)
    got = call_all(batcher, {"big": list(range(100)), "small": ["s"]})
    assert got["big"] == [("done", i) for i in range(100)] and got["small"] == [("done", "s")]
    assert all(len(call) <= 8 for call in model.calls)
    assert batcher([]) == [], "an empty list returns at once"
    batcher.close()


def test_a_bad_item_fails_its_own_invocation_only_and_is_named():
    model = Model(bad="bad-item")
    batcher = Batcher(model, max_batch=64)
    lists = {f"inv{i}": [f"inv{i}-a", f"inv{i}-b"] for i in range(20)}
    lists["inv7"] = ["inv7-a", "bad-item"]
    got = call_all(batcher, lists)
    assert isinstance(got["inv7"], BatchItemError)
    assert "item 1 of this invocation's list ('bad-item')" in str(got["inv7"]) and "malformed item" in str(got["inv7"])
    for name, items in lists.items():
        if name != "inv7":
            assert got[name] == [("done", item) for item in items], name
    batcher.close()


def test_a_poisoning_exception_reaches_every_invocation_of_the_call_unsplit():
    model = Model(fixed_s=0.0, poison="oom")
    busy, release = threading.Event(), threading.Event()

    def device(items: list) -> list:
        if items == ["first"]:  # holds the device while the others queue behind it
            busy.set()
            release.wait(30)
        return model(items)

    batcher = Batcher(device, max_batch=64, poisoned_by=lambda e: isinstance(e, MemoryError))
    got: dict[str, object] = {}

    def caller(name: str, items: list) -> None:
        try:
            got[name] = batcher(items)
        except Exception as e:
            got[name] = e

    first = threading.Thread(target=caller, args=("first", ["first"]))
    first.start()
    assert busy.wait(10)
    others = [threading.Thread(target=caller, args=item) for item in (("a", ["a1", "oom"]), ("b", ["b1"]))]
    for thread in others:
        thread.start()
    while batcher._callers < 3:
        time.sleep(0.01)
    release.set()
    for thread in [first, *others]:
        thread.join(10)
    assert got["first"] == [("done", "first")]
    assert isinstance(got["a"], MemoryError) and isinstance(got["b"], MemoryError), got
    assert sum(1 for call in model.calls if "oom" in call) == 1, "not bisected"
    batcher.close()


def test_results_of_the_wrong_length_fail_the_call_with_a_clear_error():
    batcher = Batcher(lambda items: items[:-1], max_batch=4)
    with pytest.raises(ValueError, match=r"returned 0 results for item 0 of this invocation's list \('a'\)"):
        batcher(["a", "b"])
    batcher.close()


def test_a_function_that_drops_an_item_fails_only_the_invocation_whose_item_it_dropped():
    def drop(items: list) -> list:
        return [("done", item) for item in items if item != "drop-me"]

    batcher = Batcher(drop, max_batch=64)
    lists = {f"inv{i}": [f"inv{i}-a", f"inv{i}-b"] for i in range(20)}
    lists["inv7"] = ["inv7-a", "drop-me"]
    got = call_all(batcher, lists)
    assert isinstance(got["inv7"], ValueError), got["inv7"]
    assert "returned 0 results for item 1 of this invocation's list ('drop-me')" in str(got["inv7"])
    assert "one result per item" in str(got["inv7"])
    for name, items in lists.items():
        if name != "inv7":
            assert got[name] == [("done", item) for item in items], name
    batcher.close()


def test_closing_releases_callers_whose_items_wait():
    started, release = threading.Event(), threading.Event()

    def stuck(items: list) -> list:
        started.set()
        release.wait(30)
        return items

    batcher = Batcher(stuck, max_batch=1)
    got: dict[str, object] = {}

    def caller(name: str) -> None:
        try:
            got[name] = batcher([name])
        except BatcherClosed as e:
            got[name] = e

    running = threading.Thread(target=caller, args=("running",))
    running.start()
    assert started.wait(10)
    waiting = threading.Thread(target=caller, args=("waiting",))
    waiting.start()
    while not batcher._queue:  # its item waits behind the call that runs
        time.sleep(0.01)
    batcher.close("the worker retires")
    waiting.join(10)
    assert isinstance(got["waiting"], BatcherClosed) and "the worker retires" in str(got["waiting"])
    release.set()
    running.join(10)
    assert got["running"] == ["running"], "the call that ran finishes"
    with pytest.raises(BatcherClosed):
        batcher(["later"])


class FirstCallHeld:
    """A model whose first call holds the device until `release` is set: items handed
    meanwhile wait for the next call."""

    def __init__(self) -> None:
        self.calls: list[list] = []
        self.started, self.release = threading.Event(), threading.Event()

    def __call__(self, items: list) -> list:
        self.calls.append(list(items))
        if len(self.calls) == 1:
            self.started.set()
            self.release.wait(30)
        return items


def wait_for_pending(batcher: Batcher, count: int) -> None:
    while batcher._pending_items() < count:
        time.sleep(0.01)


def test_closing_while_a_call_waits_for_company_calls_nothing_more():
    model = FirstCallHeld()
    calls, started, release = model.calls, model.started, model.release
    batcher = Batcher(model, max_batch=64, max_wait=60.0)
    callers = [threading.Thread(target=lambda n=n: _swallow(batcher, [n])) for n in range(3)]
    callers[0].start()
    assert started.wait(10)
    for c in callers[1:]:  # two callers inside: the next call waits up to max_wait for more items
        c.start()
    wait_for_pending(batcher, 2)
    release.set()
    while batcher._callers > 2:  # the first call returned; the device thread waits for company
        time.sleep(0.01)
    batcher.close("the worker retires")
    batcher._thread.join(10)
    assert not batcher._thread.is_alive(), "the device thread ends at once"
    assert calls == [[0]], "no call after the close, and never an empty one"
    for c in callers:
        c.join(10)


def _swallow(batcher: Batcher, items: list) -> None:
    try:
        batcher(items)
    except BatcherClosed:
        pass


def test_a_caller_alone_never_waits_for_company():
    model = Model(fixed_s=0.0)
    batcher = Batcher(model, max_batch=64, max_wait=30.0)
    done = threading.Event()
    threading.Thread(target=lambda: (batcher([1, 2]), done.set()), daemon=True).start()
    assert done.wait(10), "max_wait applies only while other callers are inside the Batcher"
    batcher.close()


def test_in_a_worker_a_call_waits_only_for_invocations_that_have_not_handed_their_items():
    """In a sticky worker the Batcher knows how many invocations run: a call waits for those
    that have not called yet (the groups that take turns meet again), never for nobody, and
    stops waiting when one of them ends instead."""
    model = FirstCallHeld()
    calls, first_started, release = model.calls, model.started, model.release

    def caller(items: list, got: dict) -> threading.Thread:
        thread = threading.Thread(target=lambda: got.setdefault(items[0], batcher(items)), daemon=True)
        thread.start()
        return thread

    batcher = Batcher(model, max_batch=64, max_wait=600.0)
    got: dict = {}
    with as_resident() as worker:
        worker.running = 1
        a = caller(["a"], got)
        assert first_started.wait(10)
        worker.running = 4  # a, b, c and d run; b and c hand their items while a's call runs
        b, c = caller(["b"], got), caller(["c"], got)
        wait_for_pending(batcher, 2)
        worker.running = 3  # a ends; d has not called yet: the next call waits for it
        release.set()
        a.join(10)
        while batcher._callers > 2:
            time.sleep(0.01)
        assert calls == [["a"]], "the call waits while d runs without having called"
        d = caller(["d"], got)
        for thread in (b, c, d):
            thread.join(30)
            assert not thread.is_alive(), "the wait ends once every running invocation has called"
        assert calls == [["a"], ["b", "c", "d"]]

        worker.running = 3  # e and f call, g runs and never calls, then ends
        e, f = caller(["e"], got), caller(["f"], got)
        wait_for_pending(batcher, 2)
        assert len(calls) == 2, "waiting for g"
        worker.running = 2
        batching.invocation_ended()
        for thread in (e, f):
            thread.join(30)
            assert not thread.is_alive(), "an invocation that ends stops the wait for its items"
        assert calls[2] == ["e", "f"]
        assert got == {name: [name] for name in "abcdef"}
    batcher.close()


def test_calls_are_recorded_for_the_report_once():
    drain_calls()
    batcher = Batcher(Model(fixed_s=0.0), max_batch=3)
    batcher(list(range(7)))
    calls = drain_calls()
    assert [items for _, _, items in calls] == [3, 3, 1]
    assert all(end >= start for start, end, _ in calls)
    assert drain_calls() == []
    batcher.close()


@pytest.mark.parametrize("max_batch", [0, -1, 1.5, True])
def test_max_batch_must_be_a_positive_integer(max_batch):
    with pytest.raises(ValueError, match="max_batch must be an integer >= 1"):
        Batcher(lambda items: items, max_batch=max_batch)


# -- in a workflow: real Snakemake, real Dask -----------------------------------------------------

BATCHED_SNAKEFILE = """
configfile: "config.yaml"
N = int(config.get("count", 96))
rule all:
    input: expand("out/{i}.json", i=range(N))
rule infer:
    output: "out/{i}.json"
    resources: sticky="model"
    script: "scripts/infer.py"
"""

# The "model": 100 ms per call plus 2 ms per item, one call at a time, as one device. Items are
# (invocation, index) pairs; the result says which item it was, so routing is checked end to end.
MODEL_TEMPLATE = """
import os, threading, time
from snakemake_executor_plugin_sticky import Batcher
from snakemake_executor_plugin_sticky.api import batcher as batching

poisoned_by = ["MemoryError"]
device = threading.Lock()

def forward(items):
    if not device.acquire(blocking=False):
        raise RuntimeError("two model calls at once")
    try:
        if any(item[0] == "malformed" for item in items):
            raise ValueError("cannot tokenize")
        if any(item[0] == "oom" for item in items) and not os.path.exists("oom-done"):
            open("oom-done", "w").close()
            raise MemoryError("CUDA out of memory")
        time.sleep(0.1 + 0.002 * len(items))
        return [f"result of {item[0]}:{item[1]}" for item in items]
    finally:
        device.release()

def setup(max_batch=32, batched=True):
    open("builds.txt", "a").write(f"{os.getpid()}\\n")
    return {"score": Batcher(forward, max_batch=max_batch) if batched else forward}
"""

INFER = """
import json
from snakemake_executor_plugin_sticky import sticky_state

i = snakemake.wildcards.i
kind = {"7": "malformed", "11": "oom"}.get(i, i) if snakemake.config.get("faults") else i
items = [(kind, j) for j in range(int(snakemake.config.get("items", 2)))]
results = sticky_state(snakemake)["score"](items)
with open(snakemake.output[0], "w") as f:
    json.dump({"items": items, "results": results}, f)
"""


def batched_workflow(workflow: Workflow, slots: int = 16, max_batch: int = 32) -> Workflow:
    workflow.write("Snakefile", BATCHED_SNAKEFILE)
    workflow.write(
        "config.yaml",
        f"""
        sticky:
          model:
            setup: templates/model.py
            kwargs: {{max_batch: {max_batch}}}
            slots: {slots}
    """,
    )
    workflow.write("templates/model.py", MODEL_TEMPLATE)
    workflow.write("scripts/infer.py", INFER)
    return workflow


def model_calls(workflow: Workflow) -> dict:
    return json.loads(workflow.read(".snakemake/sticky/report.json"))["templates"]["model"]["model_calls"]


def test_invocations_side_by_side_share_model_calls_and_each_gets_its_own_results(workflow: Workflow):
    batched_workflow(workflow)
    run = workflow.run("--sticky-workers", "1", "--config", "count=96", cores=64)
    assert run.returncode == 0, run.output
    for i in range(96):
        out = json.loads(workflow.read(f"out/{i}.json"))
        assert out["results"] == [f"result of {i}:{j}" for j in range(2)], i
    calls = model_calls(workflow)
    assert calls["items"] == 192 and calls["max_batch"] <= 32
    assert calls["mean_batch"] >= 8, calls
    assert calls["device_busy_s"] > 0.1 * calls["calls"]
    assert workflow.leftover_processes() == []


def test_a_malformed_item_fails_its_own_invocation_and_a_poisoning_one_rebuilds(workflow: Workflow):
    batched_workflow(workflow)
    run = workflow.run(
        "--sticky-workers", "1", "--keep-going", "--retries", "1", "--config", "count=24", "faults=1", cores=64
    )
    assert run.returncode != 0
    done = sorted(int(p.stem) for p in (workflow.root / "out").glob("*.json"))
    assert done == [i for i in range(24) if i != 7], "only the invocation with the malformed item failed"
    assert "item 0 of this invocation's list (('malformed', 0))" in run.output and "cannot tokenize" in run.output
    # every invocation of the poisoned call got the MemoryError (their retries then succeeded)
    assert "MemoryError: CUDA out of memory" in run.output and "poisoned its state" in run.output
    assert len(workflow.lines("builds.txt")) == 2, "the poisoning exception rebuilt the state"
    assert workflow.leftover_processes() == []


def test_the_same_template_works_unchanged_under_the_local_executor(workflow: Workflow):
    batched_workflow(workflow)
    run = workflow.run("--config", "count=4", "items=40", executor=None, cores=2)
    assert run.returncode == 0, run.output
    for i in range(4):
        assert json.loads(workflow.read(f"out/{i}.json"))["results"] == [f"result of {i}:{j}" for j in range(40)]


def test_a_worker_that_retires_while_items_wait_leaves_at_once(workflow: Workflow):
    batched_workflow(workflow, max_batch=1)  # one item per call: 16 invocations' items wait in line
    workflow.write(
        "templates/model.py", MODEL_TEMPLATE.replace("time.sleep(0.1 + 0.002 * len(items))", "time.sleep(2)")
    )
    proc = workflow.popen("--sticky-workers", "1", "--config", "count=64", "items=4", cores=64)
    wait_for_text(proc, "rule infer")
    time.sleep(1)
    interrupt(proc)
    proc.communicate(timeout=60)  # the items still waiting do not hold the worker's retirement
    assert workflow.leftover_processes(wait_s=10) == []


def wait_for_text(proc, text: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in proc.log.read_text():
        assert time.monotonic() < deadline, f"no {text!r} in the log"
        time.sleep(0.1)

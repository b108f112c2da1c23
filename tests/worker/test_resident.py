"""The state's lifecycle, driven by calls alone: no Snakemake, no Dask, no process of its own.
Build once (with retries), hold it for invocations, rebuild it after a poisoning exception once the
invocations holding it are done, close it; what the worker announces on the way."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from snakemake_executor_plugin_sticky.templates import parse_template
from snakemake_executor_plugin_sticky.wire import Poisoned, Ready, SetupFailed, SetupStarted
from snakemake_executor_plugin_sticky.worker.resident import ResidentState, TemplateSetupError

TEMPLATE = """
import os

BUILT = []

class Exhausted(RuntimeError):
    pass

poisoned_by = (Exhausted,)

def setup(fail_first=0, gate=None):
    if gate is not None and not os.path.exists(gate):
        raise RuntimeError("not yet")
    BUILT.append(len(BUILT) + 1)
    if len(BUILT) <= fail_first:
        raise RuntimeError(f"attempt {len(BUILT)} fails")
    return {"generation": len(BUILT), "open": True}

def teardown(state):
    state["open"] = False
"""


def resident(tmp_path: Path, attempts: int = 1, **kwargs) -> tuple[ResidentState, list]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "template.py").write_text(TEMPLATE)
    spec = parse_template("t", {"setup": "template.py", "kwargs": kwargs}, tmp_path)
    announced: list = []
    holder = ResidentState(spec, attempts, 0.01, lambda kind, **fields: announced.append((kind, fields)))
    return holder, announced


def test_the_state_is_built_once_and_held_by_each_invocation(tmp_path: Path):
    holder, announced = resident(tmp_path)
    holder.start()
    with holder.use() as generation:
        state = holder.get()
        assert generation == 1 and state["open"] and holder.users == 1
    with holder.use():
        assert holder.get() is state, "the same state for the next invocation"
    assert holder.users == 0
    assert [kind for kind, _ in announced] == [SetupStarted, Ready]
    assert announced[1][1]["setup_s"] >= 0


def test_a_failing_setup_is_retried_then_every_invocation_gets_every_attempt(tmp_path: Path):
    holder, announced = resident(tmp_path, attempts=3, fail_first=3)
    holder.build()
    with pytest.raises(TemplateSetupError) as failed:
        with holder.use():
            pass
    assert "after 3 attempt(s)" in str(failed.value) and "attempt 3 fails" in str(failed.value)
    assert [kind for kind, _ in announced] == [SetupStarted, SetupFailed]
    again, _ = resident(tmp_path / "again", attempts=3, fail_first=2)
    again.build()
    with again.use():
        assert again.get()["open"] and again.generation == 1, "the third attempt built it"


def test_a_poisoned_state_is_rebuilt_once_the_invocations_holding_it_are_done(tmp_path: Path):
    holder, announced = resident(tmp_path)
    holder.build()
    first = holder.get()
    holding = threading.Event()
    release = threading.Event()

    def neighbour() -> None:
        with holder.use():
            holding.set()
            release.wait(10)
            assert holder.get() is first, "a neighbour keeps the state it holds until it is done"

    thread = threading.Thread(target=neighbour)
    thread.start()
    assert holding.wait(10)
    with holder.use() as generation:
        holder.rebuild("Exhausted in rule r", generation)
        holder.rebuild("Exhausted in rule r", generation)  # a second invocation of the same state: once
    came = []
    newcomer = threading.Thread(target=lambda: came.append(holder.use().__enter__()))
    newcomer.start()
    time.sleep(0.2)
    assert not came and first["open"], "the newcomer waits; the old state is not torn down while held"
    release.set()
    thread.join(10)
    newcomer.join(10)
    assert came == [2] and not first["open"], "torn down once free, then built again"
    assert holder.get() is not first and holder.get()["open"] and holder.generation == 2
    assert [kind for kind, _ in announced] == [SetupStarted, Ready, Poisoned, SetupStarted, Ready]


def test_the_template_names_what_poisons_its_state(tmp_path: Path):
    holder, _ = resident(tmp_path)
    holder.build()
    (exhausted,) = holder.poisoned_by  # the class the setup file declares
    assert holder.poisons(exhausted("out of memory")) and not holder.poisons(RuntimeError("plain"))


def test_closing_tears_down_once_and_refuses_later_invocations(tmp_path: Path):
    holder, _ = resident(tmp_path)
    holder.build()
    state = holder.get()
    assert holder.close(time.monotonic() + 5) and not state["open"] and holder.closed
    with pytest.raises(TemplateSetupError, match="retiring"):
        with holder.use():
            pass


def test_a_build_that_outlasts_its_worker_is_torn_down_as_it_ends(tmp_path: Path):
    gate = tmp_path / "gate"
    holder, _ = resident(tmp_path, attempts=100, gate=str(gate))
    holder.start()
    time.sleep(0.1)
    holder.close(time.monotonic() + 0.2)  # the worker retires while setup still fails and retries
    assert holder.closed
    gate.touch()
    time.sleep(0.3)
    with pytest.raises(TemplateSetupError):
        holder.get()
